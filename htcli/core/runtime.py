"""Where runs live and what they run on: `HT_RUNS`, devices, torch.distributed set-up, and
how long jobs report progress."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from htcli.errors import HTError

# How a long job reports progress: (units done, units in all, what it is doing now). The CLI
# turns it into a progress bar or plain lines; library users may pass any callable or None.
Progress = Callable[[int, int, str], None]


def runs_root() -> Path:
    return Path(os.environ.get("HT_RUNS", "runs"))


def run_path(model: str, kind: str) -> Path:
    """Default location of a run artefact: `runs/<model>/<kind>` (dataset, baselines, hyper...)."""
    return runs_root() / model / kind


def resolve_device(device: str | None) -> torch.device:
    """`--device`: default CUDA when available (this rank's GPU under torchrun), else CPU."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise HTError(f"--device {device!r} is not a torch device (try cpu, cuda, cuda:1)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise HTError("--device cuda asked for, but no CUDA device is available")
    return resolved


def is_main_process() -> bool:
    """Whether this process reports for the job: always outside torchrun, rank 0 under it (from
    the environment, so it answers before the process group is joined)."""
    return os.environ.get("RANK", "0") == "0"


def init_distributed() -> bool:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def barrier() -> None:
    """Wait for every rank (a no-op outside torch.distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def close_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
