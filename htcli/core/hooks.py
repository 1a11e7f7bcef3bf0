"""Activation hooks: capture pooled activations and steer them with per-neuron affine maps.

`attach` puts capture and steering hooks on modules chosen by name patterns and returns a
handle whose `remove()` takes every one of them off again; `hooked` does the same for a `with`
block, also after an exception:

    layers = resolve_layers(pipe.transformer, ["transformer_blocks.*.norm2"])
    with hooked(pipe.transformer, layers, capture=True, stop_early=True) as run:
        pipe(prompt, num_inference_steps=1)      # stops right after the last hooked layer
    run.pooled["transformer_blocks.3.norm2"]     # (B, D) float32

Outputs may be (B, T, D) token sequences, (B, C, H, W) feature maps, or tuples holding one of
those (the hook returns the same type): the first element, or the element `STREAMS` names for
modules that return several streams (FLUX's blocks: the image stream). Steering math runs in
float32 and is cast back to the module's dtype, so fp16/bf16 models are safe. The maps move to
the model's device once, when the hooks attach, never per hook call. `Steering.steps` limits
steering to some denoising steps: the step comes from a clock the caller gives (a pipeline's
scheduler, `htcli.generate.apply`), else from counting the model's calls since attaching.

Hooks attach through diffusers' hook registry (`diffusers.hooks.HookRegistry`, the mechanism of
its caching and layer-skip hooks) where the installed diffusers has one, so that they compose
with those and show in `module._diffusers_hook`; through PyTorch's forward hooks otherwise.
Either way they run in the order they were attached.
"""

from __future__ import annotations

import difflib
import fnmatch
import itertools
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cache

import torch
from torch import Tensor, nn

from htcli.core.transport import apply_affine, maps_to
from htcli.errors import HTError


class StopForward(Exception):
    """Raised from a hook to end a forward pass once every captured layer has run."""


@dataclass
class Steering:
    """Affine maps per layer name: (omega, beta) of shape (D,) or (B, D) for per-sample maps."""

    maps: Mapping[str, tuple[Tensor, Tensor]]
    strength: float | Tensor = 1.0  # a float, or (B, 1) per-sample strengths
    steps: Collection[int] | None = None  # 0-based calls of the hooked model that steer; None: all

    def __post_init__(self) -> None:
        if isinstance(self.strength, (int, float)) and not torch.isfinite(torch.tensor(float(self.strength))):
            raise HTError(f"strength must be a finite number, got {self.strength}")

    def to(self, device: torch.device | str) -> Steering:
        """The same steering with every tensor on `device`, as float32.

        float32 rather than the model's dtype on purpose: `apply_affine` computes in float32,
        and omega near 1 in bfloat16 would be quantised to 0.996, 1.0, 1.008, ...
        Tensors already there are kept as they are (no copy), autograd included."""

        strength = self.strength.to(device, torch.float32) if isinstance(self.strength, Tensor) else self.strength
        return replace(self, maps=maps_to(self.maps, device), strength=strength)


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


# Modules that return several streams as a tuple, and the element of it that is their
# activation: the one captured and steered, the others passing through unchanged. Keyed by the
# module's class, not by a model spec, so that every caller of `hooked` (dataset building,
# fitting, training, generation, serving) takes the same stream without being told: maps
# fitted on one stream are never applied to another. Class names, so that this module need
# not import diffusers. FLUX's dual-stream and single-stream blocks both return
# (encoder_hidden_states, hidden_states), the text stream then the image stream; the image
# stream is the one to steer (docs/models.md says why). Single-stream blocks return that pair
# since diffusers 0.35; older versions return the text and image tokens concatenated.
STREAMS: dict[str, int] = {"FluxTransformerBlock": 1, "FluxSingleTransformerBlock": 1}


def output_element(module: nn.Module) -> int:
    """Which element of the module's tuple output is its activation (0 unless `STREAMS` says)."""
    return STREAMS.get(type(module).__name__, 0)


def layer_output(module: nn.Module, output: object) -> Tensor:
    """The activation in `module`'s `output`: the output itself, or its `output_element`."""
    streams = type(module).__name__ in STREAMS
    if isinstance(output, Tensor) and not streams:
        return output
    index = output_element(module)
    if isinstance(output, (tuple, list)) and len(output) > index and isinstance(output[index], Tensor):
        return output[index]
    if streams:
        raise HTError(f"{type(module).__name__} returned a {type(output).__name__}, not a tuple of streams whose "
                      f"element {index} ht steers; FLUX needs diffusers >= 0.35")
    raise HTError(f"cannot hook a module returning {type(output).__name__}; expected a tensor or a tuple")


def _replace_activation(output: object, new: Tensor, index: int) -> object:
    if isinstance(output, Tensor):
        return new
    items = list(output)
    items[index] = new
    return type(output)(items)


def _pool(z: Tensor) -> Tensor:
    """Mean over tokens or pixels: (B, T, D) or (B, C, H, W) -> (B, D), in float32."""
    if z.ndim == 3:
        return z.float().mean(dim=1)
    if z.ndim == 4:
        return z.float().mean(dim=(2, 3))
    if z.ndim == 2:
        return z.float()
    raise HTError(f"cannot pool an activation of shape {tuple(z.shape)}")


