"""Steer a diffusers pipeline you built yourself, until the handle is removed: `ht.apply`.

    art_deco = ht.Intervention.load("user/repo", weight_name="art_deco.safetensors")
    with ht.apply(pipe, art_deco, strength=0.6) as handle:
        image = pipe("a lighthouse").images[0]
        handle.strength = 1.0                  # the next call steers harder
    # here the pipeline is untouched again, also after an exception inside the block

The maps go on the pipeline's denoiser (`pipe.transformer` or `pipe.unet`: PixArt, SDXL/UNet
and FLUX families, or a denoiser passed directly) as a diffusers hook,
`htcli.core.diffusers_hooks.apply_steering`: the one mechanism behind `ht steer`, `ht serve`
(`steer_samples`: one map per sample of a batch) and the Python API (also `ht.load`). A step
window reads the pipeline's scheduler (`scheduler.step_index`, which every pipeline call resets
when it sets its timesteps), so it restarts with every call of the pipeline; on a bare denoiser,
it counts the denoiser's timesteps.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from htcli.core.hooks import module_width
from htcli.core.steering import SteeringConfig
from htcli.core.strength import DEFAULT_STRENGTH, check_strength
from htcli.core.transport import Maps, stack_maps
from htcli.errors import HTError
from htcli.generate.compose import combine, layer_summary, select_layers
from htcli.models.identity import model_ids
from htcli.models.interventions import Intervention

DENOISER_ATTRIBUTES = ("transformer", "unet")  # where diffusers pipelines keep their denoiser


def denoiser_of(pipe: Any) -> nn.Module:
    """The denoiser of a diffusers pipeline (its `transformer` or `unet`), or `pipe` itself when it
    is a module (a denoiser passed directly)."""
    for name in DENOISER_ATTRIBUTES:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return getattr(module, "_orig_mod", module)  # torch.compile's wrapper: hook the modules it compiled
    if isinstance(pipe, nn.Module):
        return getattr(pipe, "_orig_mod", pipe)
    raise HTError(f"{type(pipe).__name__} has no denoiser to steer: expected a diffusers pipeline with a "
                  f"{' or '.join(DENOISER_ATTRIBUTES)}, or the denoiser module itself")


def pipeline_step(pipe: Any) -> Callable[[], int] | None:
    """The denoising step a call of the pipeline's denoiser belongs to, read from its scheduler:
    `step_index` (None before the first `scheduler.step` of a pipeline call: the first step, which
    is `begin_index` when a pipeline starts part-way). None when `pipe` has no scheduler."""
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or isinstance(pipe, nn.Module):  # a bare denoiser: it counts its timesteps
        return None
    if not hasattr(scheduler, "step_index"):
        raise HTError(f"a step window needs a scheduler that tracks its step (step_index); "
                      f"{type(scheduler).__name__} does not")

    def step() -> int:
        current = pipe.scheduler  # read at every call: a scheduler swapped after `apply` is the one that runs
        index = getattr(current, "step_index", None)
        return int(index if index is not None else getattr(current, "begin_index", None) or 0)

    return step




class Applied:
    """A steering attached to a pipeline's denoiser, by name: a context manager, and `remove()`.
    Setting `strength` takes effect on the next call of the pipeline."""

    def __init__(self, denoiser: nn.Module, name: str) -> None:
        self._denoiser, self.name = denoiser, name
        self.layers = list(self._config.steered)

    @property
    def _config(self) -> SteeringConfig:
        from htcli.core.diffusers_hooks import steering

        root = steering(self._denoiser, self.name)
        if root is None:
            raise HTError(f"the steering {self.name!r} was removed from this pipeline")
        return root.config

    @property
    def strength(self) -> float | Tensor:
        return self._config.strength

    @strength.setter
    def strength(self, value: float) -> None:
        self._config.strength = check_strength(value, warn=True)

    @property
    def attached(self) -> bool:
        from htcli.core.diffusers_hooks import steering_names

        return self.name in steering_names(self._denoiser)

    def remove(self) -> None:
        """Take the maps off the pipeline: its output is again exactly the unsteered one."""
        from htcli.core.diffusers_hooks import remove_steering

        remove_steering(self._denoiser, self.name)

    def __enter__(self) -> Applied:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        if not self.attached:
            return f"<Applied {self.name!r}: removed>"
        strength = "per sample" if isinstance(self.strength, Tensor) else f"{self.strength:g}"
        return f"<Applied {self.name!r}: {len(self.layers)} layers on {type(self._denoiser).__name__}, strength {strength}>"


def steer_pipeline(pipe: Any, maps: Maps, strength: float | Tensor = 1.0,
                   steps: Collection[int] | None = None) -> Applied:
    """Attach `maps` ({layer: (omega, beta)}, (D,) or per-sample (B, D)) at `strength` (a float, or
    (B, 1) per sample) to `pipe`'s denoiser, steering the denoising `steps` (None: all), under the
    first free name of "ht_steering", "ht_steering.1", ... The layers must exist in the denoiser;
    `apply` checks their widths first."""
    from htcli.core.diffusers_hooks import STEERING, apply_steering, free_name

    model = denoiser_of(pipe)
    config = SteeringConfig(maps, strength, steps)
    name = free_name(model, STEERING)
    apply_steering(model, config, name, read_step=pipeline_step(pipe) if config.steps is not None else None)
    return Applied(model, name)


def steer_samples(pipe: Any, maps: Sequence[Maps | None], strengths: Sequence[float],
                  steps: Collection[int] | None = None) -> Applied:
    """Steer sample i of the pipeline's next batches by `maps[i]` at `strengths[i]` (None or
    strength 0: unsteered, bit for bit), in one pipeline call: the maps stacked per sample,
    (B, D) per layer, with (B, 1) strengths, the identity at strength 0 for a sample that is not
    steered. The batch is the pipeline's prompts in order, one image each (the copies
    classifier-free guidance stacks are steered alike)."""
    if len(maps) != len(strengths):
        raise HTError(f"{len(maps)} maps for {len(strengths)} strengths: give one of each per sample")
    steered = [bool(m) and s != 0 for m, s in zip(maps, strengths)]
    stacked = stack_maps([m if on else None for m, on in zip(maps, steered)])
    if not stacked:
        raise HTError("none of the samples is steered: call the pipeline without steer_samples")
    per_sample = torch.tensor([[float(s) if on else 0.0] for s, on in zip(strengths, steered)])
    return steer_pipeline(pipe, stacked, per_sample, steps)


def check_fits(intervention: Intervention, model: nn.Module, label: str, force: bool = False) -> None:
    """One line, unless every layer `intervention` steers exists in `model` with its width and,
    unless `force`, `model` is not known to be another model than the one it was made for."""
    modules = dict(model.named_modules())
    made_for = f"{label} (made for {intervention.model or 'an unknown model'})"
    missing = [name for name in intervention.maps if name not in modules]
    if missing:
        raise HTError(f"{made_for} steers layers this pipeline's {type(model).__name__} does not have: "
                      f"{layer_summary(missing)}")
    for name, width in intervention.widths.items():
        have = module_width(modules[name])
        if have != width:
            raise HTError(f"{made_for} has width {width} at {name}, but this pipeline's "
                          f"{type(model).__name__} has width {have} there")
    known = [] if force or not intervention.model else model_ids(model)
    if known and intervention.model not in known:
        raise HTError(f"{label} was made for model {intervention.model!r}, and this pipeline's {type(model).__name__} "
                      f"is {' or '.join(map(repr, known))}; pass force=True to apply it anyway")


Applicable = Intervention | tuple[Intervention, float]


def _weighted(interventions: Applicable | Sequence[Applicable]) -> list[tuple[Intervention, float]]:
    """(intervention, weight) pairs from what `apply` was given, each checked."""
    if isinstance(interventions, str) or not isinstance(interventions, (Intervention, tuple, Sequence)):
        raise HTError(f"apply takes Intervention objects or (Intervention, weight) pairs, got {interventions!r:.80} "
                      "(for concept text, use HyperTransport.intervention first)")
    items = [interventions] if isinstance(interventions, (Intervention, tuple)) else list(interventions)
    if not items:
        raise HTError("nothing to apply: give an Intervention or a list of them")
    pairs = []
    for item in items:
        if isinstance(item, Intervention):
            item = (item, 1.0)
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Intervention)):
            raise HTError(f"apply takes Intervention objects or (Intervention, weight) pairs, got {item!r:.80}")
        intervention, weight = item
        pairs.append((intervention, check_strength(weight, "weight")))
    return pairs


def composed_maps(model: nn.Module, interventions: Applicable | Sequence[Applicable], layers: Sequence[str] = (),
                  own_layers: Sequence[str | None] | None = None, force: bool = False) -> Maps:
    """The maps of `interventions` (see `apply`) composed as `ht steer` composes its sources, each
    checked against `model` first (`force`: also when made for another model); `own_layers`: per
    intervention, a pattern of the layers it acts on (None: all), as `ht steer`'s `-i FILE@LAYERS`."""
    weighted = _weighted(interventions)
    labels = [intervention.concept or f"intervention {k}" for k, (intervention, _) in enumerate(weighted)]
    for (intervention, _), label in zip(weighted, labels):
        check_fits(intervention, model, repr(label), force)
    if isinstance(layers, str):
        raise HTError(f"layers takes a list of patterns, got the string {layers!r}: write [{layers!r}]")
    own = list(own_layers) if own_layers is not None else [None] * len(weighted)
    kept = select_layers([list(i.maps) for i, _ in weighted], own, list(layers), labels)
    return combine([({name: i.maps[name] for name in names}, float(w)) for (i, w), names in zip(weighted, kept)])


def apply(
    pipe: Any,
    interventions: Applicable | Sequence[Applicable],
    strength: float = DEFAULT_STRENGTH,
    steps: int | Collection[int] | None = None,
    layers: Sequence[str] = (),
    force: bool = False,
) -> Applied:
    """Steer `pipe` (a diffusers pipeline, or its denoiser) with one or several interventions
    until the returned handle is removed (or its `with` block ends).

    interventions: an `Intervention`, or a list of them, each optionally as (intervention, weight);
        several compose additively, as `ht steer` composes its sources.
    strength: the global strength (0: exactly the unsteered model; negative: the reverse transport).
    steps: the denoising steps to steer, 0-based (an int, a range or a set); None: all.
    layers: glob (or `re:`) patterns; only the intervention layers they match are steered.
    force: apply an intervention made for another model whose layers and widths fit.

    Maps whose layers or widths do not fit the pipeline's denoiser are refused in one line, and
    so are maps made for another model, even when they fit, unless `force`."""
    composed = composed_maps(denoiser_of(pipe), interventions, layers, force=force)
    return steer_pipeline(pipe, composed, check_strength(strength, warn=True), steps)  # nothing attached before here
