"""Steered generation: maps from concepts, reference images or files, composed and applied.

Composition: each source i (a concept, a set of reference images, a file) gives maps
(omega_i, beta_i) and a weight w_i (`"art deco:0.6"`; default 1). They combine additively in
displacement from the identity,

    omega = 1 + sum_i w_i (omega_i - 1),     beta = sum_i w_i beta_i,

which is order-independent, reduces to T_i^{w_i} for a single source, and drops a source
exactly at w_i = 0. The global strength lambda then scales the combined map as usual (the
sweep `--strength 0,0.5,1` multiplies every weight).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageDraw

from htcli.core.hooks import Steering, hooked, resolve_layers
from htcli.core.transport import Maps
from htcli.errors import HTError
from htcli.models import ModelSpec, denoiser


def parse_weighted(text: str) -> tuple[str, float]:
    """`"art deco:0.6"` -> ("art deco", 0.6); text without a numeric suffix has weight 1."""
    head, sep, tail = text.rpartition(":")
    if sep and head.strip():
        try:
            weight = float(tail)
        except ValueError:
            return text.strip(), 1.0
        if not math.isfinite(weight):
            raise HTError(f"weight of {head.strip()!r} must be a finite number, got {tail!r}")
        return head.strip(), weight
    return text.strip(), 1.0


def parse_strengths(text: str) -> list[float]:
    """`"0.6"` or a sweep `"0,0.25,0.5"`; anything else is a one-line error."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise HTError(f"--strength takes numbers separated by commas, got {text!r}") from None
        if not math.isfinite(value):
            raise HTError(f"--strength values must be finite, got {part!r}")
        values.append(value)
    return values


def combine(weighted: Sequence[tuple[Maps, float]]) -> Maps:
    """Additive composition of weighted maps (see the module docstring)."""
    if not weighted:
        raise HTError("nothing to steer with: give --concept, --reference-image or --intervention")
    layers = set(weighted[0][0])
    for maps, _ in weighted[1:]:
        if set(maps) != layers:
            raise HTError("the interventions to compose steer different layers; they must hook the same ones")
    combined = {}
    for layer in weighted[0][0]:
        delta = sum(w * (maps[layer][0].float() - 1) for maps, w in weighted)
        beta = sum(w * maps[layer][1].float() for maps, w in weighted)
        combined[layer] = (1 + delta, beta)
    return combined


@dataclass
class Generated:
    image: Image.Image
    strength: float | None
    seed: int
    label: str


def generate(
    spec: ModelSpec, pipe: Any, prompt: str, maps: Maps | None, strengths: Sequence[float | None], seeds: Sequence[int]
) -> list[Generated]:
    """One pipeline call per strength, batched over seeds. Strength 0 or None (or no maps)
    runs the pipeline with no hook at all, so it equals unsteered generation bit for bit."""
    model = denoiser(pipe, spec)
    layers = resolve_layers(model, list(maps)) if maps else {}
    results = []
    for strength in strengths:
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        kwargs = dict(generator=generators, **spec.pipeline_kwargs())
        if maps and strength:
            with hooked(model, layers, steering=Steering(maps, strength)):
                images = pipe([prompt] * len(seeds), **kwargs).images
        else:
            images = pipe([prompt] * len(seeds), **kwargs).images
        prefix = "" if strength is None else f"strength {strength:g}, "
        results += [Generated(img, strength, int(s), f"{prefix}seed {s}") for img, s in zip(images, seeds)]
    return results


def generate_per_sample(spec: ModelSpec, pipe: Any, prompt: str, maps: Sequence[Maps], strength: float, seed: int) -> list:
    """One forward pass in which sample i carries maps[i] (a batch that mixes concepts)."""
    model = denoiser(pipe, spec)
    layers = resolve_layers(model, list(maps[0]))
    stacked = {layer: (torch.stack([m[layer][0] for m in maps]), torch.stack([m[layer][1] for m in maps])) for layer in maps[0]}
    generators = [torch.Generator().manual_seed(seed) for _ in maps]
    with hooked(model, layers, steering=Steering(stacked, strength)):
        return pipe([prompt] * len(maps), generator=generators, **spec.pipeline_kwargs()).images


def grid(images: Sequence[Image.Image], labels: Sequence[str], columns: int) -> Image.Image:
    """Images in rows of `columns`, each with its label underneath."""
    width, height = images[0].size
    band = 14
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * width, rows * (height + band)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = (i % columns) * width, (i // columns) * (height + band)
        sheet.paste(image.resize((width, height)), (x, y))
        draw.text((x + 2, y + height + 1), label, fill="black")
    return sheet


class Timer:
    """Wall-clock milliseconds of a block, with CUDA synchronised."""

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ms = (time.perf_counter() - self._start) * 1e3
