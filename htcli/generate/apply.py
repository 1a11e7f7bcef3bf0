"""Steer a diffusers pipeline you built yourself, until the handle is removed: `ht.apply`.

    art_deco = ht.Intervention.load("user/repo", weight_name="art_deco.safetensors")
    with ht.apply(pipe, art_deco, strength=0.6) as handle:
        image = pipe("a lighthouse").images[0]
        handle.strength = 1.0                  # the next call steers harder
    # here the pipeline is untouched again, also after an exception inside the block

The hooks go on the pipeline's denoiser (`pipe.transformer` or `pipe.unet`: PixArt, SDXL/UNet
and FLUX families, or a denoiser passed directly), through `htcli.core.hooks.attach`: the one
mechanism behind `ht steer`, `ht serve` and the Python API. A step window counts denoising steps
with the pipeline's scheduler (`scheduler.step_index`), so it restarts with every call of the
pipeline; on a bare denoiser, with its calls since `apply`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from htcli.core.hooks import Hooks, Steering, attach, module_width
from htcli.core.strength import DEFAULT_STRENGTH, check_strength
from htcli.core.transport import Maps
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


def _scheduler_step(pipe: Any) -> Callable[[], int] | None:
    """The denoising step a call of the pipeline's denoiser belongs to, read from its scheduler:
    `step_index` (None before the first `scheduler.step` of a pipeline call: the first step, which
    is `begin_index` when a pipeline starts part-way). None when `pipe` has no scheduler."""
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        return None
    if not hasattr(scheduler, "step_index"):
        raise HTError(f"a step window needs a scheduler that tracks its step (step_index); "
                      f"{type(scheduler).__name__} does not")

    def step() -> int:
        current = pipe.scheduler  # read at every call: a scheduler swapped after `apply` is the one that runs
        index = getattr(current, "step_index", None)
        return int(index if index is not None else getattr(current, "begin_index", None) or 0)

    return step


def _steps(steps: int | Collection[int] | None) -> Collection[int] | None:
    """The window as a range or a frozenset (a generator is read once, here)."""
    if steps is None:
        return None
    form = f"steps= takes denoising step numbers from 0 (an int, a range or a set of ints), got {steps!r:.60}"
    if isinstance(steps, (bool, float, str)) or not isinstance(steps, (int, Iterable)):
        raise HTError(form)
    window = range(steps, steps + 1) if isinstance(steps, int) else steps
    window = window if isinstance(window, range) else frozenset(window)
    if not window or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in window):
        raise HTError(form)
    return window


class Applied:
    """Maps attached to a pipeline's denoiser: a context manager, and `remove()`. Setting
    `strength` takes effect on the next call of the pipeline."""

    def __init__(self, hooks: Hooks, layers: Sequence[str]) -> None:
        self._hooks, self.layers = hooks, list(layers)

    @property
    def strength(self) -> float | Tensor:
        return self._hooks.steering.strength

    @strength.setter
    def strength(self, value: float) -> None:
        self._hooks.steering.strength = check_strength(value, warn=True)

    @property
    def attached(self) -> bool:
        return self._hooks.attached

    def remove(self) -> None:
        """Take the maps off the pipeline: its output is again exactly the unsteered one."""
        self._hooks.remove()

    def __enter__(self) -> Applied:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def steer_pipeline(pipe: Any, maps: Maps, strength: float | Tensor = 1.0,
                   steps: Collection[int] | None = None) -> Applied:
    """Attach `maps` ({layer: (omega, beta)}, (D,) or per-sample (B, D)) at `strength` (a float, or
    (B, 1) per sample) to `pipe`'s denoiser, steering the denoising `steps` (None: all). The
    layers must exist in the denoiser; `apply` checks their widths first."""
    model = denoiser_of(pipe)
    modules = dict(model.named_modules())
    missing = [name for name in maps if name not in modules]
    if missing:
        raise HTError(f"the maps steer layers {type(model).__name__} does not have: {layer_summary(missing)}")
    layers = {name: modules[name] for name in maps}
    steering = Steering(maps, strength, steps)
    clock = _scheduler_step(pipe) if steps is not None and model is not pipe else None
    return Applied(attach(model, layers, steering=steering, step=clock), list(layers))


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
        valid = (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Intervention)
                 and isinstance(item[1], (int, float)) and not isinstance(item[1], bool) and math.isfinite(item[1]))
        if not valid:
            raise HTError(f"apply takes Intervention objects or (Intervention, weight) pairs, got {item!r:.80}")
        intervention, weight = item
        pairs.append((intervention, float(weight)))
    return pairs


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
    weighted = _weighted(interventions)
    model = denoiser_of(pipe)
    labels = [intervention.concept or f"intervention {k}" for k, (intervention, _) in enumerate(weighted)]
    for (intervention, _), label in zip(weighted, labels):
        check_fits(intervention, model, repr(label), force)
    if isinstance(layers, str):
        raise HTError(f"layers takes a list of patterns, got the string {layers!r}: write [{layers!r}]")
    kept = select_layers([list(i.maps) for i, _ in weighted], [None] * len(weighted), list(layers), labels)
    composed = combine([({name: i.maps[name] for name in names}, float(w)) for (i, w), names in zip(weighted, kept)])
    return steer_pipeline(pipe, composed, check_strength(strength, warn=True), _steps(steps))  # nothing attached before here
