"""Steered generation: a request (prompt, sources, strengths, seeds) -> images with metadata.

    from htcli.generate.steer import SteerRequest, steer
    from htcli.generate.source_maps import Steerer
    steerer = Steerer(get_model("tiny"))          # loads the pipeline and hypernetwork on first use
    steered = steer(steerer, SteerRequest("a lighthouse", concepts=["art deco:0.6"], strengths=[0, 0.5, 1]))

`Steerer` (`htcli.generate.source_maps`) keeps the pipeline and the `Predictor` loaded between
requests, and makes each source's maps (`compose_sources`). Strength 0 (or no
maps) runs the pipeline with no hook at all, so it equals unsteered generation bit for bit.
`steer_steps` ("all", "0:1", "1:", ":2", "2") limits steering to some denoising steps, `layers`
(glob or `re:` patterns) to some of the intervention's layers, and a source written
"art deco:0.6@PATTERN" acts only on the layers PATTERN matches. A negative strength or weight is
the reverse transport (towards the inverse map; `htcli.core.transport.displacement`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from htcli import __version__
from htcli.core.runtime import Progress
from htcli.core.strength import DEFAULT_STRENGTH, check_strength, extrapolation_notes
from htcli.core.transport import OMEGA_MIN, Maps, stack_maps
from htcli.errors import HTError
from htcli.generate.apply import steer_pipeline
from htcli.generate.compose import (
    Sources,
    Weighted,
    check_pattern,
    combine,
    resolve_sources,
)
from htcli.generate.request_fields import FIELDS, SEED_LIMIT
from htcli.generate.source_maps import Steerer, compose_sources, nearest_records, ood_flag
from htcli.generate.video import Media, pipeline_outputs
from htcli.models import ModelSpec
from htcli.models.interventions import Intervention


def weights_kind(spec: ModelSpec) -> str:
    """What the sidecar's `weights` says the images were made with: "pretrained" (the model's
    published weights), "random" (a small offline test model: `tiny`, `tiny-sdxl`, `tiny-flux`)
    or "random-full-width" (a real architecture under `--random-weights`). Random weights make noise."""
    if spec.random_weights:
        return "random-full-width"
    return "random" if spec.offline else "pretrained"


def check_seeds(seed: int, num_images: int) -> None:
    """HTError unless every seed of a request (seed, seed + 1, ... seed + num_images - 1) is in [0, 2**63)."""
    if not 0 <= seed <= SEED_LIMIT - max(num_images, 1):
        last = f" (with {num_images} images, at most 2**63 - {num_images})" if num_images > 1 else ""
        raise HTError(f"seed= must be from 0 to 2**63 - 1{last}, got {seed}")


def parse_steer_steps(text: str, num_steps: int) -> range | None:
    """The denoising steps to steer, 0-based: a Python slice `START:STOP` (STOP excluded; either
    may be left out) or one step `N`, checked against the model's `num_steps`. `"all"` (or any
    window covering every step) gives None: steer every step."""
    text = text.strip()
    if text == "all":
        return None
    form = f"steer_steps= takes 'all', a step N or a window START:STOP (0-based, STOP excluded), got {text!r}"
    start_text, colon, stop_text = text.partition(":")
    try:
        if colon:
            start = int(start_text) if start_text.strip() else 0
            stop = int(stop_text) if stop_text.strip() else num_steps
        else:
            start = int(text)
            stop = start + 1
    except ValueError:
        raise HTError(form) from None
    if start < 0 or stop < 0:
        raise HTError(f"{form}: steps count from 0")
    if start >= num_steps or stop > num_steps:
        numbers = f"0 to {num_steps - 1}" if num_steps > 1 else "only step 0"
        raise HTError(f"steer_steps={text!r} is past the model's last step: it denoises in {num_steps} "
                      f"step{'s' * (num_steps > 1)}, {numbers}")
    if stop <= start:
        raise HTError(f"steer_steps={text!r} is an empty window: STOP must be greater than START")
    return None if (start, stop) == (0, num_steps) else range(start, stop)


@dataclass
class Generated:
    image: Media  # a PIL image, or a Video from a video pipeline
    strength: float | None
    seed: int
    label: str


def _pipeline(spec: ModelSpec, pipe: Any, prompt: str, seeds: Sequence[int], maps: Maps | None = None,
              strength: float | torch.Tensor = 1.0, steps: range | None = None) -> list:
    """One pipeline call, sample i seeded with seeds[i]; steered (`htcli.generate.apply`) only
    when `maps` are given."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    kwargs = dict(generator=generators, **spec.pipeline_kwargs())
    if not maps:
        return pipeline_outputs(pipe([prompt] * len(seeds), **kwargs))
    with steer_pipeline(pipe, maps, strength, steps):
        return pipeline_outputs(pipe([prompt] * len(seeds), **kwargs))


