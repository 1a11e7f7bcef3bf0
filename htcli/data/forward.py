"""Run a denoiser at its first timestep from cached inputs, with steering and capture hooks.

Dataset building, baseline fitting and hypernetwork training all need the same thing: the
pooled activations of the hooked layers for a batch of samples, optionally steered. Inputs
are encoded once with the pipeline's text encoder (`encode_inputs`) and stored; afterwards
only the denoiser is needed (`pooled_activations`), so the text encoder can be freed.

Inputs are a dict of tensors, batch first (noise, text, and per family mask, pooled, time_ids:
`htcli.models.inputs` lists them and calls each family's denoiser on them).
All specs use schedulers (DPM-Solver, LCM, flow matching) whose first-step input scaling is the
identity.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from htcli.core.hooks import hooked
from htcli.core.steering import SteeringConfig
from htcli.core.transport import Maps
from htcli.models import ModelSpec, denoiser
from htcli.models.inputs import denoiser_call


def initial_noise(spec: ModelSpec, denoiser: nn.Module, seeds: Sequence[int]) -> Tensor:
    """Initial latents, one seeded generator per sample: what the pipeline draws for those seeds."""
    # FLUX's input channels are 2x2 patches of the VAE's latent channels.
    channels = denoiser.config.in_channels // (4 if spec.family == "flux" else 1)
    size = spec.resolution // 8
    return torch.cat(
        [torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )


@torch.no_grad()
def encode_inputs(spec: ModelSpec, pipe: Any, prompts: Sequence[str], seeds: Sequence[int]) -> dict[str, Tensor]:
    """Text-encoder outputs for `prompts` and initial noise for `seeds` (CPU tensors)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    device = pipe._execution_device
    model = denoiser(pipe, spec)
    inputs = {"noise": initial_noise(spec, model, seeds)}
    if spec.family == "pixart":
        # The pipeline's own encoder: it lowercases and strips every prompt (T5 is case-sensitive,
        # so raw text would give other token sequences than generation sees) and pads to
        # max_sequence_length. Attention ignores masked padding, so the cache keeps only the
        # longest prompt's tokens: the same conditioning, far smaller.
        text, mask, _, _ = pipe.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            device=device,
            clean_caption=_call_default(spec, pipe, "clean_caption"),
            max_sequence_length=_call_default(spec, pipe, "max_sequence_length"),
        )
        length = int(mask.sum(dim=1).max())
        inputs |= {"text": text[:, :length].cpu(), "mask": mask[:, :length].cpu()}
    elif spec.family == "flux":
        # FLUX attends to every T5 token, padding included (it takes no mask): the cache keeps all
        # max_sequence_length of them. Its text position ids are zeros, made at each call.
        text, pooled, _ = pipe.encode_prompt(
            list(prompts), device=device, num_images_per_prompt=1,
            max_sequence_length=_call_default(spec, pipe, "max_sequence_length"),
        )
        inputs |= {"text": text.cpu(), "pooled": pooled.cpu()}
    else:
        text, _, pooled, _ = pipe.encode_prompt(
            list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        size = (spec.resolution, spec.resolution)
        time_ids = pipe._get_add_time_ids(
            size, (0, 0), size, dtype=text.dtype, text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim
        )
        inputs |= {"text": text.cpu(), "pooled": pooled.cpu(), "time_ids": time_ids.repeat(len(prompts), 1).cpu()}
    return inputs


def _call_default(spec: ModelSpec, pipe: Any, name: str) -> Any:
    """A pipeline-call argument as `pipe(prompt, **spec.pipeline_kwargs())` gets it: the spec's
    value, else the pipeline's own default."""
    if name in spec.call_kwargs:
        return spec.call_kwargs[name]
    return inspect.signature(type(pipe).__call__).parameters[name].default


def pad_text(batches: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Pad PixArt text/mask of several input dicts to one length, so they can be concatenated."""
    if "mask" not in batches[0]:
        return [dict(b) for b in batches]
    length = max(b["text"].shape[1] for b in batches)
    out = []
    for b in batches:
        extra = length - b["text"].shape[1]
        out.append(
            dict(b)
            | {
                "text": torch.nn.functional.pad(b["text"], (0, 0, 0, extra)),
                "mask": torch.nn.functional.pad(b["mask"], (0, extra)),
            }
        )
    return out


def pooled_activations(
    spec: ModelSpec,
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    inputs: Mapping[str, Tensor],
    steering: SteeringConfig | None = None,
) -> dict[str, Tensor]:
    """Pooled (B, D) float32 activations of `layers` at the first timestep, steered if asked.

    The forward pass stops after the last hooked layer. Gradients flow to the steering maps
    unless called under `torch.no_grad()` (for a backward pass, see `Frozen.graph`).
    """
    with hooked(model, layers, capture=True, steering=steering, stop_early=True) as run:
        denoiser_call(spec, model, inputs)
    missing = set(layers) - set(run.pooled)
    if missing:
        raise RuntimeError(f"hooked layers never ran: {sorted(missing)[:3]}")
    return run.pooled


@dataclass
class Frozen:
    """A frozen denoiser, its hooked layers, and batched forward passes from cached inputs."""

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

    def pooled(self, inputs: Mapping[str, Tensor], maps: Maps | None = None) -> dict[str, Tensor]:
        """Pooled (N, D) activations of every hooked layer for all N samples of `inputs`, without
        a graph, in forward batches of `batch_size`.

        `maps` hold (D,) tensors shared by all samples, or (N, D) per-sample maps.
        """
        n = inputs["noise"].shape[0]
        parts: dict[str, list[Tensor]] = {name: [] for name in self.layers}
        with torch.no_grad():
            for start in range(0, n, self.batch_size):
                rows = slice(start, start + self.batch_size)
                batch = {k: v[rows] for k, v in inputs.items()}
                steering = None
                if maps:
                    steering = SteeringConfig({name: (o[rows], b[rows]) if o.ndim == 2 else (o, b) for name, (o, b) in maps.items()})
                out = pooled_activations(self.spec, self.model, self.layers, batch, steering)
                for name in self.layers:
                    parts[name].append(out[name])
        return {name: torch.cat(p) for name, p in parts.items()}

    @contextmanager
    def graph(self, inputs: Mapping[str, Tensor], maps: Maps) -> Iterator[dict[str, Tensor]]:
        """Pooled (N, D) activations of all N samples in one forward pass, with autograd to `maps`.

        Run backward inside the block: the steering hooks stay attached until it ends, because
        gradient checkpointing recomputes the denoiser's blocks during backward and that
        recomputation must be steered as the forward pass was (else torch.utils.checkpoint
        raises CheckpointError). One pass rather than batches: a graph keeps every batch's
        activations anyway; callers bound memory with micro-batches of samples instead.
        """
        with hooked(self.model, self.layers, steering=SteeringConfig(maps)):
            yield pooled_activations(self.spec, self.model, self.layers, inputs)

    def execution_order(self, inputs: Mapping[str, Tensor]) -> list[str]:
        """Hooked layers in the order the forward pass reaches them (for UNets this is not
        the order of their names)."""
        one = {k: v[:1] for k, v in inputs.items()}
        with torch.no_grad():
            return list(pooled_activations(self.spec, self.model, self.layers, one))