def _per_batch(param: Tensor, batch: int) -> Tensor:
    """Repeat per-sample (B, D) maps over the copies classifier-free guidance stacks."""
    if param.ndim < 2 or param.shape[0] == batch:
        return param
    if batch % param.shape[0]:
        raise HTError(f"{param.shape[0]} per-sample maps do not divide a batch of {batch}")
    return param.repeat(batch // param.shape[0], *([1] * (param.ndim - 1)))


@cache
def _registry_hooks() -> tuple[type, type, type] | None:
    """(HookRegistry, output hook class, call hook class) from the installed diffusers; None when it
    has no hook registry (diffusers < 0.32). Built on first use: this module never imports diffusers
    at import time."""
    try:
        from diffusers.hooks import HookRegistry, ModelHook
    except ImportError:
        return None

    class OutputHook(ModelHook):
        """Runs `fn(module, args, output)` after the module's forward; a non-None result replaces the output."""

        def __init__(self, fn: Callable) -> None:
            super().__init__()
            self.fn = fn

        def post_forward(self, module: nn.Module, output: object) -> object:
            replaced = self.fn(module, (), output)
            return output if replaced is None else replaced

    class CallHook(ModelHook):
        """Runs `fn(module, args)` before the module's forward."""

        def __init__(self, fn: Callable) -> None:
            super().__init__()
            self.fn = fn

        def pre_forward(self, module: nn.Module, *args, **kwargs):
            self.fn(module, args)
            return args, kwargs

    return HookRegistry, OutputHook, CallHook


_hook_names = itertools.count()


def attach_hook(module: nn.Module, fn: Callable, before: bool = False) -> Callable[[], None]:
    """Hook `fn` onto `module` (after its forward: `fn(module, args, output)`, whose non-None result
    replaces the output; with `before`: `fn(module, args)`) through the same mechanism as the
    steering hooks, so that it runs in order with them; returns the function that takes it off."""
    registry_hooks = _registry_hooks()
    if registry_hooks is None:
        handle = module.register_forward_pre_hook(fn) if before else module.register_forward_hook(fn)
        return handle.remove
    registry_class, output_hook, call_hook = registry_hooks
    registry = registry_class.check_if_exists_or_initialize(module)
    name = f"ht.{'call' if before else 'steer'}.{next(_hook_names)}"
    registry.register_hook(call_hook(fn) if before else output_hook(fn), name)
    return lambda: registry.remove_hook(name, recurse=False)


class Hooks:
    """Capture and steering hooks on a model, from `attach` until `remove()`.

    `run.pooled` holds what capture recorded; `steering` is the attached steering (its maps on
    the model's device), whose `strength` may be changed between calls of the model."""

    def __init__(self, run: HookRun, steering: Steering | None, detach: list[Callable[[], None]],
                 stop: StopForward) -> None:
        self.run, self.steering, self.stop, self._detach = run, steering, stop, detach

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
    steering: Steering | None = None,
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
        call of `model` belongs to, read as the call starts; without it, the calls of `model`
        since attaching are counted.
    stop_early: end the forward pass once every captured layer has run, by raising `hooks.stop`
        (a `StopForward`, which `hooked` catches).
    """
    if steering is not None:
        unknown = set(steering.maps) - set(layers)
        if unknown:
            raise HTError(f"steering maps name layers that are not hooked: {', '.join(sorted(unknown))}")
    if stop_early and not capture:
        raise HTError("stop_early needs capture=True: it stops once every captured layer has run")
    parameter = next(model.parameters(), None)
    if steering is not None:
        # Once here, not per hook call: a 4-step SDXL image runs the steering hooks 840 times. Our
        # own copy either way: `strength` is set on it, and it follows the model if that moves.
        steering = steering.to(parameter.device) if parameter is not None else replace(steering)
    run = HookRun()
    stop = StopForward()
    remaining = set(layers)
    current = -1  # the denoising step of the running call of `model`, kept only when steering has a window

    def start_call(module: nn.Module, args: tuple) -> None:
        nonlocal current
        current = step() if step is not None else current + 1

    def make_hook(name: str, index: int):
        def hook(module: nn.Module, args: tuple, output: object) -> object:
            z = layer_output(module, output)
            changed = False
            if (steering is not None and name in steering.maps
                    and (steering.steps is None or current in steering.steps)):
                omega, beta = steering.maps[name]
                if omega.device != z.device:  # the model moved after attaching (pipe.to, CPU offload): follow it
                    moved = steering.to(z.device)
                    steering.maps, steering.strength = moved.maps, moved.strength
                    omega, beta = steering.maps[name]
                batch = z.shape[0]
                strength = steering.strength
                if isinstance(strength, Tensor):
                    strength = _per_batch(strength, batch)
                channel_dim = 1 if z.ndim == 4 else -1
                z = apply_affine(z, _per_batch(omega, batch), _per_batch(beta, batch), strength, channel_dim)
                changed = True
            if capture and name not in run.pooled:  # the first call: the first denoising step
                run.pooled[name] = _pool(z)
                remaining.discard(name)
                if stop_early and not remaining:
                    raise stop
            return _replace_activation(output, z, index) if changed else None

        return hook

    detach = [attach_hook(module, make_hook(name, output_element(module))) for name, module in layers.items()]
    if steering is not None and steering.steps is not None:
        detach.append(attach_hook(model, start_call, before=True))
    return Hooks(run, steering, detach, stop)


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
