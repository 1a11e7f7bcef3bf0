"""Activation datasets: cached source inputs and pooled target activations per concept.

Layout of a dataset directory:

    manifest.json               settings (model, layers, prompts, seeds, encoder), concept list
    source.safetensors          source inputs (fit.* and eval.*) and pooled source activations
    concepts/<slug>.safetensors pooled target activations fit.<layer> (N, D), eval.<layer>
                                (M, D), and the concept embedding (E,)

Target sample i is source prompt i with the concept's template applied, under the same seed
(paired samples: only the concept differs). Fitting samples and evaluation samples use disjoint
prompts and seeds. Every file is written atomically; a concept file exists only when
complete, so a killed build resumes where it stopped and ends identical to an uninterrupted
one. Under torchrun, concepts are sharded across ranks.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from htcli import __version__
from htcli.core.files import read_json, save_tensors, write_json
from htcli.core.runtime import barrier, run_path
from htcli.data.concepts import Concept, ConceptLibrary, slugify
from htcli.errors import HTError
from htcli.models import denoiser

FORMAT = "ht-dataset/1"
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class DatasetSettings:
    """Everything that determines a dataset's contents; two builds with equal settings are equal."""

    model: str
    layers: tuple[str, ...]
    widths: tuple[int, ...]
    encoder: str
    fit_prompts: tuple[str, ...]
    eval_prompts: tuple[str, ...]
    fit_seeds: tuple[int, ...]
    eval_seeds: tuple[int, ...]
    storage_dtype: str = "float16"
    batch_size: int = 16  # part of the settings: batch composition can change float rounding

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, data: dict) -> DatasetSettings:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def split_prompts(prompts: Sequence[str], samples: int, eval_samples: int, seed: int) -> tuple[list[str], list[str]]:
    """Disjoint fitting and evaluation prompts from a seeded shuffle (cycled if too few)."""
    if samples < 2:
        raise HTError(f"--samples-per-concept must be at least 2 (W2 compares distributions), got {samples}")
    if eval_samples < 2:
        raise HTError(f"--eval-samples must be at least 2, got {eval_samples}")
    order = list(prompts)
    random.Random(seed).shuffle(order)
    if len(order) < 2:
        raise HTError("need at least 2 source prompts")
    n_fit = min(samples, len(order) // 2)  # keep prompts disjoint even for huge sample counts
    fit_pool, eval_pool = order[:n_fit], order[n_fit:]
    fit = [fit_pool[i % len(fit_pool)] for i in range(samples)]
    evaluation = [eval_pool[i % len(eval_pool)] for i in range(eval_samples)]
    return fit, evaluation


def make_seeds(seed: int, samples: int, eval_samples: int) -> tuple[list[int], list[int]]:
    base = seed * 1_000_000
    return list(range(base, base + samples)), list(range(base + 500_000, base + 500_000 + eval_samples))


def make_settings(
    spec, library: ConceptLibrary, layers: Mapping[str, nn.Module], samples: int, eval_samples: int, seed: int,
    encoder: str | None = None, batch_size: int = 16,
) -> DatasetSettings:
    """Settings for `spec` hooked at `layers`: seeded disjoint fit/eval prompts and seeds."""
    from htcli.core.hooks import module_width

    if batch_size < 1:
        raise HTError(f"--batch-size must be positive, got {batch_size}")
    fit_prompts, eval_prompts = split_prompts(library.source_prompts(), samples, eval_samples, seed)
    fit_seeds, eval_seeds = make_seeds(seed, samples, eval_samples)
    return DatasetSettings(
        model=spec.id,
        layers=tuple(layers),
        widths=tuple(module_width(m) for m in layers.values()),
        encoder=encoder or spec.concept_encoder,
        fit_prompts=tuple(fit_prompts),
        eval_prompts=tuple(eval_prompts),
        fit_seeds=tuple(fit_seeds),
        eval_seeds=tuple(eval_seeds),
        storage_dtype="bfloat16" if spec.dtype == "bfloat16" else "float16",
        batch_size=batch_size,
    )


def select_concepts(
    library: ConceptLibrary, split: str, names: Sequence[str] = (), limit: int | None = None, seed: int = 0
) -> list[Concept]:
    """Concepts to build: the named ones (library or free text), else a split's, optionally a
    seeded sample of `limit` of them (so a small dataset still mixes train and test)."""
    if names:
        concepts = []
        for name in names:
            if not name.strip():
                raise HTError("--concept got an empty concept name")
            concepts.append(library.resolve(name))
    else:
        if split not in ("train", "test", "all"):
            raise HTError(f"--split must be train, test or all, got {split!r}")
        concepts = library.targets(split=None if split == "all" else split)
        if limit is not None:
            if limit < 1:
                raise HTError(f"--limit-concepts must be positive, got {limit}")
            concepts = list(concepts)
            random.Random(seed).shuffle(concepts)
            concepts = sorted(concepts[:limit], key=lambda c: c.name.lower())
    slugs = [slugify(c.name) for c in concepts]
    if len(set(slugs)) != len(slugs):
        raise HTError("two selected concepts map to the same file name; rename one")
    return list(concepts)


# --- building ----------------------------------------------------------------------------


@dataclass
class BuildSummary:
    concepts: int
    built: int
    skipped: int
    samples_per_concept: int
    eval_samples: int
    layers: int
    neurons: int
    bytes_on_disk: int
    seconds_per_concept: float
    out: str
    extra: dict = field(default_factory=dict)


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Builder:
    """Computes pooled activations for prompts paired with the dataset's fixed seeds."""

    def __init__(self, spec, pipe, layers, settings: DatasetSettings, encoder) -> None:
        self.spec, self.pipe, self.layers, self.settings, self.encoder = spec, pipe, layers, settings, encoder
        self.model = denoiser(pipe, spec)

    def _run(self, prompts: Sequence[str], seeds: Sequence[int]) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        from htcli.data.forward import encode_inputs, pooled_activations

        pooled: dict[str, list[Tensor]] = {name: [] for name in self.layers}
        inputs = []
        size = self.settings.batch_size
        for start in range(0, len(prompts), size):
            batch = encode_inputs(self.spec, self.pipe, prompts[start : start + size], seeds[start : start + size])
            with torch.no_grad():
                out = pooled_activations(self.spec, self.model, self.layers, batch)
            for name in self.layers:
                pooled[name].append(out[name])
            inputs.append(batch)
        return {name: torch.cat(parts) for name, parts in pooled.items()}, inputs

    def _parts(self, concept: Concept):
        """(part, pooled activations, encoder inputs) for the fit and the eval samples of `concept`."""
        s = self.settings
        for part, prompts, seeds in (("fit", s.fit_prompts, s.fit_seeds), ("eval", s.eval_prompts, s.eval_seeds)):
            yield (part, *self._run([concept.apply(p, i) for i, p in enumerate(prompts)], seeds))

    def concept_tensors(self, concept: Concept) -> dict[str, Tensor]:
        dtype = STORAGE_DTYPES[self.settings.storage_dtype]
        tensors = {}
        for part, pooled, _ in self._parts(concept):
            tensors |= {f"{part}.{name}": t.to(dtype) for name, t in pooled.items()}
        tensors["embedding"] = self.encoder.encode_text([concept.phrase])[0]
        return tensors

    def source_tensors(self, source: Concept) -> dict[str, Tensor]:
        from htcli.data.forward import pad_text

        dtype = STORAGE_DTYPES[self.settings.storage_dtype]
        tensors = {}
        for part, pooled, inputs in self._parts(source):
            tensors |= {f"act.{part}.{name}": t.to(dtype) for name, t in pooled.items()}
            batches = pad_text(inputs)
            for key in batches[0]:
                joined = torch.cat([b[key] for b in batches])
                keep_exact = key in ("noise", "mask", "time_ids")
                tensors[f"{part}.{key}"] = joined.float() if keep_exact else joined.to(dtype)
        return tensors


def _manifest(settings: DatasetSettings, concepts: Sequence[Concept], library: ConceptLibrary, complete: bool, summary=None) -> dict:
    return {
        "format": FORMAT,
        "ht_version": __version__,
        "settings": asdict(settings),
        "settings_digest": settings.digest(),
        "concepts": [
            {"name": c.name, "slug": slugify(c.name), "category": c.category, "split": library.split_of(c.name) if c.in_library else "free"}
            for c in concepts
        ],
        "complete": complete,
        "summary": summary,
    }


def check_existing(out: Path, settings: DatasetSettings, overwrite: bool) -> None:
    """Refuse to mix a dataset built with other settings into `out`, unless overwriting."""
    if out.exists() and not out.is_dir():
        raise HTError(f"--out {out} is a file, not a directory")
    manifest = out / "manifest.json"
    if not manifest.exists():
        return
    existing = read_json(manifest)
    if existing.get("settings_digest") == settings.digest():
        return
    if not overwrite:
        raise HTError(
            f"{out} holds a dataset built with other settings (model, layers, prompts, seeds, encoder or "
            "batch size differ); choose another --out or pass --overwrite"
        )
    for path in (out / "concepts").glob("*.safetensors"):
        path.unlink()
    (out / "source.safetensors").unlink(missing_ok=True)
    manifest.unlink()


def build_dataset(
    builder: Builder,
    library: ConceptLibrary,
    concepts: Sequence[Concept],
    out: Path,
    progress: Callable[[int, int, str], None] | None = None,
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
        if _file_digest(out / "source.safetensors") != digest:
            save_tensors(out / "source.safetensors", builder.source_tensors(library.source), {"settings_digest": digest})
    barrier()
    mine = list(concepts)[rank::world]
    built = skipped = 0
    for index, concept in enumerate(mine):
        path = out / "concepts" / f"{slugify(concept.name)}.safetensors"
        if path.exists() and _file_digest(path) == digest:
            skipped += 1
        else:
            metadata = {"concept": concept.name, "category": concept.category, "settings_digest": digest}
            save_tensors(path, builder.concept_tensors(concept), metadata)
            built += 1
        if progress:
            progress(index + 1, len(mine), concept.name)
    barrier()
    elapsed = time.perf_counter() - started
    summary = BuildSummary(
        concepts=len(concepts),
        built=built,
        skipped=skipped,
        samples_per_concept=len(settings.fit_seeds),
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


def _file_digest(path: Path) -> str | None:
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("settings_digest")
    except Exception:  # an unreadable file is rebuilt
        return None


# --- reading -----------------------------------------------------------------------------


def resolve_dataset(data: Path | None, model: str) -> Path:
    """`data`, else runs/<model>/data; a missing default names the command that builds it."""
    if data is not None:
        return Path(data)
    path = run_path(model, "data")
    if not (path / "manifest.json").exists():
        raise HTError(f"no dataset at {path}; build it with `ht build-dataset --model {model}` or pass --data")
    return path


class ActivationDataset:
    """Read access to a built dataset; tensors are read lazily, file by file."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not (self.root / "manifest.json").exists():
            raise HTError(f"{self.root} is not an ht dataset (no manifest.json); build one with `ht build-dataset`")
        self.manifest = read_json(self.root / "manifest.json")
        if self.manifest.get("format") != FORMAT:
            raise HTError(f"{self.root}: unsupported dataset format {self.manifest.get('format')!r}")
        self.settings = DatasetSettings.from_json(self.manifest["settings"])
        self._entries = {c["name"]: c for c in self.manifest["concepts"]}

    @property
    def layers(self) -> dict[str, int]:
        return dict(zip(self.settings.layers, self.settings.widths))

    def _path(self, name: str) -> Path:
        if name not in self._entries:
            raise HTError(f"concept {name!r} is not in the dataset {self.root}")
        return self.root / "concepts" / f"{self._entries[name]['slug']}.safetensors"

    def names(self, split: str | None = None) -> list[str]:
        """Built concepts, optionally of one split ('train', 'test' or 'free')."""
        return [
            c["name"]
            for c in self.manifest["concepts"]
            if (split is None or c["split"] == split) and self._path(c["name"]).exists()
        ]

    def targets(self, names: Sequence[str], part: str = "fit") -> dict[str, Tensor]:
        """Pooled targets per layer, float32, shape (K, N, D) for the K concepts `names`."""
        from safetensors import safe_open

        per_layer: dict[str, list[Tensor]] = {layer: [] for layer in self.settings.layers}
        for name in names:
            with safe_open(str(self._path(name)), "pt") as f:
                for layer in self.settings.layers:
                    per_layer[layer].append(f.get_tensor(f"{part}.{layer}").float())
        return {layer: torch.stack(ts) for layer, ts in per_layer.items()}

    def embeddings(self, names: Sequence[str]) -> Tensor:
        from safetensors import safe_open

        rows = []
        for name in names:
            with safe_open(str(self._path(name)), "pt") as f:
                rows.append(f.get_tensor("embedding"))
        return torch.stack(rows)

    def source_inputs(self, part: str = "fit") -> dict[str, Tensor]:
        from safetensors import safe_open

        with safe_open(str(self.root / "source.safetensors"), "pt") as f:
            prefix = f"{part}."
            return {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}

    def source_activations(self, part: str = "fit") -> dict[str, Tensor]:
        from safetensors import safe_open

        with safe_open(str(self.root / "source.safetensors"), "pt") as f:
            return {layer: f.get_tensor(f"act.{part}.{layer}").float() for layer in self.settings.layers}
