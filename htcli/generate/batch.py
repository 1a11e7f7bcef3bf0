"""Several steering requests in one pipeline call: each sample with its own text, seed, maps and strength.

    planner = Planner(steerer)                          # once; callers serialise `plan`
    planned = [planner.plan(request) for request in requests]
    images = generate_batch(steerer.spec, steerer.pipe, [s for p in planned for s in p.samples])

`Planner.plan` runs `steer()` itself (`htcli.generate.steer`) on a recording stand-in for the
pipeline, so a request's checks, sources, predicted and composed maps, notes and sidecar
metadata are exactly those of `ht steer`; what it records instead of generating are the samples
to generate. `generate_batch` runs samples of any requests together through
`htcli.generate.apply.steer_samples` (as `ht.apply_per_prompt` does): their maps are stacked per
sample, (B, D) per layer, with per-sample strengths (B, 1), and a sample that is not steered gets
the identity map at strength 0, which leaves its activations unchanged bit for bit.

A sample's image does not depend on the company it is batched with, up to floating point: CPU
and GPU kernels choose their blocking by batch size, so sums are re-associated and an image
differs from the same sample generated alone by ~1e-6 (float pixels, CPU), at most one level in
a few PNG pixel values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image

from htcli.core.transport import Maps
from htcli.errors import HTError
from htcli.generate.apply import steer_samples
from htcli.generate.source_maps import Steerer
from htcli.generate.steer import Steered, SteerRequest, parse_steer_steps, steer
from htcli.generate.video import pipeline_outputs
from htcli.models import ModelSpec, build_meta_denoiser


@dataclass(frozen=True)
class Sample:
    """One image to generate: what the pipeline is given and how it is steered."""

    text: str  # the prompt as the pipeline gets it (templated by --method prompt)
    seed: int
    maps: Maps | None  # the request's composed maps, {layer: ((D,), (D,))}; None: not steered
    strength: float  # 0 when not steered
    steps: range | None  # denoising steps to steer; None: all

    @property
    def steered(self) -> bool:
        return bool(self.maps) and self.strength != 0


@dataclass
class Planned:
    """A request as `steer()` made it, with placeholder images, and its samples in image order."""

    steered: Steered
    samples: list[Sample]

    def fill(self, images: Sequence[Image.Image]) -> Steered:
        """The request's result: `steered` with the generated images in place of the placeholders."""
        if len(images) != len(self.samples):
            raise HTError(f"{len(images)} images for {len(self.samples)} samples")
        items = [replace(item, image=image) for item, image in zip(self.steered.images, images)]
        return replace(self.steered, images=items)


class _Recorder:
    """Stands in for the pipeline while `steer()` plans: it records the (text, seed) of every
    sample it is asked for and returns placeholder images. Its denoiser is a meta-device copy
    of the real one (same module names, no memory), so the steering hooks `steer()` attaches
    never touch the model that is generating meanwhile."""

    def __init__(self, spec: ModelSpec, meta_denoiser: torch.nn.Module) -> None:
        setattr(self, spec.denoiser_attr, meta_denoiser)
        self.expected = spec.pipeline_kwargs()
        self.calls: list[tuple[str, int]] = []

    def __call__(self, prompt: str | list[str], *, generator: list[torch.Generator], **kwargs: Any) -> Any:
        if kwargs != self.expected:
            # steer() now calls the pipeline with arguments generate_batch does not pass: say so
            # rather than serve images that differ from `ht steer`'s.
            raise RuntimeError(f"steer() called the pipeline with {kwargs}, generate_batch passes {self.expected}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self.calls += [(text, g.initial_seed()) for text, g in zip(prompts, generator, strict=True)]
        return SimpleNamespace(images=[Image.new("RGB", (1, 1)) for _ in prompts])


class Planner:
    """Plans requests with `steer()` for `generate_batch`. One per loaded model; not thread-safe
    (its recording pipeline keeps the calls of the request it plans): callers serialise `plan`."""

    def __init__(self, steerer: Steerer, predictor: Any = None) -> None:
        self.spec = steerer.spec
        self.predictor = predictor if predictor is not None else steerer.predictor
        self._recorder = _Recorder(self.spec, build_meta_denoiser(self.spec))
        # One planning Steerer for every request, so that whatever a Steerer keeps between
        # requests, it keeps here too; on `steerer`'s device, so that every request's maps meet
        # on the device of the pipeline that generates them (`Steerer.maps_device`); `refine`
        # captures and fits with the real pipeline and denoiser: the steerer's refiner.
        self._steerer = Steerer(self.spec, pipe=self._recorder, predictor=self.predictor, device=steerer.device,
                                refiner=steerer.refiner)

    def plan(self, request: SteerRequest) -> Planned:
        """Everything `ht steer` does for `request` but generating; raises its HTErrors."""
        if request.each:
            raise HTError("each (one image per source) is not batched: compose the sources, or send one request per source")
        recorder = self._recorder
        recorder.calls.clear()
        steered = steer(self._steerer, request)
        steps = parse_steer_steps(request.steer_steps, len(self.spec.timesteps))
        samples = []
        for item in steered.images:
            meta, strength = item.metadata, item.metadata["strength"]
            hooked_here = steered.maps is not None and strength not in (None, 0)
            samples.append(Sample(meta["text"], int(meta["seed"]), steered.maps if hooked_here else None,
                                  float(strength) if hooked_here else 0.0, steps))
        if sorted((s.text, s.seed) for s in samples) != sorted(recorder.calls):
            raise RuntimeError("steer()'s image metadata no longer says which text and seed each image was made from")
        return Planned(steered, samples)


def generate_batch(spec: ModelSpec, pipe: Any, samples: Sequence[Sample]) -> list[Image.Image]:
    """One pipeline call for `samples`, sample i seeded with its own seed and steered with its
    own maps and strength; images in `samples` order. All samples must steer the same steps."""
    if not samples:
        return []
    windows = {s.steps for s in samples}
    if len(windows) > 1:
        raise HTError("samples steering different denoising steps cannot share a batch")
    generators = [torch.Generator().manual_seed(s.seed) for s in samples]
    texts = [s.text for s in samples]
    kwargs = dict(generator=generators, **spec.pipeline_kwargs())
    if not any(s.steered for s in samples):
        return pipeline_outputs(pipe(texts, **kwargs))
    with steer_samples(pipe, [s.maps for s in samples], [s.strength for s in samples], windows.pop()):
        return pipeline_outputs(pipe(texts, **kwargs))
