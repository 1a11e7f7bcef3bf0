"""Activation hooks for a forward pass: choose layers by name, capture their pooled outputs,
steer them with per-neuron affine maps.

`attach` puts capture and steering hooks on modules chosen by name patterns and returns a
handle whose `remove()` takes every one of them off again; `hooked` does the same for a `with`
block, also after an exception:

    layers = resolve_layers(pipe.transformer, ["transformer_blocks.*.norm2"])
    with hooked(pipe.transformer, layers, capture=True, stop_early=True) as run:
        pipe(prompt, num_inference_steps=1)      # stops right after the last hooked layer
    run.pooled["transformer_blocks.3.norm2"]     # (B, D) float32

Both are diffusers hooks (`htcli.core.diffusers_hooks`): steering is `apply_steering` under the
first free name of "ht_steering", "ht_steering.1", ... (so that steerings nest: the later one
acts on the earlier one's output), capture an observing hook attached after it, which records
the steered output. What part of a module's output is its activation, and the steering math,
are `htcli.core.steering`'s.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor, nn

from htcli.core.steering import SteeringConfig, layer_output
from htcli.errors import HTError


class StopForward(Exception):
    """Raised from a hook to end a forward pass once every captured layer has run."""


@dataclass
class HookRun:
    """What a hooked forward pass recorded."""

    pooled: dict[str, Tensor] = field(default_factory=dict)  # layer name -> (B, D) float32


def matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def resolve_layers(model: nn.Module, patterns: Sequence[str]) -> dict[str, nn.Module]:
    """Modules whose qualified names match any pattern (glob, or regex with a `re:` prefix).

    Returned in the model's registration order. A pattern that matches nothing is an error
    listing the closest module names, so a typo never means a silent no-op.
    """
    if not patterns:
        raise HTError("no layer patterns given")
    modules = dict(model.named_modules())
    selected: dict[str, nn.Module] = {}
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as error:
                raise HTError(f"bad layer regex {pattern!r}: {error}") from None
        hits = [name for name in modules if name and matches(pattern, name)]
        if not hits:
            close = difflib.get_close_matches(pattern.removeprefix("re:"), list(modules), n=5, cutoff=0.5)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise HTError(f"layer pattern {pattern!r} matches no module{hint}")
        for name in hits:
            selected[name] = modules[name]
    return {name: selected[name] for name in modules if name in selected}


def module_width(module: nn.Module) -> int:
    """Number of output channels (neurons) of a module, known without running it."""
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    if isinstance(module, nn.GroupNorm):
        return int(module.num_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    if isinstance(module, nn.Conv2d):
        return int(module.out_channels)
    norm = getattr(module, "norm", None)
    if "AdaLayerNorm" in type(module).__name__ and isinstance(norm, nn.Module):  # SD3.5: SD35AdaLayerNormZeroX
        return module_width(norm)  # diffusers' adaptive norms: not the width of their modulation's linear layer
    # Composite modules (blocks, attention, feed-forward): their last linear or conv layer. (In a
    # FLUX dual-stream block that is the text stream's, as wide as the image stream it outputs.)
    last = None
    for child in module.modules():
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            last = child
    if last is None:
        raise HTError(f"cannot infer the width of {type(module).__name__}; hook a norm or linear layer")
    return module_width(last)


def _pool(z: Tensor) -> Tensor:
    """Mean over tokens or pixels: (B, T, D) or (B, C, H, W) -> (B, D), in float32."""
    if z.ndim == 3:
        return z.float().mean(dim=1)
    if z.ndim == 4:
        return z.float().mean(dim=(2, 3))
    if z.ndim == 2:
        return z.float()
    raise HTError(f"cannot pool an activation of shape {tuple(z.shape)}")


class Hooks:
    """Capture and steering hooks on a model, from `attach` until `remove()`.

    `run.pooled` holds what capture recorded; `steering` is the attached config (its maps on the
    model's device), whose `strength` may be changed between calls of the model."""

    def __init__(self, run: HookRun, detach: list[Callable[[], None]], stop: StopForward, root: object = None) -> None:
        self.run, self.stop, self._detach, self._root = run, stop, detach, root

    @property
    def steering(self) -> SteeringConfig | None:
        return self._root.config if self._root is not None else None

    @property
    def attached(self) -> bool:
        return bool(self._detach)

    def remove(self) -> None:
        """Take every hook off (a second call does nothing)."""
        while self._detach:
            self._detach.pop()()


def attach(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    *,
    capture: bool = False,
    steering: SteeringConfig | None = None,
    stop_early: bool = False,
    step: Callable[[], int] | None = None,
) -> Hooks:
    """Attach capture and/or steering hooks to `layers` of `model`, until the returned `Hooks`
    are removed.

    capture: record each layer's pooled output (after steering) the first time it runs (the
        first denoising step) in `run.pooled`, float32, with autograd intact (wrap in
        `torch.no_grad()` when no gradient is wanted).
    steering: apply its maps to the layers it names (each must be in `layers`), moved once to
        the device of `model`'s parameters (in float32; again only if the model moves); with
        `steering.steps`, only during those denoising steps (0-based): `step()` says which step a
        call of `model` belongs to, read as the call starts; without it, the step is counted from
        the timesteps `model` is called with (`htcli.core.diffusers_hooks`).
    stop_early: end the forward pass once every captured layer has run, by raising `hooks.stop`
        (a `StopForward`, which `hooked` catches).
    """
    from htcli.core.diffusers_hooks import STEERING, apply_steering, free_name, observe, remove_steering

    if steering is not None:
        unknown = set(steering.steered) - set(layers)
        if unknown:
            raise HTError(f"steering maps name layers that are not hooked: {', '.join(sorted(unknown))}")
    if stop_early and not capture:
        raise HTError("stop_early needs capture=True: it stops once every captured layer has run")
    run, stop, remaining = HookRun(), StopForward(), set(layers)
    detach: list[Callable[[], None]] = []
    root = None
    if steering is not None:
        name = free_name(model, STEERING)
        root = apply_steering(model, steering, name, read_step=step)
        detach.append(lambda: remove_steering(model, name))

    def record(name: str) -> Callable[[nn.Module, object], None]:
        def hook(module: nn.Module, output: object) -> None:
            if name not in run.pooled:  # the first call: the first denoising step
                run.pooled[name] = _pool(layer_output(module, output))
                remaining.discard(name)
                if stop_early and not remaining:
                    raise stop

        return hook

    if capture:
        detach += [observe(module, record(name)) for name, module in layers.items()]
    return Hooks(run, detach, stop, root)


@contextmanager
def hooked(model: nn.Module, layers: Mapping[str, nn.Module], **options) -> Iterator[HookRun]:
    """`attach(model, layers, **options)` for the `with` block: the hooks come off on exit, also
    after an exception, and the block swallows `stop_early`'s stop, so code after the model
    call inside the block does not run."""
    hooks = attach(model, layers, **options)
    try:
        yield hooks.run
    except StopForward as raised:
        if raised is not hooks.stop:  # another block's stop: not this one's to swallow
            raise
    finally:
        hooks.remove()