def generate(
    spec: ModelSpec, pipe: Any, prompt: str, maps: Maps | None, strengths: Sequence[float | None], seeds: Sequence[int],
    steps: range | None = None,
) -> list[Generated]:
    """One pipeline call per strength, batched over seeds, steering the denoising `steps`
    (None: all). Strength 0 or None (or no maps) runs the pipeline with no hook at all, so it
    equals unsteered generation bit for bit."""
    results = []
    for strength in strengths:
        images = _pipeline(spec, pipe, prompt, seeds, maps if strength else None, strength, steps)
        prefix = "" if strength is None else f"strength {strength:g}, "
        results += [Generated(img, strength, int(s), f"{prefix}seed {s}") for img, s in zip(images, seeds)]
    return results


def generate_mixed(spec: ModelSpec, pipe: Any, prompt: str, maps: Sequence[Maps], strength: float,
                   seeds: Sequence[int], steps: range | None = None) -> list[Image.Image]:
    """One pipeline call whose samples carry different maps: for each seed, one image per map
    (seed-major order, len(seeds) * len(maps) images). Maps may steer different layers: a sample
    whose map lacks a layer gets the identity there."""
    stacked = stack_maps([m for _ in seeds for m in maps])  # sample b = (seed b // len(maps), maps b % len(maps))
    batch_seeds = [s for s in seeds for _ in maps]
    return _pipeline(spec, pipe, prompt, batch_seeds, stacked, strength, steps)


