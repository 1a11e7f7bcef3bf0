"""`ht plan --measure`: what a run costs here, measured on the model's architecture with random weights.

Five phases, each in a fresh process of its own, so that its peak memory is its own (peak RSS,
VmHWM, on the CPU; `torch.cuda.max_memory_allocated` on CUDA), with the model's random-weights
variant (`htcli.models.random_weights`: full width, no download). A phase's peak is taken once
its model is loaded (the weights stay in it; a weights file's mapped pages and the dtype
conversion of loading do not): Linux's /proc/self/clear_refs, CUDA's reset_peak_memory_stats.
The peak of loading is recorded beside it.

1. capture: `build-dataset`'s work for one concept (the pipeline in the spec's dtype, the
   source and the concept, N fitting + 2 evaluation samples each), into a temporary dataset;
2. one LinEAS step on that concept's N samples, without and with gradient checkpointing;
3. one hypernetwork training step of K concepts x N samples, without and with checkpointing.

Steps are timed warm (the second of two). Every phase is printed beside the estimate of
`htcli.models.memory` for the same batch: denoiser weights plus activations.

    measured = measure(MeasureRequest("pixart", resolution=256, device="cpu", samples=4))
    [(phase.name, phase.seconds_per_sample, phase.peak_bytes, phase.estimate_bytes) for phase in measured.phases]
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import torch

from htcli.core.runtime import Progress
from htcli.errors import HTError
from htcli.models import get_model
from htcli.models.plan import Plan, make_plan
from htcli.models.spec import RANDOM_WEIGHTS_VARIABLE, ModelSpec

EVAL_SAMPLES = 2  # the fewest a dataset takes: capture is measured per sample
# (phase, gradient checkpointing): the processes `measure` starts, in order.
PHASES = (("capture", False), ("lineas", False), ("lineas", True), ("train", False), ("train", True))


@dataclass(frozen=True)
class MeasureRequest:
    """What `ht plan --measure` measures: the model, where and how, and how many samples."""

    model: str | None = None
    resolution: int | None = None  # pixels; None: the model's
    device: str | None = None  # default as `resolve_device`
    dtype: str = "auto"  # what fitting and training compute in (`htcli.core.precision`)
    samples: int = 4  # N: fitting samples per concept
    concepts_per_step: int = 2  # K: concepts per training step
    micro_batch: int | None = None  # samples per backward pass; None: what training would choose here
    layers: Sequence[str] | None = None  # hook patterns; None: the spec's

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise HTError(f"samples= must be at least 2 (W2 compares distributions), got {self.samples}")
        if self.concepts_per_step < 1:
            raise HTError(f"concepts_per_step= must be positive, got {self.concepts_per_step}")
        if self.micro_batch is not None and self.micro_batch < 0:
            raise HTError(f"micro_batch= must be 0 (off) or positive, got {self.micro_batch}")


@dataclass
class Phase:
    """One measured phase beside its estimate."""

    name: str  # "capture", "lineas step", "train step", with ", grad checkpointing"
    samples: int  # samples the timed work went through
    seconds: float
    peak_bytes: int  # from the model loaded to the phase's end: peak RSS on the CPU, peak allocated on CUDA
    base_bytes: int  # the same process before anything loaded (imports; 0 on CUDA)
    load_peak_bytes: int  # the same process's peak while loading the model
    estimate_bytes: int  # htcli.models.memory's figure for the same batch: weights + activations
    batch: int  # samples per forward pass (capture) or per backward pass (steps)
    dtype: str  # what the denoiser computed in

    @property
    def seconds_per_sample(self) -> float:
        return self.seconds / self.samples


@dataclass
class Measurement:
    model: str
    resolution: int
    device: str
    samples: int
    concepts_per_step: int
    phases: list[Phase] = field(default_factory=list)
    random_weights: bool = True

    def record(self) -> dict:
        """JSON-ready, with seconds per sample."""
        return asdict(self) | {"phases": [asdict(p) | {"seconds_per_sample": p.seconds_per_sample} for p in self.phases]}


def measured_spec(model: str | None, resolution: int | None) -> ModelSpec:
    """The spec `measure` runs: the model's random-weights variant (an offline model as it is:
    its weights are random already), at `resolution`."""
    return get_model(model, random_weights=True).at_resolution(resolution)


def plan(model: str | None, layers: Sequence[str] | None, samples: int, eval_samples: int, concepts_per_step: int,
         resolution: int | None = None, measure_request: MeasureRequest | None = None,
         progress: Progress | None = None) -> tuple[dict, Measurement | None]:
    """What `ht plan` reports: the meta-device estimates (`plan_report`) and, given a
    `measure_request`, that request's `measure`ment (else None)."""
    from htcli.models.memory import plan_report

    estimates = plan_report(model, layers, samples, eval_samples, concepts_per_step, resolution)
    return estimates, measure(measure_request, progress) if measure_request is not None else None


