"""Plan a run on the meta device: layers, neurons, hypernetwork outputs, disk and memory.

Nothing is downloaded and no memory is allocated: the denoiser is built from the shipped
config on the meta device and run once there, with the steering maps requiring gradients, to
measure the activations training would keep for backpropagation. What it is called with is
recorded from the spec's pipeline built on the meta device too (`example_call`: a real model's
random-weights structure, whose text encoders have the real widths), as datasets record it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from htcli.core.hooks import (
    STREAMS,
    Steering,
    attach_hook,
    hooked,
    layer_output,
    module_width,
    output_element,
    resolve_layers,
)
from htcli.models.call import DenoiserCall
from htcli.models.record import CallRecorder
from htcli.models.spec import ModelSpec, build_meta_denoiser, load_pipeline, random_variant


@dataclass
class Layer:
    name: str
    width: int
    tokens: int  # tokens (or pixels) per sample the layer emits
    kind: str = ""  # the module's class
    output: str = ""  # what the layer outputs per sample: "tensor (4096, 1152)", "stream 1 of a tuple (4096, 3072)"


@dataclass
class Plan:
    spec: ModelSpec
    layers: list[Layer]
    denoiser_params: int
    weights_bytes: int  # denoiser in the spec's dtype
    # Kept for backward, up to the last hooked layer (attention as fused kernels keep it).
    activation_bytes_per_sample: int

    @property
    def neurons(self) -> int:
        return sum(layer.width for layer in self.layers)

    @property
    def hyper_outputs(self) -> int:
        return 2 * self.neurons  # omega - 1 and beta per neuron

    def dataset_bytes_per_concept(self, samples: int, eval_samples: int, bytes_per_value: int = 2) -> int:
        """Pooled targets (float16) for the fitting and the evaluation samples of one concept."""
        return (samples + eval_samples) * self.neurons * bytes_per_value

    def training_bytes(self, concepts_per_step: int, samples: int) -> int:
        """Rough GPU memory of one training step without gradient checkpointing."""
        return self.weights_bytes + concepts_per_step * samples * self.activation_bytes_per_sample

    def summary(self, samples: int, eval_samples: int, concepts_per_step: int) -> dict:
        """Everything `ht plan` reports, for a dataset of `samples` + `eval_samples` per concept
        and training steps of `concepts_per_step` concepts x `samples` samples."""
        return {
            "model": self.spec.id,
            "resolution": self.spec.resolution,
            "random_weights": self.spec.random_weights,
            "layers": [vars(layer) for layer in self.layers],
            "neurons": self.neurons,
            "hyper_outputs": self.hyper_outputs,
            "denoiser_params": self.denoiser_params,
            "weights_bytes": self.weights_bytes,
            "activation_bytes_per_sample": self.activation_bytes_per_sample,
            "samples": samples,
            "eval_samples": eval_samples,
            "concepts_per_step": concepts_per_step,
            "dataset_dtype": self.spec.dataset_dtype,
            "dataset_bytes_per_concept": self.dataset_bytes_per_concept(samples, eval_samples),
            "training_bytes": self.training_bytes(concepts_per_step, samples),
        }


def human_bytes(n: int) -> str:
    """1.23 GiB, or 4.5 MiB below a GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def human_count(n: int) -> str:
    """611M, 2.6B, 48.3k, or the number itself below a thousand: three significant digits, so
    a tiny model's denoiser is not "0M"."""
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size * 0.9995:  # 999,999 is 1M, not 1e+03k
            return f"{n / size:.3g}{unit}"
    return str(n)


