"""What steers an image: sources (concepts, reference images, intervention files) and how their
maps compose.

Each source i gives maps (omega_i, beta_i) and a weight w_i (`"art deco:0.6"`; default 1). They
combine additively in displacement from the identity,

    omega = 1 + sum_i w_i (omega_i - 1),     beta = sum_i w_i beta_i,

which is order-independent, reduces to T_i^{w_i} for a single source, and drops a source
exactly at w_i = 0. The global strength then scales the combined map as usual.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from htcli.core.files import load_rgb_images
from htcli.core.interventions import Intervention, load_intervention
from htcli.core.transport import Maps
from htcli.data.concepts import Concept, ConceptLibrary, load_library
from htcli.errors import HTError
from htcli.models import ModelSpec

# A source as the caller gives it: "art deco", "art deco:0.6", or ("art deco", 0.6).
Weighted = str | Path | tuple[str | Path, float]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_weighted(text: str, what: str = "concept") -> tuple[str, float]:
    """`"art deco:0.6"` -> ("art deco", 0.6); without a suffix the weight is 1.

    A suffix after the last ':' that contains whitespace belongs to the text ("Star Wars: A New
    Hope"); any other suffix must be a finite number, so a typo like "art deco:o.6" is an error
    rather than a new concept called "art deco:o.6".
    """
    head, sep, tail = text.rpartition(":")
    if not (sep and head.strip()):
        return text.strip(), 1.0
    weight = _number(tail)
    if weight is None:
        if tail.strip() and any(ch.isspace() for ch in tail):
            return text.strip(), 1.0
        raise HTError(f"{what} {text!r}: the weight {tail!r} after the last ':' is not a number; "
                      f"write e.g. '{head.strip()}:0.6' (or put a space after ':' if it is part of the name)")
    if not math.isfinite(weight):
        raise HTError(f"weight of {head.strip()!r} must be a finite number, got {tail!r}")
    return head.strip(), weight


def _weighted(item: Weighted, what: str, is_path: bool = False) -> tuple[str, float]:
    """A (text, weight) pair from a string with an optional ':weight' or an explicit tuple."""
    if isinstance(item, tuple):
        text, weight = item
        if not math.isfinite(float(weight)):
            raise HTError(f"weight of {str(text)!r} must be a finite number, got {weight!r}")
        return str(text), float(weight)
    if is_path and (isinstance(item, Path) or Path(item).is_file()):
        return str(item), 1.0  # an existing file is never split at a ':' (C:\maps.safetensors)
    return parse_weighted(item, what)


def combine(weighted: Sequence[tuple[Maps, float]]) -> Maps:
    """Additive composition of weighted maps (see the module docstring); each map {layer: ((D,), (D,))}."""
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
class Sources:
    """Checked sources, in the order their maps come: concepts, then the reference images
    (averaged into one source of weight 1), then intervention files."""

    concepts: list[tuple[Concept, float]] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)  # PIL RGB images
    image_names: list[str] = field(default_factory=list)
    files: list[tuple[Intervention, float, str]] = field(default_factory=list)  # (file, weight, path)

    def __len__(self) -> int:
        return len(self.concepts) + bool(self.images) + len(self.files)

    @property
    def labels(self) -> list[str]:
        """One short name per source, for captions and `each` images."""
        return ([c.name for c, _ in self.concepts] + ["reference image"] * bool(self.images)
                + [f.concept or Path(path).stem for f, _, path in self.files])

    def describe(self) -> list[dict]:
        """The sources as JSON-ready records, for sidecars and exported files."""
        return ([{"concept": c.name, "weight": w} for c, w in self.concepts]
                + [{"reference_images": self.image_names, "weight": 1.0}] * bool(self.images)
                + [{"intervention": path, "weight": w} for _, w, path in self.files])


def _widths(spec: ModelSpec, names: Sequence[str]) -> dict[str, int]:
    """Widths of the named modules of the spec's denoiser (meta device: no weights are loaded)."""
    from htcli.core.hooks import module_width
    from htcli.models import build_meta_denoiser

    modules = dict(build_meta_denoiser(spec).named_modules())
    return {name: module_width(modules[name]) for name in names if name in modules}


def resolve_sources(
    spec: ModelSpec,
    concepts: Sequence[Weighted] = (),
    reference_images: Sequence[Any] = (),
    interventions: Sequence[Weighted] = (),
    library: ConceptLibrary | None = None,
) -> Sources:
    """Parse weights, look concepts up, open images and check intervention files against the
    model: every input error is raised here, before anything heavy loads.

    `reference_images` are paths or PIL images; `concepts` and `interventions` are "text",
    "text:weight" or (text, weight)."""
    library = library or load_library()
    sources = Sources()
    for item in concepts:
        text, weight = _weighted(item, "concept")
        sources.concepts.append((library.resolve(text), weight))
    paths = [p for p in reference_images if isinstance(p, (str, Path))]
    loaded = iter(load_rgb_images(paths, "reference image"))
    for index, item in enumerate(reference_images):
        if isinstance(item, (str, Path)):
            sources.images.append(next(loaded))
            sources.image_names.append(str(item))
        else:
            sources.images.append(item.convert("RGB"))
            sources.image_names.append(f"<image {index}>")
    for item in interventions:
        path, weight = _weighted(item, "intervention", is_path=True)
        loaded_file = load_intervention(Path(path))
        loaded_file.check(spec.id, _widths(spec, list(loaded_file.maps)), where=path)
        sources.files.append((loaded_file, weight, path))
    if not len(sources):
        raise HTError("nothing to steer with: give --concept, --reference-image or --intervention")
    return sources
