"""Building activation datasets: the forward passes, resumable and sharded writing (the settings:
`htcli.data.build_settings`).

Every file is written atomically and a concept file exists only when complete, so a killed
build resumes where it stopped and ends identical to an uninterrupted one. Under torchrun,
concepts are sharded across ranks. `build` is the whole of `ht build-dataset`; `estimate` its
`--dry-run`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from htcli import __version__
from htcli.core.files import check_output_dir, read_json, save_tensors, write_json
from htcli.core.runtime import Progress, barrier, process_group, rank, resolve_device, run_path, world_size
from htcli.data.build_settings import check_existing, make_settings
from htcli.data.concepts import Concept, ConceptLibrary, load_library, slugify
from htcli.data.dataset import FORMAT, SOURCE_CALL, DatasetSettings, select_concepts
from htcli.models import ModelSpec, build_meta_denoiser, denoiser, get_model
from htcli.models.call import DenoiserCall, cat_calls

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class DatasetRequest:
    """What `ht build-dataset` is asked for: the model, the concepts and the sampling."""

    model: str
    out: Path | None = None  # default runs/<model>/data
    split: str = "all"
    concepts: Sequence[str] = ()  # library names or free text; overrides split
    extra_concepts: Sequence[str] = ()  # training concepts added to the selection (never test ones)
    concept_dirs: Sequence[Path] = ()
    limit_concepts: int | None = None
    samples: int = 32
    eval_samples: int = 128
    layers: Sequence[str] | None = None  # module-name patterns; default the spec's
    seed: int = 0
    batch_size: int = DatasetSettings.batch_size
    encoder: str | None = None
    resolution: int | None = None  # pixels; default the model's

    def resolve(self) -> tuple[ModelSpec, Path, ConceptLibrary, list[Concept], DatasetSettings]:
        """Check everything that needs no weights: spec, out, concepts, layers, settings."""
        from htcli.core.hooks import resolve_layers

        spec = get_model(self.model).at_resolution(self.resolution)
        out = check_output_dir(Path(self.out) if self.out is not None else run_path(spec.id, "data"))
        library = load_library(self.concept_dirs)
        concepts = select_concepts(library, self.split, self.concepts, self.limit_concepts, self.seed)
        chosen = {c.name for c in concepts}
        concepts += [c for c in library.extra_training(self.extra_concepts) if c.name not in chosen]
        layers = resolve_layers(build_meta_denoiser(spec), self.layers or spec.hook_patterns)
        settings = make_settings(spec, library, layers, self.samples, self.eval_samples, self.seed, self.encoder,
                                 self.batch_size)
        return spec, out, library, concepts, settings


@dataclass
class BuildSummary:
    concepts: int
    built: int
    skipped: int
    samples: int
    eval_samples: int
    layers: int
    neurons: int
    bytes_on_disk: int
    seconds_per_concept: float
    out: str


@dataclass
class BuildEstimate:
    """A `--dry-run`: what a build would hold, from the meta device (nothing loaded)."""

    model: str
    layers: int
    neurons: int
    concepts: int
    samples: int
    eval_samples: int
    bytes_on_disk: int
    out: str


def estimate(request: DatasetRequest) -> BuildEstimate:
    from htcli.models.plan import make_plan

    spec, out, _, concepts, settings = request.resolve()
    plan = make_plan(spec, request.layers)
    per_concept = plan.dataset_bytes_per_concept(len(settings.fit_seeds), len(settings.eval_seeds))
    return BuildEstimate(spec.id, len(plan.layers), plan.neurons, len(concepts), request.samples, request.eval_samples,
                         per_concept * (len(concepts) + 1), str(out))


def build(
    request: DatasetRequest, *, model_path: str | None = None, device: str | None = None, overwrite: bool = False,
    progress: Progress | None = None,
) -> BuildSummary | None:
    """Build (or resume) the dataset `request` describes; under torchrun, sharded over ranks.
    Returns the summary on rank 0, None on the other ranks."""

    from htcli.core.hooks import resolve_layers
    from htcli.models import load_pipeline
    from htcli.models.encoders import get_encoder

    spec, out, library, concepts, settings = request.resolve()
    torch_device = resolve_device(device)  # this rank's GPU under torchrun
    with process_group(torch_device) as distributed:
        main = rank() == 0 or not distributed
        if main:
            check_existing(out, settings, overwrite)
        pipe = load_pipeline(spec, model_path=model_path, device=torch_device)
        layers = resolve_layers(denoiser(pipe, spec), settings.layers)
        builder = Builder(spec, pipe, layers, settings, get_encoder(settings.encoder, str(torch_device)))
        summary = build_dataset(builder, library, concepts, out, progress if main else None)
    return summary if main else None


def dataset_builder(settings: DatasetSettings, device: str | torch.device = "cpu") -> Builder:
    """A `Builder` for a built dataset's `settings`: its model's pipeline, hooked at its layers,
    with its concept encoder. It captures any concept's activations as the dataset's were."""
    from htcli.core.hooks import resolve_layers
    from htcli.models import load_pipeline
    from htcli.models.encoders import get_encoder

    spec = get_model(settings.model)
    pipe = load_pipeline(spec, device=device)
    layers = resolve_layers(denoiser(pipe, spec), settings.layers)
    return Builder(spec, pipe, layers, settings, get_encoder(settings.encoder, str(torch.device(device))))


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return rank(), world_size()
    return 0, 1


class Builder:
    """Computes pooled activations for prompts paired with the dataset's fixed seeds, replaying
    the pipeline's recorded call of its denoiser."""

    def __init__(self, spec: ModelSpec, pipe, layers: Mapping[str, nn.Module], settings: DatasetSettings, encoder) -> None:
        from htcli.models.record import CallRecorder

        self.spec, self.pipe, self.layers, self.settings, self.encoder = spec, pipe, layers, settings, encoder
        self.model = denoiser(pipe, spec)
        self.recorder = CallRecorder(pipe, spec)

    def _run(self, prompts: Sequence[str], seeds: Sequence[int]) -> tuple[dict[str, Tensor], DenoiserCall]:
        """Pooled activations of `prompts` under `seeds`, and the recorded calls (on the CPU), in
        the settings' batches."""
        from htcli.data.forward import pooled_activations

        pooled: dict[str, list[Tensor]] = {name: [] for name in self.layers}
        calls = []
        size = self.settings.batch_size
        for start in range(0, len(prompts), size):
            call = self.recorder.record(prompts[start : start + size], seeds[start : start + size])
            with torch.no_grad():
                out = pooled_activations(self.model, self.layers, call)
            for name in self.layers:
                pooled[name].append(out[name])
            calls.append(call.to("cpu"))
        return {name: torch.cat(parts) for name, parts in pooled.items()}, cat_calls(calls)

    def _parts(self, concept: Concept):
        """(part, pooled activations, recorded call) for the fit and the eval samples of `concept`."""
        for part in ("fit", "eval"):
            yield (part, *self._run(*self._samples(concept, part)))

    def _samples(self, concept: Concept, part: str) -> tuple[list[str], tuple[int, ...]]:
        """The prompts (with the concept's templates) and paired seeds of `concept`'s `part` samples."""
        s = self.settings
        prompts, seeds = (s.fit_prompts, s.fit_seeds) if part == "fit" else (s.eval_prompts, s.eval_seeds)
        return [concept.apply(p, i) for i, p in enumerate(prompts)], seeds

    def capture(self, concept: Concept) -> dict[str, Tensor]:
        """Pooled (N, D) target activations of `concept` on the fitting samples, from its text:
        the pipeline up to its denoiser's call, then the denoiser up to the last hooked layer
        (early stop). What every per-concept fit needs first, and the hypernetwork does not."""
        return self._run(*self._samples(concept, "fit"))[0]

    def concept_tensors(self, concept: Concept) -> dict[str, Tensor]:
        dtype = STORAGE_DTYPES[self.settings.storage_dtype]
        tensors = {}
        for part, pooled, _ in self._parts(concept):
            tensors |= {f"{part}.{name}": t.to(dtype) for name, t in pooled.items()}
        tensors["embedding"] = self.encoder.encode_text([concept.phrase])[0]
        return tensors

    def source_tensors(self, source: Concept) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The source's pooled activations (in the storage dtype) and recorded calls (as the
        pipeline made them), and the metadata that holds the calls' structure."""
        dtype = STORAGE_DTYPES[self.settings.storage_dtype]
        tensors, structure = {}, None
        for part, pooled, call in self._parts(source):
            tensors |= {f"act.{part}.{name}": t.to(dtype) for name, t in pooled.items()}
            tensors |= call.tensors(f"{part}.call.")
            structure = call.structure_json()
        return tensors, {SOURCE_CALL: structure}


