"""Interventions managed like diffusers' LoRA adapters: loaded under names, weighted, listed,
unloaded; and one intervention per prompt of a batch.

    ht.load(pipe, art_deco, name="deco")                   # weight 1
    ht.load(pipe, ink, name="ink", weight=0.3)
    ht.set_weights(pipe, {"deco": 0.6, "ink": 0.3}, strength=0.8)
    ht.active(pipe)        # Loaded(deco=0.6, ink=0.3; strength 0.8, steps all)
    ht.unload(pipe, "ink")                                 # one; ht.unload(pipe): all
    with ht.apply_per_prompt(pipe, [art_deco, None, (ink, 0.5)], strength=0.6):
        images = pipe(["a lighthouse", "a kettle", "a fox"]).images   # each prompt its own maps

The loaded interventions compose as `ht steer` composes its sources (`composed_maps`: weights
add displacements from the identity, then the global strength scales the sum), into one
steering named "ht_adapters" (`htcli.core.diffusers_hooks`). What was loaded lives on that
steering's root hook, in the denoiser's hook registry, not in a Python handle: `ht.active` and
`ht.unload` work on any pipeline, also when nothing of `ht.load`'s was kept. A change of weights
takes effect on the next pipeline call. `ht.apply` handles are separate steerings: they act on
the output of the loaded ones.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from htcli.core.steering import SteeringConfig, steering_window
from htcli.core.strength import DEFAULT_STRENGTH, check_strength
from htcli.errors import HTError
from htcli.generate.apply import (
    Applicable,
    Applied,
    composed_maps,
    denoiser_of,
    pipeline_step,
    steer_samples,
)
from htcli.generate.compose import check_weight
from htcli.models.interventions import Intervention

ADAPTERS = "ht_adapters"  # the name of the steering the loaded interventions make together


@dataclass(frozen=True)
class Loaded:
    """The interventions loaded on a pipeline (`ht.active`): name -> weight, in loading order,
    with the global strength and steps; `interventions` and `layers` (each one's pattern, or
    None) by name."""

    weights: dict[str, float] = field(default_factory=dict)
    strength: float = DEFAULT_STRENGTH
    steps: Collection[int] | None = None
    interventions: dict[str, Intervention] = field(default_factory=dict, repr=False)
    layers: dict[str, str | None] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        weights = ", ".join(f"{name}={weight:g}" for name, weight in self.weights.items())
        steps = "all" if self.steps is None else sorted(self.steps)
        return f"Loaded({weights or 'nothing'}; strength {self.strength:g}, steps {steps})"


def active(pipe: Any) -> Loaded:
    """What `ht.load` put on `pipe`'s denoiser (an empty `Loaded` when nothing)."""
    from htcli.core.diffusers_hooks import steering

    root = steering(denoiser_of(pipe), ADAPTERS)
    return root.sources if root is not None else Loaded()


def _attach(pipe: Any, loaded: Loaded) -> None:
    """Steer `pipe` by `loaded` from its next call (every check before anything changes)."""
    from htcli.core.diffusers_hooks import apply_steering, remove_steering, steering, update_steering

    model = denoiser_of(pipe)
    if not loaded.weights:
        remove_steering(model, ADAPTERS)
        return
    names = list(loaded.weights)
    maps = composed_maps(model, [(loaded.interventions[n], loaded.weights[n]) for n in names],
                         own_layers=[loaded.layers[n] for n in names])
    config = SteeringConfig(maps, loaded.strength, loaded.steps)
    read_step = pipeline_step(pipe) if loaded.steps is not None else None
    if steering(model, ADAPTERS) is None:
        apply_steering(model, config, ADAPTERS)
    else:
        update_steering(model, config, ADAPTERS)
    root = steering(model, ADAPTERS)
    root.sources, root.read_step = loaded, read_step