@dataclass(frozen=True)
class SteerRequest:
    """What to generate. Sources are "text", "text:weight", "text:weight@LAYERS", (text, weight) or
    (text, weight, LAYERS); reference images are paths or PIL images (averaged into one source).
    Negative strengths and weights steer away from a source (the reverse transport)."""

    prompt: str
    concepts: Sequence[Weighted] = ()
    reference_images: Sequence[Any] = ()
    interventions: Sequence[Weighted] = ()
    strengths: Sequence[float] | None = None  # a sweep: one image per value (and seed); None: DEFAULT_STRENGTH
    method: str = FIELDS["method"].default  # or "prompt": the concept's template applied to the prompt
    seed: int = FIELDS["seed"].default  # image k uses seed + k
    num_images: int = FIELDS["num_images"].default
    each: bool = False  # one image per source in one mixed batch, instead of composing them
    gap_correction: bool = FIELDS["gap_correction"].default
    steer_steps: str = FIELDS["steer_steps"].default  # denoising steps to steer: "all", "0:1", "1:", ":2", "2" (see parse_steer_steps)
    layers: Sequence[str] = ()  # steer only the intervention's layers matching any of these (glob or re:); (): all
    refine: int | None = FIELDS["refine"].default  # N LinEAS steps from each concept's prediction (`htcli.methods.refine`)
    data: Path | None = None  # the dataset --refine reads first; None: runs/<model>/data if built (`refine_dataset`)

    @property
    def strength_values(self) -> list[float]:
        return [DEFAULT_STRENGTH] if self.strengths is None else [float(s) for s in self.strengths]  # checked by `check`

    @property
    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.num_images)]

    def check(self) -> None:
        """Raise HTError for settings that cannot work together (sources are checked later)."""
        if not self.prompt.strip():
            raise HTError("the prompt is empty: say what to generate")
        for name in ("method", "num_images"):
            FIELDS[name].check(getattr(self, name))
        check_seeds(self.seed, self.num_images)
        if self.strengths is not None and not list(self.strengths):
            raise HTError("strengths= is empty: give a sweep of numbers, or None for the default")
        for value in self.strengths or ():
            check_strength(value, "strengths")
        if self.each and self.method == "prompt":
            raise HTError("each=True needs method='hypertransport'; run method='prompt' once per concept instead")
        if self.method == "prompt" and (self.reference_images or self.interventions):
            raise HTError("method='prompt' appends concept text; it cannot use reference_images= or interventions=")
        if isinstance(self.layers, str):
            raise HTError(f"layers takes a list of patterns, got the string {self.layers!r}: write [{self.layers!r}]")
        for pattern in self.layers:
            check_pattern(pattern)
        if self.refine is None and self.data is not None:
            raise HTError("data= is only used with refine= (LinEAS on the dataset's samples of each concept)")
        if self.refine is not None:
            from htcli.methods.refine import check_refine_steps

            check_refine_steps(self.refine)
            if self.method == "prompt" or not self.concepts:
                raise HTError("refine= refines the maps of concepts= sources; give one, with method='hypertransport'")


@dataclass
class SteeredImage:
    image: Media  # a PIL image, or a Video from a video pipeline
    label: str  # caption: "strength 0.5, seed 7" or "Art Deco, seed 0"
    metadata: dict  # JSON-ready: text, sources, strength, seed, model, method, checkpoint...


@dataclass
class Steered:
    """The images of one request, in grid order (rows of `columns`), and the maps behind them."""

    images: list[SteeredImage]
    columns: int
    sources: Sources
    model: str
    method: str
    maps: Maps | None = None  # the composed maps; None with `each` or the prompt method
    notes: list[str] = field(default_factory=list)
    intervention_ms: float | None = None  # concept/image/file -> composed maps; None for the prompt method
    neighbours: list[dict] = field(default_factory=list)  # per predicted source: nearest training concepts, "ood"

    def intervention(self) -> Intervention:
        """The composed maps as an intervention file, to apply again with `ht steer -i`."""
        if self.maps is None:
            raise HTError("export= needs one composed intervention: drop each=True, and use method='hypertransport'")
        method = "composed" if self.sources.files else "hypertransport"
        return Intervention(self.maps, self.model, method, "; ".join(self.sources.labels),
                            info={"sources": self.sources.describe()})


def _reverse_note(per_source: Sequence[tuple[Maps, float]], final: Sequence[Maps],
                  strengths: Sequence[float | None]) -> str | None:
    """A note when reverse transport (a negative weight, or a negative strength of the `final`
    maps) meets neurons with |omega| < OMEGA_MIN, whose inverse is capped rather than exact."""
    inverted = [maps for maps, w in per_source if w < 0]
    if any(s is not None and s < 0 for s in strengths):
        inverted += list(final)
    floored = sum(int((omega.abs() < OMEGA_MIN).sum()) for maps in inverted for omega, _ in maps.values())
    if not floored:
        return None
    return (f"reverse transport: {floored} neuron(s) have |omega| < {OMEGA_MIN:g}, so their inverse is capped at "
            f"gain {1 / OMEGA_MIN:g} rather than exact")