def _manifest(settings: DatasetSettings, concepts: Sequence[Concept], library: ConceptLibrary, complete: bool) -> dict:
    return {
        "format": FORMAT,
        "ht_version": __version__,
        "settings": asdict(settings),
        "settings_digest": settings.digest(),
        "concepts": [
            {"name": c.name, "slug": slugify(c.name), "category": c.category,
             "split": library.split_of(c.name) if c.in_library else "free"}
            for c in concepts
        ],
        "complete": complete,
        "summary": None,
    }


def _sum_over_ranks(counts: Sequence[int], device: torch.device) -> list[int]:
    """Totals of per-rank counts (each rank builds its own shard), summed on `device`: NCCL
    reduces CUDA tensors only."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(counts)
    total = torch.tensor(counts, dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def build_dataset(
    builder: Builder, library: ConceptLibrary, concepts: Sequence[Concept], out: Path, progress: Progress | None = None,
) -> BuildSummary:
    """Build (or resume) the dataset in `out`; with torch.distributed, this rank's shard."""
    rank, world = _dist()
    settings = builder.settings
    digest = settings.digest()
    started = time.perf_counter()
    if rank == 0:
        for stale in out.rglob(".*.tmp"):  # left by a process killed mid-write
            stale.unlink()
        existing = (out / "manifest.json").exists() and read_json(out / "manifest.json")
        names = {c["name"] for c in existing["concepts"]} if existing else set()
        # Adding concepts to a finished dataset keeps the ones already built.
        merged = list(concepts) + [library.resolve(n) for n in sorted(names - {c.name for c in concepts})]
        write_json(out / "manifest.json", _manifest(settings, merged, library, complete=False))
    barrier()  # no rank writes before rank 0 has swept the stale temporary files
    # The source file is one more unit of work, for the last rank (the fewest concepts when
    # they do not divide evenly): no rank waits in a collective while another computes it.
    if rank == world - 1 and _stored_digest(out / "source.safetensors") != digest:
        tensors, metadata = builder.source_tensors(library.source)
        save_tensors(out / "source.safetensors", tensors, metadata | {"settings_digest": digest})
    mine = list(concepts)[rank::world]
    built = skipped = 0
    for index, concept in enumerate(mine):
        path = out / "concepts" / f"{slugify(concept.name)}.safetensors"
        if path.exists() and _stored_digest(path) == digest:
            skipped += 1
        else:
            metadata = {"concept": concept.name, "category": concept.category, "settings_digest": digest}
            save_tensors(path, builder.concept_tensors(concept), metadata)
            built += 1
        if progress:
            progress(index + 1, len(mine), concept.name)
    built, skipped = _sum_over_ranks([built, skipped], builder.model.device)  # also waits for every shard
    elapsed = time.perf_counter() - started
    summary = BuildSummary(
        concepts=len(concepts),
        built=built,
        skipped=skipped,
        samples=len(settings.fit_seeds),
        eval_samples=len(settings.eval_seeds),
        layers=len(settings.layers),
        neurons=sum(settings.widths),
        bytes_on_disk=sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        seconds_per_concept=elapsed / max(built, 1),
        out=str(out),
    )
    if rank == 0:
        manifest = read_json(out / "manifest.json")
        manifest["complete"] = all(
            (out / "concepts" / f"{c['slug']}.safetensors").exists() for c in manifest["concepts"]
        )
        manifest["summary"] = {"concepts": len(manifest["concepts"]), "bytes_on_disk": summary.bytes_on_disk}
        write_json(out / "manifest.json", manifest)
    return summary


def _stored_digest(path: Path) -> str | None:
    """The settings digest a finished file was built with; None if absent or unreadable."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("settings_digest")
    except Exception:  # an unreadable file is rebuilt
        return None
