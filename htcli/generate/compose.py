"""What steers an image: sources (concepts, reference images, intervention files), where each
acts, and how their maps compose.

Each source i gives maps (omega_i, beta_i), a weight w_i (`"art deco:0.6"`; default 1) and
optionally the layers it acts on (`"art deco:0.6@transformer_blocks.[01].*"`: a glob, or a regex
as `re:...`, matched against the source's layer names). At its weight a source is the map
T_i^{w_i} (`htcli.core.transport.at_strength`: a negative weight interpolates towards the
inverse map, the reverse transport), and the sources add as displacements from the identity,
layer by layer over the layers each one acts on:

    omega = 1 + sum_i (omega_i^{w_i} - 1),     beta = sum_i beta_i^{w_i}

(for w_i >= 0, omega_i^{w_i} - 1 = w_i (omega_i - 1) and beta_i^{w_i} = w_i beta_i). This is
order-independent, reduces to T_i^{w_i} for a single source, and drops a source exactly at
w_i = 0. The global strength then scales the combined map by the same rule, and the steer-time
`--layers` patterns keep only the layers they match.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from htcli.core.files import load_rgb_images
from htcli.core.hooks import (
    matches,  # the one pattern rule for layer names (glob, or re:)
)
from htcli.core.strength import MAX_STRENGTH, check_strength
from htcli.core.transport import Maps, displacement
from htcli.data.concepts import Concept, ConceptLibrary, load_library
from htcli.errors import HTError
from htcli.models import ModelSpec
from htcli.models.interventions import Intervention

# A source as the caller gives it: "art deco", "art deco:0.6", "art deco:0.6@LAYERS",
# ("art deco", 0.6) or ("art deco", 0.6, LAYERS).
Weighted = str | Path | tuple[str | Path, float] | tuple[str | Path, float, str]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# A Hub reference's revision (`user/repo@v1`, `user/repo@v1/file.safetensors`): its '@' is not a layer pattern's.
HUB_REVISION = re.compile(r"[^/@:\s]+/[^/@:\s]+@[^/@:\s]+")


def check_weight(weight: object, text: str) -> float:
    """`weight` as a float if the strength policy takes it (`htcli.core.strength`), else a one-line
    HTError naming `text`."""
    try:
        return check_strength(weight, "weight")
    except HTError:
        raise HTError(f"weight of {text!r} must be a number from -{MAX_STRENGTH:g} to {MAX_STRENGTH:g}, "
                      f"got {weight!r:.60}") from None


def parse_weighted(text: str, what: str = "concept") -> tuple[str, float]:
    """`"art deco:0.6"` -> ("art deco", 0.6); without a suffix the weight is 1.

    A suffix after the last ':' that contains whitespace belongs to the text ("Star Wars: A New
    Hope", "Apollo: 13"); any other suffix must be a number from -MAX_STRENGTH to MAX_STRENGTH, so
    a typo like "art deco:o.6" is an error rather than a new concept called "art deco:o.6".
    """
    text = text.strip()
    head, sep, tail = text.rpartition(":")
    if not (sep and head.strip()) or any(ch.isspace() for ch in tail):
        return text, 1.0
    weight = _number(tail)
    if weight is None:
        raise HTError(f"{what} {text!r}: the weight {tail!r} after the last ':' is not a number; "
                      f"write e.g. '{head.strip()}:0.6' (or put a space after ':' if it is part of the name)")
    return head.strip(), check_weight(weight, head.strip())


def check_pattern(pattern: str, what: str = "layers=") -> str:
    """`pattern` if it is a usable layer pattern (a glob, or a regex as `re:...`), else HTError."""
    if not pattern.strip():
        raise HTError(f"{what}: the layer pattern is empty")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as error:
            raise HTError(f"{what}: bad layer regex {pattern!r}: {error}") from None
    return pattern


def split_layers(text: str, what: str = "concept") -> tuple[str, str | None]:
    """`"art deco:0.6@transformer_blocks.1*"` -> ("art deco:0.6", "transformer_blocks.1*"); no '@': None.

    Like the weight, a suffix after the last '@' with whitespace inside it belongs to the text
    ("time @ the river"): layer names never have any."""
    head, sep, tail = text.rpartition("@")
    if not (sep and head.strip()) or any(ch.isspace() for ch in tail.strip()):
        return text, None
    return head, check_pattern(tail.strip(), f"{what} {text!r}")


def _weighted(item: Weighted, what: str, is_path: bool = False) -> tuple[str, float, str | None]:
    """(text, weight, layer pattern or None) from "text[:weight][@layers]" or an explicit tuple."""
    if isinstance(item, tuple):
        if len(item) not in (2, 3):
            raise HTError(f"a {what} tuple is (text, weight) or (text, weight, layers), got {item!r}")
        text, weight, *rest = item
        check_weight(float(weight), str(text))
        pattern = check_pattern(rest[0], f"{what} {str(text)!r}") if rest and rest[0] is not None else None
        return str(text), float(weight), pattern
    if is_path and (isinstance(item, Path) or Path(item).is_file()):
        return str(item), 1.0, None  # an existing file is never split at a ':' or '@' (C:\maps.safetensors)
    text, pattern = split_layers(item, what)
    revision = HUB_REVISION.match(item) if is_path else None
    if revision and len(text) < revision.end():  # the '@' split at was the revision's
        text, pattern = item, None
    if is_path and Path(text).is_file():
        return text, 1.0, pattern
    return (*parse_weighted(text, what), pattern)


def combine(weighted: Sequence[tuple[Maps, float]]) -> Maps:
    """Additive composition of weighted maps (see the module docstring); each map {layer: ((D,), (D,))}.

    The result steers every layer some source names; a source acts only on its own layers."""
    if not weighted:
        raise HTError("nothing to steer with: give concepts=, reference_images= or interventions=")
    combined = {}
    for layer in dict.fromkeys(name for maps, _ in weighted for name in maps):
        parts = [displacement(*maps[layer], weight) for maps, weight in weighted if layer in maps]
        combined[layer] = (1 + sum(delta for delta, _ in parts), sum(shift for _, shift in parts))
    return combined


def _runs(numbers: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0..2,5"."""
    runs: list[list[int]] = []
    for number in sorted(set(numbers)):
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return ",".join(str(run[0]) if len(run) == 1 else f"{run[0]}..{run[-1]}" for run in runs)


def layer_summary(names: Sequence[str]) -> str:
    """Layer names in short, for error messages: names that differ only in their last numeric part
    are written once, `transformer_blocks.{0..27}.norm1` (brace ranges, not a glob: the pattern
    for those is `transformer_blocks.*.norm1`)."""
    groups: dict[tuple[str, ...], list[int]] = {}  # (head, tail) around the last number -> numbers
    for name in names:
        parts = name.split(".")
        digits = [i for i, part in enumerate(parts) if part.isdigit()]
        if not digits:
            groups[(name,)] = []
            continue
        i = digits[-1]
        groups.setdefault((".".join(parts[:i]), ".".join(parts[i + 1:])), []).append(int(parts[i]))
    out = []
    for key, numbers in groups.items():
        if not numbers:
            out.append(key[0])
            continue
        middle = str(numbers[0]) if len(set(numbers)) == 1 else "{" + _runs(numbers) + "}"
        out.append(".".join(part for part in (key[0], middle, key[1]) if part))
    return ", ".join(out)


def select_layers(
    known: Sequence[Sequence[str]], own: Sequence[str | None], layers: Sequence[str], labels: Sequence[str]
) -> list[list[str]]:
    """The layers each source acts on: of its `known` layer names, those its own pattern (None:
    all) and any of the steer-time `layers` patterns (none given: all) match.

    Every pattern must match a layer it is applied to, and every source must keep at least one
    layer; otherwise a one-line HTError names the layers there are."""
    every = list(dict.fromkeys(name for names in known for name in names))
    for pattern in layers:
        if not any(matches(pattern, name) for name in every):
            raise HTError(f"layers={pattern!r} matches none of the intervention's layers: {layer_summary(every)}")
    kept = []
    for names, pattern, label in zip(known, own, labels, strict=True):
        if pattern is not None and not any(matches(pattern, name) for name in names):
            raise HTError(f"layer pattern {pattern!r} of {label!r} matches none of its layers: {layer_summary(names)}")
        own_names = [name for name in names if pattern is None or matches(pattern, name)]
        chosen = [name for name in own_names if not layers or any(matches(p, name) for p in layers)]
        if not chosen:
            raise HTError(f"layers={list(layers)!r} matches none of the layers {label!r} acts on: "
                          f"{layer_summary(own_names)}")
        kept.append(chosen)
    return kept


@dataclass
class Sources:
    """Checked sources, in the order their maps come: concepts, then the reference images
    (averaged into one source of weight 1), then intervention files."""

    concepts: list[tuple[Concept, float]] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)  # PIL RGB images
    image_names: list[str] = field(default_factory=list)
    files: list[tuple[Intervention, float, str]] = field(default_factory=list)  # (file, weight, path)
    layers: list[str | None] = field(default_factory=list)  # per source, in `labels` order: its @LAYERS or None

    def __len__(self) -> int:
        return len(self.concepts) + bool(self.images) + len(self.files)

    @property
    def labels(self) -> list[str]:
        """One short name per source, for captions and `each` images."""
        return ([c.name for c, _ in self.concepts] + ["reference image"] * bool(self.images)
                + [f.concept or Path(path).stem for f, _, path in self.files])

    def describe(self) -> list[dict]:
        """The sources as JSON-ready records, for sidecars and exported files (with "layers", the
        source's @LAYERS pattern, when it has one)."""
        records = ([{"concept": c.name, "weight": w} for c, w in self.concepts]
                   + [{"reference_images": self.image_names, "weight": 1.0}] * bool(self.images)
                   + [{"intervention": path, "weight": w} for _, w, path in self.files])
        return [record | ({"layers": pattern} if pattern else {})
                for record, pattern in zip(records, self.layers, strict=True)]

    def known_layers(self, predicted: Sequence[str]) -> list[list[str]]:
        """Every layer each source has maps for, in `labels` order: `predicted` (the hypernetwork's
        layers) for concepts and reference images, the file's own for intervention files."""
        return [list(predicted)] * (len(self.concepts) + bool(self.images)) + [list(f.maps) for f, _, _ in self.files]


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
    "text:weight", "text:weight@LAYERS", (text, weight) or (text, weight, LAYERS)."""
    library = library or load_library()
    sources = Sources()
    for item in concepts:
        text, weight, pattern = _weighted(item, "concept")
        sources.concepts.append((library.resolve(text), weight))
        sources.layers.append(pattern)
    paths = [p for p in reference_images if isinstance(p, (str, Path))]
    loaded = iter(load_rgb_images(paths, "reference image"))
    for index, item in enumerate(reference_images):
        if isinstance(item, (str, Path)):
            sources.images.append(next(loaded))
            sources.image_names.append(str(item))
        else:
            sources.images.append(item.convert("RGB"))
            sources.image_names.append(f"<image {index}>")
    sources.layers += [None] * bool(sources.images)  # the images are one source, acting on all its layers
    for item in interventions:
        path, weight, pattern = _weighted(item, "intervention", is_path=True)
        loaded_file = Intervention.load(path)  # a local file, or a Hub reference
        loaded_file.check(spec.id, _widths(spec, list(loaded_file.maps)), where=path)
        sources.files.append((loaded_file, weight, path))
        sources.layers.append(pattern)
    if not len(sources):
        raise HTError("nothing to steer with: give concepts=, reference_images= or interventions=")
    return sources