def steer(steerer: Steerer, request: SteerRequest, progress: Progress | None = None) -> Steered:
    """Check the request and its sources, predict and compose the maps, then generate.

    Input errors are raised before the pipeline loads. Sweeps come one column per strength
    and one row per seed; with `each`, one column per source and one row per strength and seed."""
    request.check()
    spec = steerer.spec
    steps = parse_steer_steps(request.steer_steps, len(spec.timesteps))
    sources = resolve_sources(spec, request.concepts, request.reference_images, request.interventions,
                              library=steerer.library)
    strengths: list[float | None] = list(request.strength_values)
    notes, neighbours = extrapolation_notes(strengths), []
    text, per_source, combined, digest, ms = request.prompt, [], None, None, None
    each_maps: list[Maps] = []
    if request.method == "prompt":
        for concept, _ in sources.concepts:
            text = concept.apply(text)
        if any(w != 1 for _, w in sources.concepts):
            notes.append("method='prompt' ignores concept weights")
        if request.strengths is not None:
            notes.append("method='prompt' hooks nothing, so strengths= does not apply: one image per seed")
        if steps is not None:
            notes.append("method='prompt' hooks nothing, so steer_steps= does not apply")
        if request.layers or any(sources.layers):
            notes.append("method='prompt' hooks nothing, so layers= and @LAYERS do not apply")
        strengths = [None]  # nothing is hooked: strength does not apply
    else:
        composed = compose_sources(steerer, sources, layers=request.layers, gap_correction=request.gap_correction,
                                   refine=request.refine, data=request.data, notes=notes)
        per_source, digest, ms, neighbours = composed.per_source, composed.digest, composed.ms, composed.neighbours
        if request.each:
            each_maps = [combine([pair]) for pair in per_source]  # each source at its own weight
        else:
            combined = combine(per_source)
        reverse = _reverse_note(per_source, [combined] if combined else each_maps, strengths)
        if reverse:
            notes.append(reverse)

    seeds = request.seeds
    columns = len(sources) if request.each else len(strengths)
    total = len(strengths) * len(seeds) * (len(sources) if request.each else 1)
    if progress:
        progress(0, total, "loading the pipeline")
    pipe = steerer.pipe
    nearest = nearest_records(neighbours)
    base = {"prompt": request.prompt, "text": text, "sources": sources.describe(), "model": spec.id,
            "method": request.method, "composition": "each" if request.each else "additive",
            "steer_steps": request.steer_steps, "layers": list(request.layers) or None,
            "steered_layers": list(combined) if combined else None, "checkpoint_sha256": digest,
            "ht_version": __version__, "intervention_ms": ms, "weights": weights_kind(spec),
            "refine": request.refine, "nearest_training_concepts": nearest, "ood": ood_flag(neighbours),
            "ood_threshold": neighbours[0]["ood_threshold"] if neighbours else None}
    cells: dict[tuple[int, int], SteeredImage] = {}  # (row, column) -> image
    for j, strength in enumerate(strengths):
        if request.each:
            batch = generate_mixed(spec, pipe, text, each_maps, strength, seeds, steps)  # all sources in one batch
            for b, image in enumerate(batch):
                k, i = divmod(b, len(sources))
                label = f"{sources.labels[i]}, strength {strength:g}, seed {seeds[k]}"
                meta = {**base, "source": sources.labels[i], "strength": strength, "seed": seeds[k],
                        "steered_layers": list(each_maps[i]), "ood": ood_flag(neighbours, [sources.labels[i]])}
                cells[(j * len(seeds) + k, i)] = SteeredImage(image, label, meta)
        else:
            for k, g in enumerate(generate(spec, pipe, text, combined, [strength], seeds, steps)):
                meta = {**base, "source": None, "strength": strength, "seed": g.seed}
                cells[(k, j)] = SteeredImage(g.image, g.label, meta)
        if progress:
            progress(len(cells), total, "" if strength is None else f"strength {strength:g}")
    if spec.offline:
        notes.append(f"{spec.id} has random weights: its images are noise (compare in activation space)")
    return Steered([cells[key] for key in sorted(cells)], columns, sources, spec.id, request.method, combined, notes, ms,
                   neighbours)
