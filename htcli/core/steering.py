"""What steering does to a layer's output: `SteeringConfig` (maps, strength, steps, layers), and
which part of a module's output is its activation.

A config is plain data, checked when it is made: `htcli.core.diffusers_hooks.apply_steering`
attaches it to a denoiser, `htcli.core.hooks.attach` / `hooked` to modules of a model for a
forward pass. Nothing here imports diffusers (the CLI starts without it).

Outputs may be (B, T, D) token sequences, (B, C, H, W) feature maps, or tuples holding one of
those: the first element, or the element `STREAMS` names for modules that return several
streams (FLUX's blocks: the image stream). Steering math runs in float32 and is cast back to the
module's dtype, so fp16/bf16 models are safe.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from htcli.core.strength import check_strength
from htcli.core.transport import apply_affine, maps_to
from htcli.errors import HTError

# Modules that return several streams as a tuple, and the element of it that is their
# activation: the one captured and steered, the others passing through unchanged. Keyed by the
# module's class, not by a model spec, so that every caller (dataset building, fitting,
# training, generation, serving) takes the same stream without being told: maps fitted on one
# stream are never applied to another. Class names, so that this module need not import
# diffusers. FLUX's dual-stream and single-stream blocks both return (encoder_hidden_states,
# hidden_states), the text stream then the image stream; the image stream is the one to steer
# (docs/models.md says why). Single-stream blocks return that pair since diffusers 0.35; older
# versions return the text and image tokens concatenated.
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


def replace_activation(module: nn.Module, output: object, new: Tensor) -> object:
    """`output` with its activation (see `layer_output`) replaced by `new`."""
    if isinstance(output, Tensor):
        return new
    items = list(output)
    items[output_element(module)] = new
    return type(output)(items)


def _per_batch(param: Tensor, batch: int) -> Tensor:
    """Repeat per-sample (B, D) maps over the copies classifier-free guidance stacks."""
    if param.ndim < 2 or param.shape[0] == batch:
        return param
    if batch % param.shape[0]:
        raise HTError(f"{param.shape[0]} per-sample maps do not divide a batch of {batch}")
    return param.repeat(batch // param.shape[0], *([1] * (param.ndim - 1)))


def steering_window(steps: int | Collection[int] | None) -> range | frozenset[int] | None:
    """`steps` as a range or a frozenset of denoising steps from 0 (a generator is read once,
    here); None stays None (every step). Bools and floats are refused."""
    if steps is None or isinstance(steps, range) and len(steps) and steps.start >= 0 and steps.step > 0:
        return steps
    problem = HTError(f"steps= takes denoising step numbers from 0 (an int, a range or a set of ints), got {steps!r:.60}")
    if isinstance(steps, numbers.Integral) and not isinstance(steps, bool):
        steps = [steps]
    try:
        window = frozenset(steps)
    except TypeError:
        raise problem from None
    if not window or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0 for s in window):
        raise problem
    return frozenset(int(s) for s in window)


def _check_strength(strength: object) -> float | Tensor:
    if isinstance(strength, Tensor):
        if strength.ndim == 0:
            strength = float(strength)
        elif not strength.is_meta and not bool(torch.isfinite(strength).all()):
            raise HTError("strength must hold finite numbers")
        else:
            return strength
    return check_strength(strength)  # a number: the strength policy's bounds


@dataclass
class SteeringConfig:
    """Per-neuron affine maps and where and when they act.

    maps: {layer name: (omega, beta)}, each of shape (D,), or (B, D) for one map per sample.
    strength: a finite number (0: the unsteered model, bit for bit; negative: the reverse
        transport), or a (B, 1) tensor of per-sample strengths.
    steps: the denoising steps to steer, 0-based (an int, a range or a set); None: every step.
    layers: the layer names of `maps` to steer; None: all of them.
    """

    maps: Mapping[str, tuple[Tensor, Tensor]]
    strength: float | Tensor = 1.0
    steps: int | Collection[int] | None = None
    layers: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.maps, Mapping):
            raise HTError(f"maps takes {{layer name: (omega, beta)}}, got {type(self.maps).__name__}")
        for name, pair in self.maps.items():
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(t, Tensor) for t in pair)):
                raise HTError(f"maps[{name!r}] must be an (omega, beta) pair of tensors")
            if pair[0].shape != pair[1].shape or pair[0].ndim not in (1, 2):
                raise HTError(f"maps[{name!r}]: omega and beta must share a shape (D,) or (B, D), "
                              f"got {tuple(pair[0].shape)} and {tuple(pair[1].shape)}")
        self.strength = _check_strength(self.strength)
        self.steps = steering_window(self.steps)
        if self.layers is not None:
            if isinstance(self.layers, str):
                raise HTError(f"layers takes a list of layer names, got the string {self.layers!r}: "
                              f"write [{self.layers!r}]")
            unknown = [name for name in self.layers if name not in self.maps]
            if unknown:
                raise HTError(f"layers names layers the maps do not steer: {', '.join(unknown[:5])}")
            self.layers = list(self.layers)

    def __repr__(self) -> str:
        per_sample = isinstance(self.strength, Tensor)
        strength = f"per-sample {tuple(self.strength.shape)}" if per_sample else f"{self.strength:g}"
        return (f"SteeringConfig({len(self.steered)} layers, strength={strength}, "
                f"steps={'all' if self.steps is None else sorted(self.steps)})")

    @property
    def steered(self) -> list[str]:
        """The layer names this config steers: `layers`, or every layer of `maps`."""
        return list(self.maps) if self.layers is None else list(self.layers)

    def to(self, device: torch.device | str) -> SteeringConfig:
        """The same config with every tensor on `device`, as float32.

        float32 rather than the model's dtype on purpose: `apply_affine` computes in float32,
        and omega near 1 in bfloat16 would be quantised to 0.996, 1.0, 1.008, ...
        Tensors already there are kept as they are (no copy), autograd included."""
        moved = copy.copy(self)  # checked when made: not again
        moved.maps = maps_to(self.maps, device)
        if isinstance(self.strength, Tensor):
            moved.strength = self.strength.to(device, torch.float32)
        return moved

    def acts_at(self, name: str, step: int) -> bool:
        """Whether layer `name` is steered during denoising step `step`."""
        return (name in self.maps and (self.layers is None or name in self.layers)
                and (self.steps is None or step in self.steps))

    def steer(self, name: str, z: Tensor) -> Tensor:
        """Layer `name`'s activation `z` steered: (B, T, D) or (B, C, H, W), in z's dtype."""
        omega, beta = self.maps[name]
        if omega.device != z.device:  # the model moved after attaching (pipe.to, CPU offload): follow it
            moved = self.to(z.device)
            self.maps, self.strength = moved.maps, moved.strength
            omega, beta = self.maps[name]
        batch = z.shape[0]
        strength = _per_batch(self.strength, batch) if isinstance(self.strength, Tensor) else self.strength
        channel_dim = 1 if z.ndim == 4 else -1
        return apply_affine(z, _per_batch(omega, batch), _per_batch(beta, batch), strength, channel_dim)