def measure(request: MeasureRequest, progress: Progress | None = None) -> Measurement:
    """Run the five phases (module docstring), each in a fresh process, and set each beside its
    estimate. The random weights are drawn first (once, cached), outside every phase."""
    from htcli.core.runtime import resolve_device

    spec = measured_spec(request.model, request.resolution)
    device = resolve_device(request.device)
    layers = tuple(request.layers or spec.hook_patterns)
    result = Measurement(spec.id, spec.resolution, str(device), request.samples, request.concepts_per_step,
                         random_weights=spec.random_weights)
    job = replace(request, model=spec.id, device=str(device), layers=layers)
    logging = _logging_here()
    plan = make_plan(spec, layers)  # what every phase's estimate is made of
    with tempfile.TemporaryDirectory(prefix="ht-measure-") as folder:
        if progress:
            progress(0, len(PHASES), "random weights")
        _in_fresh_process(_prepare, job, logging)
        for index, (phase, checkpointing) in enumerate(PHASES):
            if progress:
                progress(index, len(PHASES), f"{phase}{', grad checkpointing' if checkpointing else ''}")
            raw = _in_fresh_process(_run_phase, job, logging, phase, checkpointing, folder)
            result.phases.append(_with_estimate(plan, phase, checkpointing, raw))
    if progress:
        progress(len(PHASES), len(PHASES), "done")
    return result


