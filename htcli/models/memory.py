"""Batch sizes from free memory: how many samples a forward pass, or a backward pass, can take.

The per-sample figures come from a `Plan` (measured once on the meta device); the free memory
is queried once, at the edge (`free_bytes`); what remains is arithmetic (`fit_batches`):

    plan = make_plan(spec, layers)
    batches = choose_batches(plan, device, dtype, grad_checkpointing=True)
    batches.micro_batch, batches.forward_batch   # pixart, bfloat16, 80 GiB free: 101 and 64
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from htcli.models.plan import Plan, make_plan
from htcli.models.spec import get_model

MAX_FORWARD_BATCH = 64  # a GPU is saturated well before this; larger batches only add latency
MAX_MICRO_BATCH = 1024  # above a training step's K x N samples: one pass, no micro-batching
FALLBACK_RAM = 4 * 2**30  # CPU memory assumed free when neither /proc/meminfo nor psutil can say
# Live (tokens x width) activations of one sample in a forward pass without a graph, in units of
# the largest hooked layer's: PixArt's MLP holds about 10 (residual, norm, 4x hidden twice), an
# SDXL UNet at 1024 px about 25 (its skip connections, plus GEGLU's 8x-wide projection). An
# estimate, on the safe side for both.
FORWARD_LIVE_ACTIVATIONS = 24


@dataclass(frozen=True)
class Batches:
    micro_batch: int  # samples per backward pass (`--micro-batch`)
    forward_batch: int  # samples per forward pass without a graph (`Frozen.batch_size`)
    free_bytes: int  # what the device had free when asked
    per_sample_bytes: int  # one sample's memory in a backward pass
    forward_bytes_per_sample: int  # one sample's memory in a forward pass without a graph


def free_bytes(device: torch.device) -> int:
    """Memory this process could still allocate on `device`: CUDA's free memory plus what the
    caching allocator holds unused; elsewhere the system's available RAM."""
    if device.type == "cuda":
        unused_cache = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + unused_cache
    return _available_ram()


def _available_ram() -> int:
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file counts in kB
    try:
        import psutil
    except ImportError:
        return FALLBACK_RAM
    return int(psutil.virtual_memory().available)


def element_size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _block_activations(plan: Plan) -> list[int]:
    """(tokens x width) of each block with hooked layers: a layer's block is its parent module
    (`transformer_blocks.3` for `transformer_blocks.3.norm1`), or the layer itself where it is
    an item of a module list (FLUX's hooks are whole blocks); the widest layer stands for it."""
    blocks: dict[str, int] = {}
    for layer in plan.layers:
        parent, _, last = layer.name.rpartition(".")
        block = layer.name if last.isdigit() else parent
        blocks[block] = max(blocks.get(block, 0), layer.tokens * layer.width)
    return list(blocks.values())


def forward_bytes_per_sample(plan: Plan, dtype: torch.dtype) -> int:
    """One sample's live activations in a forward pass without a graph (an estimate: the
    largest few (tokens x width) tensors, see FORWARD_LIVE_ACTIVATIONS)."""
    largest = max(layer.tokens * layer.width for layer in plan.layers)
    return FORWARD_LIVE_ACTIVATIONS * largest * element_size(dtype)


def per_sample_bytes(plan: Plan, dtype: torch.dtype, grad_checkpointing: bool = False) -> int:
    """One sample's memory in a forward pass with a graph and its backward, in `dtype`: the
    activations kept for backward plus the forward pass's working set.

    Without checkpointing, the kept activations are the plan's measurement (made in the spec's
    dtype, rescaled). With it, an estimate: each block keeps only its input, one (tokens x
    width) tensor, and backward recomputes one block at a time, whose activations are taken as
    its share of the measured total, in proportion to its (tokens x width).
    """
    kept = plan.activation_bytes_per_sample * element_size(dtype) // element_size(plan.spec.torch_dtype)
    if grad_checkpointing:
        blocks = _block_activations(plan)
        kept = sum(blocks) * element_size(dtype) + kept * max(blocks) // sum(blocks)
    return kept + forward_bytes_per_sample(plan, dtype)


def fit_batches(free: int, reserved: int, per_sample: int, forward_per_sample: int, headroom: float = 0.8) -> Batches:
    """The largest batches whose activations fit in `headroom` of `free` bytes once `reserved`
    bytes (weights not loaded yet) are set aside; at least 1, at most the MAX_* caps."""
    budget = max(int(free * headroom) - reserved, 0)
    return Batches(
        micro_batch=min(max(budget // per_sample, 1), MAX_MICRO_BATCH),
        forward_batch=min(max(budget // forward_per_sample, 1), MAX_FORWARD_BATCH),
        free_bytes=free,
        per_sample_bytes=per_sample,
        forward_bytes_per_sample=forward_per_sample,
    )


def choose_batches(
    plan: Plan,
    device: torch.device,
    dtype: torch.dtype,
    *,
    grad_checkpointing: bool = False,
    headroom: float = 0.8,
    weights_loaded: bool = True,
    free: int | None = None,
) -> Batches:
    """Batch sizes for `plan`'s denoiser computing in `dtype` on `device`, from the memory free
    there now (or `free` bytes). With `weights_loaded=False` the denoiser's weights, still to
    come, are set aside first. The headroom leaves room for the allocator's fragmentation, the
    hypernetwork and the optimiser."""
    free = free_bytes(device) if free is None else free
    reserved = 0 if weights_loaded else plan.denoiser_params * element_size(dtype)
    per_sample = per_sample_bytes(plan, dtype, grad_checkpointing)
    return fit_batches(free, reserved, per_sample, forward_bytes_per_sample(plan, dtype), headroom)


def batches_here(plan: Plan) -> dict:
    """The batch sizes training would choose on this machine's default device, weights not loaded,
    with and without gradient checkpointing (`ht plan`)."""
    from htcli.core.precision import training_dtype
    from htcli.core.runtime import resolve_device

    device = resolve_device(None)
    dtype = training_dtype("auto", device)
    free = free_bytes(device)
    plain, checkpointed = (
        choose_batches(plan, device, dtype, grad_checkpointing=checkpointing, weights_loaded=False, free=free)
        for checkpointing in (False, True)
    )
    return {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        **asdict(plain),
        "micro_batch_grad_checkpointing": checkpointed.micro_batch,
        "per_sample_bytes_grad_checkpointing": checkpointed.per_sample_bytes,
    }


def plan_report(model: str | None, layers: Sequence[str] | None, samples: int, eval_samples: int,
                concepts_per_step: int, resolution: int | None = None) -> dict:
    """What `ht plan` prints: the meta-device plan's `summary` at `resolution` (None: the
    model's), with the batch sizes this machine would choose (`batches_here`)."""
    spec = get_model(model).at_resolution(resolution)
    measured = make_plan(spec, layers)
    found = "found in the module tree" if spec.hook_patterns_found else "the spec's patterns"
    return measured.summary(samples, eval_samples, concepts_per_step) | {
        "batches": batches_here(measured), "layers_from": "chosen by --layers" if layers else found}
