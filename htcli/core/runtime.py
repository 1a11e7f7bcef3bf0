"""Where runs live and what they run on: `HT_RUNS`, devices, torch.distributed set-up, and
how long jobs report progress."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch

from htcli.errors import HTError

# How a long job reports progress: (units done, units in all, what it is doing now). The CLI
# turns it into a progress bar or plain lines; library users may pass any callable or None.
Progress = Callable[[int, int, str], None]


def runs_root() -> Path:
    return Path(os.environ.get("HT_RUNS", "runs"))


def run_path(model: str, kind: str) -> Path:
    """Default location of a run artefact: `runs/<model>/<kind>` (dataset, baselines, hyper...);
    a model named by a pipeline folder's absolute path nests that path under runs/."""
    return runs_root() / model.lstrip("/") / kind


def world_size() -> int:
    """How many processes run the job: torchrun's WORLD_SIZE, 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(device: str | None) -> torch.device:
    """`--device`: default CUDA when available, else CPU. A CUDA device without index is this
    process's GPU: `cuda:$LOCAL_RANK` under torchrun, else `cuda:0`. Under torchrun with several
    processes an explicit `cuda:N` is refused: it would put every process on one GPU."""
    if device is None:
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError:
            raise HTError(f"--device {device!r} is not a torch device (try cpu, cuda, cuda:1)") from None
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise HTError("--device cuda asked for, but no CUDA device is available")
    if resolved.type != "cuda":
        return resolved
    if resolved.index is not None:
        if world_size() > 1:
            raise HTError(f"--device {device} under torchrun with {world_size()} processes would put them all on one "
                          "GPU: pass --device cuda (each takes cuda:$LOCAL_RANK; choose GPUs with CUDA_VISIBLE_DEVICES)")
        return resolved
    local_rank, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= visible:
        raise HTError(f"torchrun process with LOCAL_RANK {local_rank} has no GPU of its own ({visible} visible): "
                      f"start at most {visible} processes per machine (--nproc_per_node)")
    return torch.device("cuda", local_rank)


def is_main_process() -> bool:
    """Whether this process reports for the job: always outside torchrun, rank 0 under it (from
    the environment, so it answers before the process group is joined)."""
    return os.environ.get("RANK", "0") == "0"


# How long a rank waits in a collective for the others before the job fails, in minutes. The
# longest waits are model loading on a cold disk (DDP's first broadcast), the uneven tail of
# an evaluation round and rank 0's checkpoint writes: NCCL's own 10 minutes is short for those.
TIMEOUT_VARIABLE = "HT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_MINUTES = 30.0


def distributed_timeout() -> timedelta:
    """The collective timeout: `HT_DIST_TIMEOUT` minutes (default 30)."""
    value = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_MINUTES))
    try:
        minutes = float(value)
    except ValueError:
        minutes = math.nan
    if not 0 < minutes < math.inf:
        raise HTError(f"{TIMEOUT_VARIABLE} must be a positive number of minutes, got {value!r}")
    return timedelta(minutes=minutes)


def init_distributed(device: torch.device) -> bool:
    """Join the process group when torchrun launched several processes: NCCL bound to this
    rank's GPU when `device` (from `resolve_device`) is CUDA, gloo on CPU. Returns whether the
    job is distributed."""
    import torch.distributed as dist

    if world_size() <= 1 or dist.is_initialized():
        return dist.is_initialized()
    timeout = distributed_timeout()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # collectives and object gathers use the current device
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return True


def barrier() -> None:
    """Wait for every rank (a no-op outside torch.distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def close_distributed() -> None:
    """Leave the process group, every rank together: a barrier, then the teardown (gloo aborts a
    process whose peer closes the connections first)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def process_group(device: torch.device) -> Iterator[bool]:
    """torchrun's process group for the block; yields whether the job is distributed. A group the
    block joined is closed when it ends normally. After an error it is left as it is: a barrier or
    a teardown while other ranks wait in a collective would hang them, and torchrun stops them
    once this rank exits. A group joined before the block belongs to its caller and stays."""
    import torch.distributed as dist

    joined_here = not (dist.is_available() and dist.is_initialized())
    distributed = init_distributed(device)
    yield distributed
    if distributed and joined_here:
        close_distributed()