def _in_fresh_process(function, *args):
    """`function(*args)` in a new (spawned) process: its memory is its own, and nothing of it stays."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        try:
            return pool.submit(function, *args).result()
        except BrokenProcessPool:
            raise HTError("the measuring process died (killed for lack of memory?); try a smaller resolution=, "
                          "samples= or micro_batch=") from None


def _with_estimate(plan: Plan, phase: str, checkpointing: bool, raw: dict) -> Phase:
    """A measured phase and `htcli.models.memory`'s estimate of its peak: the denoiser's weights
    and the activations of one batch (plus, for training, the hypernetwork and AdamW's state)."""
    from htcli.methods.hypernetwork import HyperConfig, parameter_count
    from htcli.models.memory import element_size, forward_bytes_per_sample, per_sample_bytes

    dtype = getattr(torch, raw["dtype"])
    weights = plan.denoiser_params * element_size(dtype)
    if phase == "capture":
        estimate = weights + raw["batch"] * forward_bytes_per_sample(plan, dtype)
        name = "capture"
    else:
        estimate = weights + raw["batch"] * per_sample_bytes(plan, dtype, checkpointing)
        if phase == "train":
            hyper = HyperConfig(embed_dim=raw["embed_dim"], layers=tuple((layer.name, layer.width) for layer in plan.layers))
            estimate += 16 * parameter_count(hyper)  # float32 weights, gradients, AdamW's two moments
        name = f"{'LinEAS' if phase == 'lineas' else 'train'} step{', grad checkpointing' if checkpointing else ''}"
    return Phase(name, raw["samples"], raw["seconds"], raw["peak_bytes"], raw["base_bytes"], raw["load_peak_bytes"],
                 estimate, raw["batch"], raw["dtype"])


# --- what runs in the fresh processes ---------------------------------------------------------


def _status_bytes(field_name: str) -> int | None:
    """A memory line of /proc/self/status, in bytes (None where there is no /proc)."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1]) * 1024  # the file counts in kB
    return None


def _peak(device: torch.device) -> int:
    """This process's peak memory since the last `_restart_peak`: allocated on CUDA, RSS elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    peak = _status_bytes("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return peak


def _restart_peak(device: torch.device) -> int:
    """The peak so far (loading), then the peak counted afresh from what is in memory now."""
    loaded = _peak(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
        except OSError:  # elsewhere the phase's peak includes loading
            pass
    return loaded


def _logging_here() -> tuple[int, int, bool]:
    """diffusers' and transformers' log levels and transformers' progress bars in this process,
    for the measuring processes to chatter no more than their parent (`ht` quiets them)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    return (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity(),
            transformers_logging.is_progress_bar_enabled())


def _spec_here(job: MeasureRequest, logging: tuple[int, int, bool]) -> ModelSpec:
    """The measured spec in a measuring process, whose libraries log as its parent's do."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity(logging[0])
    transformers_logging.set_verbosity(logging[1])
    if not logging[2]:
        transformers_logging.disable_progress_bar()
    os.environ[RANDOM_WEIGHTS_VARIABLE] = "1"  # this process and the libraries it calls: random weights
    return get_model(job.model).at_resolution(job.resolution)


def _prepare(job: MeasureRequest, logging: tuple[int, int, bool]) -> None:
    """Draw and cache the random denoiser (its drawing is no phase's memory)."""
    from htcli.models.random_weights import random_weights_file

    spec = _spec_here(job, logging)
    if spec.random_weights:
        random_weights_file(spec)


def _run_phase(job: MeasureRequest, logging: tuple[int, int, bool], phase: str, checkpointing: bool,
               folder: str) -> dict:
    """One phase in this (fresh) process: its timed work, samples, batch and peak memory."""
    import diffusers  # noqa: F401  (imports count in the base, not in the phase)

    from htcli.core.runtime import resolve_device

    spec = _spec_here(job, logging)
    device = resolve_device(job.device)
    base = 0 if device.type == "cuda" else (_status_bytes("VmRSS") or 0)
    if phase == "capture":
        raw = _capture(spec, job, device, Path(folder))
    else:
        raw = _step(spec, job, device, Path(folder), phase, checkpointing)
    return raw | {"peak_bytes": _peak(device), "base_bytes": base}


def _capture(spec: ModelSpec, job: MeasureRequest, device: torch.device, folder: Path) -> dict:
    """`build-dataset` of the source and one training concept of the library into `folder`."""
    from htcli.core.hooks import resolve_layers
    from htcli.data.build import Builder, build_dataset
    from htcli.data.build_settings import make_settings
    from htcli.data.concepts import load_library
    from htcli.models import denoiser, load_pipeline
    from htcli.models.encoders import get_encoder

    library = load_library()
    pipe = load_pipeline(spec, device=device)
    layers = resolve_layers(denoiser(pipe, spec), job.layers)
    settings = make_settings(spec, library, layers, job.samples, EVAL_SAMPLES, seed=0)
    builder = Builder(spec, pipe, layers, settings, get_encoder(settings.encoder, str(device)))
    loaded = _restart_peak(device)
    start = time.perf_counter()
    build_dataset(builder, library, [library.targets("train")[0]], folder)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "samples": 2 * (job.samples + EVAL_SAMPLES), "dtype": spec.dtype,
            "batch": min(settings.batch_size, job.samples + EVAL_SAMPLES), "load_peak_bytes": loaded}


def _step(spec: ModelSpec, job: MeasureRequest, device: torch.device, folder: Path, phase: str,
          checkpointing: bool) -> dict:
    """Two LinEAS steps, or two training steps, on the dataset `_capture` wrote: the second timed."""
    from htcli.data.dataset import ActivationDataset
    from htcli.data.forward import Frozen
    from htcli.methods.baselines import LineasConfig, fit_lineas
    from htcli.methods.hypernetwork import HyperConfig
    from htcli.methods.train_config import TrainConfig
    from htcli.methods.training import Trainer

    dataset = ActivationDataset(folder)
    frozen = Frozen.load(spec, dataset.settings.layers, device, job.dtype, checkpointing)
    micro_batch = frozen.micro_batch if job.micro_batch is None else job.micro_batch
    n = job.samples
    total = n if phase == "lineas" else job.concepts_per_step * n
    batch = total if not micro_batch else min(micro_batch, total)
    raw = {"samples": total, "dtype": str(frozen.model.dtype).removeprefix("torch."), "batch": batch}
    if phase == "lineas":
        name = dataset.names()[0]
        target = {layer: t[0] for layer, t in dataset.targets([name]).items()}  # (N, D) per layer
        raw["load_peak_bytes"] = _restart_peak(device)
        ends: list[float] = []
        fit_lineas(frozen, dataset.source_inputs("fit"), target, LineasConfig(steps=2, micro_batch=micro_batch),
                   on_step=lambda step, loss: ends.append(time.perf_counter()))
        return raw | {"seconds": ends[1] - ends[0]}
    embed_dim = int(dataset.embeddings(dataset.names()[:1]).shape[-1])
    hyper = HyperConfig(embed_dim=embed_dim, layers=tuple(dataset.layers.items()))
    config = TrainConfig(steps=2, concepts_per_step=job.concepts_per_step, val_fraction=0.0, dtype=job.dtype,
                         micro_batch=micro_batch)
    trainer = Trainer(frozen, dataset, hyper, config, folder / "hyper", spec.id)
    raw["load_peak_bytes"] = _restart_peak(device)
    trainer.train_step()
    start = time.perf_counter()
    trainer.train_step()
    return raw | {"seconds": time.perf_counter() - start, "embed_dim": embed_dim}