def load(pipe: Any, intervention: Intervention, name: str | None = None, weight: float = 1.0,
         layers: str | None = None) -> str:
    """Load `intervention` on `pipe` under `name` (default: its concept), at `weight`, acting on
    the layers the glob (or `re:`) pattern `layers` matches (None: all of its own); returns the
    name. It steers from the next pipeline call, composed with the ones loaded before."""
    if not isinstance(intervention, Intervention):
        raise HTError(f"load takes an Intervention, got {type(intervention).__name__} "
                      "(for concept text, use HyperTransport.intervention first)")
    name = name if name is not None else intervention.concept
    if not isinstance(name, str) or not name:
        raise HTError("name must be a non-empty string: this intervention has no concept to name it by")
    current = active(pipe)
    if name in current.weights:
        raise HTError(f"an intervention named {name!r} is loaded already: unload(pipe, {name!r}) first, "
                      "or pick another name")
    loaded = replace(current, weights=current.weights | {name: check_weight(weight, name)},
                     interventions=current.interventions | {name: intervention}, layers=current.layers | {name: layers})
    _attach(pipe, loaded)
    return name


_UNCHANGED: Any = object()


def set_weights(pipe: Any, weights: Mapping[str, float] | None = None, *, strength: float | None = None,
                steps: int | Collection[int] | None = _UNCHANGED) -> None:
    """Change the weights of loaded interventions by name (the others keep theirs), and the global
    `strength` and `steps` (None: every step) when given; from the next pipeline call."""
    current = active(pipe)
    unknown = [name for name in weights or {} if name not in current.weights]
    if unknown:
        raise HTError(f"no intervention named {', '.join(map(repr, unknown))} is loaded; loaded: "
                      f"{', '.join(current.weights) or 'none'}")
    changed = replace(current, weights=current.weights | {n: check_weight(w, n) for n, w in (weights or {}).items()},
                      strength=current.strength if strength is None else check_strength(strength),
                      steps=current.steps if steps is _UNCHANGED else steering_window(steps))
    _attach(pipe, changed)


def unload(pipe: Any, name: str | Sequence[str] | None = None) -> None:
    """Take the intervention `name` (or several names) off `pipe`; None: all of them. The pipeline
    is exactly the unsteered one again once none is left."""
    current = active(pipe)
    names = list(current.weights) if name is None else [name] if isinstance(name, str) else list(name)
    unknown = [n for n in names if n not in current.weights]
    if unknown:
        raise HTError(f"no intervention named {', '.join(map(repr, unknown))} is loaded; loaded: "
                      f"{', '.join(current.weights) or 'none'}")
    keep = [n for n in current.weights if n not in names]
    _attach(pipe, replace(current, weights={n: current.weights[n] for n in keep},
                          interventions={n: current.interventions[n] for n in keep},
                          layers={n: current.layers[n] for n in keep}))


def apply_per_prompt(pipe: Any, interventions: Sequence[Applicable | Sequence[Applicable] | None],
                     strength: float = DEFAULT_STRENGTH, steps: int | Collection[int] | None = None,
                     layers: Sequence[str] = (), images_per_prompt: int = 1) -> Applied:
    """Steer prompt i of the pipeline's next calls by `interventions[i]` (an intervention, a list
    composed as `ht.apply` composes one, or None: unsteered), in one batched call, until the
    handle is removed. Give the pipeline as many prompts, and its `num_images_per_prompt` as
    `images_per_prompt`; the images equal separate calls up to floating point (docs/serve.md,
    "Batching")."""
    if isinstance(interventions, (Intervention, str)) or not isinstance(interventions, Sequence) or not interventions:
        raise HTError("apply_per_prompt takes a list with one entry per prompt: an Intervention, a list of them, "
                      "or None for a prompt left unsteered")
    if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise HTError(f"images_per_prompt takes a whole number from 1, got {images_per_prompt!r}")
    model = denoiser_of(pipe)
    composed = [composed_maps(model, item, layers) if item is not None else None for item in interventions]
    maps = [m for m in composed for _ in range(images_per_prompt)]  # the pipeline repeats each prompt in place
    strength = check_strength(strength)
    return steer_samples(pipe, maps, [strength] * len(maps), steering_window(steps))