def make_plan(spec: ModelSpec, patterns: Sequence[str] | None = None, grad_checkpointing: bool = False) -> Plan:
    """Build the spec's denoiser on the meta device and measure one steered forward pass (with
    `grad_checkpointing`, as diffusers checkpoints its blocks: only their inputs are kept)."""
    model = build_meta_denoiser(spec).to(spec.torch_dtype).requires_grad_(False)
    if grad_checkpointing:
        model.enable_gradient_checkpointing()
        model.train()
    layers = resolve_layers(model, patterns or spec.hook_patterns)
    with torch.device("meta"):
        maps = {
            name: (torch.ones(module_width(m), requires_grad=True), torch.zeros(module_width(m), requires_grad=True))
            for name, m in layers.items()
        }
    call = example_call(spec)
    shapes: dict[str, tuple[int, ...]] = {}
    saved = _SavedForBackward()

    def record_shape(name):
        def hook(module, args, out) -> None:
            shapes.setdefault(name, tuple(layer_output(module, out).shape))

        return hook

    detach = [attach_hook(m, record_shape(n)) for n, m in layers.items()]  # before the stop, which ends the pass
    try:
        with saved, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            with hooked(model, layers, capture=True, steering=Steering(maps), stop_early=True):
                call.replay(model)
    finally:
        for remove in detach:
            remove()
    planned = [Layer(n, module_width(m), _tokens(shapes[n]), type(m).__name__, _output(m, shapes[n]))
               for n, m in layers.items()]
    params = sum(p.numel() for p in model.parameters())
    return Plan(spec, planned, params, params * torch.finfo(spec.torch_dtype).bits // 8, saved.bytes)


_EXAMPLES: dict[str, DenoiserCall] = {}  # example_call's, per spec (as `_example_key` tells them apart)


def example_call(spec: ModelSpec) -> DenoiserCall:
    """One sample's call of the spec's denoiser on the meta device, recorded from the spec's
    pipeline built there (a shipped real model's: its random-weights variant's, which has the
    real text encoders' widths); nothing is downloaded or allocated. A pipeline folder's
    (`htcli.models.folder`) is recorded from the folder's pipeline on the CPU: some pipelines
    make tensors of their timesteps' values, which the meta device has not. Kept for the process."""
    key = json.dumps([spec.id, spec.resolution, spec.dtype, spec.random_weights, spec.denoiser_config,
                      spec.config_overrides, spec.call_kwargs], sort_keys=True, default=str)
    if key not in _EXAMPLES:
        structure = spec if spec.offline or spec.source else random_variant(spec)
        pipe = load_pipeline(structure, device="cpu" if spec.source else "meta")
        with _MetaScalars():
            _EXAMPLES[key] = CallRecorder(pipe, structure).record(["a photograph"], [0], device="meta")
    return _EXAMPLES[key]


class _MetaScalars(TorchDispatchMode):
    """Reads every meta tensor's scalar (`.item()`, `bool()`) as 1 or True: text encoders check
    their masks (e.g. whether any token is padding) before the call that counts, whose shapes
    these checks do not change."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return True if args[0].dtype == torch.bool else 1
        return func(*args, **(kwargs or {}))


class _SavedForBackward(TorchFunctionMode):
    """Bytes autograd keeps for backward (`pack` is the saved-tensors hook), with attention
    counted as fused GPU kernels (flash, memory-efficient) keep it: query, key, value, output.
    The meta device runs math attention, which also keeps the (tokens x tokens x heads) score
    matrices that fused kernels never store."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self._in_attention = False
        self._attention_saved = False  # whether this attention call saved through `pack` at all

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._in_attention:
            self._attention_saved = True
        else:
            self.bytes += tensor.numel() * tensor.element_size()
        return tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self._in_attention, self._attention_saved = True, False
        try:
            out = func(*args, **kwargs)
        finally:
            self._in_attention = False
        # Inside a checkpointed block the checkpoint's own hooks take what attention saves and
        # drop it: then nothing is kept.
        if self._attention_saved:
            self.bytes += sum(t.numel() * t.element_size() for t in (*args[:3], out))
        return out


def _output(module: torch.nn.Module, shape: tuple[int, ...]) -> str:
    """What a layer outputs per sample, as `ht plan` lists it: a tensor, or which stream of a tuple."""
    stream = f"stream {output_element(module)} of a tuple" if type(module).__name__ in STREAMS else "tensor"
    return f"{stream} {tuple(shape[1:])}"


def _tokens(shape: tuple[int, ...]) -> int:
    if len(shape) == 4:  # (B, C, H, W)
        return shape[2] * shape[3]
    return shape[1] if len(shape) == 3 else 1
