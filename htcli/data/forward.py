"""Run a denoiser at its recorded call, with steering and capture hooks.

Dataset building, baseline fitting and hypernetwork training all need the same thing: the
pooled activations of the hooked layers for a batch of samples, optionally steered. The
pipeline's own call of its denoiser is recorded once per sample (`htcli.models.record`: the
pipeline runs on the prompts and seeds and is stopped at its denoiser's call) and stored;
afterwards only the denoiser is needed (`pooled_activations` replays the call), so the text
encoders can be freed. No model's inputs are written here: whatever the pipeline passes (packed
latents, masks, pooled embeddings, position ids, guidance) is what the replay passes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from htcli.core.hooks import Steering, hooked
from htcli.core.transport import Maps
from htcli.models import ModelSpec
from htcli.models.call import DenoiserCall


def pooled_activations(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    call: DenoiserCall,
    steering: Steering | None = None,
) -> dict[str, Tensor]:
    """Pooled (B, D) float32 activations of `layers` when `model` replays `call`, steered if asked.

    The forward pass stops after the last hooked layer. Gradients flow to the steering maps
    unless called under `torch.no_grad()` (for a backward pass, see `Frozen.graph`).
    """
    with hooked(model, layers, capture=True, steering=steering, stop_early=True) as run:
        call.replay(model)
    missing = set(layers) - set(run.pooled)
    if missing:
        raise RuntimeError(f"hooked layers never ran: {sorted(missing)[:3]}")
    return run.pooled


@dataclass
class Frozen:
    """A frozen denoiser, its hooked layers, and batched forward passes replaying recorded calls."""

    spec: ModelSpec
    model: nn.Module
    layers: Mapping[str, nn.Module]
    batch_size: int = 32  # samples per forward pass without a graph
    micro_batch: int = 0  # samples per backward pass when the caller does not say; 0: all at once

    @classmethod
    def load(cls, spec: ModelSpec, patterns: Sequence[str], device: str | torch.device | None = None,
             dtype: str = "auto", grad_checkpointing: bool = False, model_path: str | None = None) -> Frozen:
        """The spec's denoiser alone (no text encoder, no VAE), frozen on `device` (default: as
        `resolve_device`), in the training dtype `dtype` names (`htcli.core.precision`), hooked
        at `patterns`. Gradient checkpointing trades a recomputation in backward for memory.
        `model_path`: the local pipeline directory generation loads (`load_denoiser`).

        The forward batch and the default micro-batch are what fits in the device's free memory
        once the weights are loaded (`htcli.models.memory`, from the meta-device plan)."""
        from htcli.core.hooks import resolve_layers
        from htcli.core.precision import training_dtype
        from htcli.core.runtime import resolve_device
        from htcli.models import load_denoiser
        from htcli.models.memory import choose_batches, free_bytes
        from htcli.models.plan import make_plan

        device = device if isinstance(device, torch.device) else resolve_device(device)
        dtype_ = training_dtype(dtype, device)
        model = load_denoiser(spec, device, dtype_, model_path)
        if grad_checkpointing:
            model.enable_gradient_checkpointing()
            model.train()  # diffusers checkpoints only in training mode; its denoisers have no dropout
        free = free_bytes(device)
        if device.type == "cpu":  # torchrun's ranks on one machine share its RAM
            free //= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        batches = choose_batches(make_plan(spec, patterns), device, dtype_, grad_checkpointing=grad_checkpointing,
                                 free=free)
        return cls(spec, model, resolve_layers(model, patterns), batches.forward_batch, batches.micro_batch)

    def pooled(self, inputs: DenoiserCall, maps: Maps | None = None) -> dict[str, Tensor]:
        """Pooled (N, D) activations of every hooked layer for all N samples of `inputs`, without
        a graph, in forward batches of `batch_size`.

        `maps` hold (D,) tensors shared by all samples, or (N, D) per-sample maps.
        """
        n = len(inputs)
        parts: dict[str, list[Tensor]] = {name: [] for name in self.layers}
        with torch.no_grad():
            for start in range(0, n, self.batch_size):
                rows = slice(start, start + self.batch_size)
                batch = inputs[rows]
                steering = None
                if maps:
                    steering = Steering({name: (o[rows], b[rows]) if o.ndim == 2 else (o, b) for name, (o, b) in maps.items()})
                out = pooled_activations(self.model, self.layers, batch, steering)
                for name in self.layers:
                    parts[name].append(out[name])
        return {name: torch.cat(p) for name, p in parts.items()}

    @contextmanager
    def graph(self, inputs: DenoiserCall, maps: Maps) -> Iterator[dict[str, Tensor]]:
        """Pooled (N, D) activations of all N samples in one forward pass, with autograd to `maps`.

        Run backward inside the block: the steering hooks stay attached until it ends, because
        gradient checkpointing recomputes the denoiser's blocks during backward and that
        recomputation must be steered as the forward pass was (else torch.utils.checkpoint
        raises CheckpointError). One pass rather than batches: a graph keeps every batch's
        activations anyway; callers bound memory with micro-batches of samples instead.
        """
        with hooked(self.model, self.layers, steering=Steering(maps)):
            yield pooled_activations(self.model, self.layers, inputs)

    def execution_order(self, inputs: DenoiserCall) -> list[str]:
        """Hooked layers in the order the forward pass reaches them (for UNets this is not
        the order of their names)."""
        with torch.no_grad():
            return list(pooled_activations(self.model, self.layers, inputs[:1]))
