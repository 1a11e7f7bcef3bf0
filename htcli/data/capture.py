"""A concept's target activations captured on the fly, so that `--refine` works for any text.

Refining (LinEAS warm-started from a prediction, `htcli.methods.refine`) fits on a concept's
paired targets: the fitting prompts with the concept's template applied, under the fitting
seeds. A concept built into a dataset has them on disk; for any other text, `CapturedTargets`
captures them once (the pipeline's own call of its denoiser recorded, `htcli.models.record`,
then replayed through the frozen denoiser with early stop) and keeps them, so that the next request for the
concept costs nothing.

The fitting samples are a dataset's (the one the caller names, with its prompts, seeds and
layers), or without one the 32 that `ht build-dataset` draws with its defaults (seed 0), at the
hypernetwork's layers (`default_settings`). Files live in `runs/<model>/refine-cache/<settings
digest>[-<local weights>]/`: `source.safetensors` (the fitting samples' cached inputs) and one
`<slug>-<hash>.safetensors` per concept (its targets, stored in the settings' storage dtype as a
dataset stores them), each written atomically. It reads like the part of an `ActivationDataset`
that refining reads: `fitting_samples`, `source_inputs("fit")`, `targets(names, "fit")`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from htcli.core.files import read_tensors, save_tensors
from htcli.core.runtime import raise_if_cancelled, run_path
from htcli.data.build import STORAGE_DTYPES
from htcli.data.build_settings import make_seeds, split_prompts
from htcli.data.concepts import Concept, ConceptLibrary, slugify
from htcli.data.dataset import SOURCE_CALL, DatasetSettings
from htcli.errors import HTError
from htcli.models.call import DenoiserCall, cat_calls

DEFAULT_SAMPLES = 32  # what `ht build-dataset` draws per concept by default
Encode = Callable[[Sequence[str], Sequence[int]], DenoiserCall]  # (prompts, seeds) -> the denoiser's recorded call
Forward = Callable[[DenoiserCall], dict[str, Tensor]]  # recorded call -> pooled (N, D) per layer


def default_settings(model: str, layers: Sequence[tuple[str, int]], encoder: str, library: ConceptLibrary,
                     storage_dtype: str, random_weights: bool = False, resolution: int | None = None) -> DatasetSettings:
    """The fitting samples `ht build-dataset --model MODEL` would draw with its defaults (32, seed 0),
    at `layers` ((name, width) pairs, the hypernetwork's), on the weights and at the resolution
    given; two evaluation samples, never used."""
    fit_prompts, eval_prompts = split_prompts(library.source_prompts(), DEFAULT_SAMPLES, 2, 0)
    fit_seeds, eval_seeds = make_seeds(0, DEFAULT_SAMPLES, 2)
    return DatasetSettings(model=model, layers=tuple(n for n, _ in layers), widths=tuple(w for _, w in layers),
                           encoder=encoder, fit_prompts=tuple(fit_prompts), eval_prompts=tuple(eval_prompts),
                           fit_seeds=tuple(fit_seeds), eval_seeds=tuple(eval_seeds), storage_dtype=storage_dtype,
                           random_weights=random_weights, resolution=resolution)


class CapturedTargets:
    """Targets of concepts on `settings`' fitting samples, captured by `ensure` and cached in `root`."""

    def __init__(self, settings: DatasetSettings, encode: Encode, forward: Forward, root: Path | None = None,
                 source: DenoiserCall | None = None, max_concepts: int | None = None) -> None:
        """encode: the pipeline's call of its denoiser, recorded (`htcli.models.record`); forward:
        the frozen denoiser's pooled activations; source: the fitting samples' recorded call when
        a dataset already has it (else it is recorded once and cached); max_concepts: how many
        concepts' files the folder keeps at most (the oldest written go first; None: no bound)."""
        self.settings, self._encode, self._forward, self.max_concepts = settings, encode, forward, max_concepts
        self.root = Path(root) if root is not None else run_path(settings.model, "refine-cache") / settings.digest()
        self._source = source
        self._files: dict[str, Path] = {}  # concept name -> its targets file

    def _recorded(self, prompts: Sequence[str]) -> DenoiserCall:
        """The denoiser's call for `prompts` under the fitting seeds, recorded in the settings' batches."""
        size, seeds = self.settings.batch_size, self.settings.fit_seeds
        return cat_calls([self._encode(prompts[i:i + size], seeds[i:i + size]).to("cpu")
                          for i in range(0, len(prompts), size)])

    def source_inputs(self, part: str = "fit") -> DenoiserCall:
        if part != "fit":
            raise HTError("captured targets have fitting samples only (refining evaluates on a dataset)")
        if self._source is None:
            path = self.root / "source.safetensors"
            read = self._read(path, [])
            if read is not None and SOURCE_CALL in read[1]:
                self._source = DenoiserCall.from_tensors(read[1][SOURCE_CALL], read[0])
            if self._source is None or len(self._source) != len(self.settings.fit_seeds):
                self._source = self._recorded(list(self.settings.fit_prompts))
                save_tensors(path, self._source.tensors(),
                             {"settings_digest": self.settings.digest(), SOURCE_CALL: self._source.structure_json()})
        return self._source

    def _read(self, path: Path, keys: Sequence[str]) -> tuple[dict[str, Tensor], dict[str, str]] | None:
        """The tensors and metadata of a cache file if it is whole and made with these settings,
        with `keys` of one row per fitting sample; else None, after removing it (it is captured again)."""
        if not path.is_file():
            return None
        rows = len(self.settings.fit_seeds)
        try:
            tensors, meta = read_tensors(path, "refine cache file")
            fits = meta.get("settings_digest") == self.settings.digest() and all(
                key in tensors and tensors[key].shape[0] == rows for key in keys)
        except HTError:
            fits = False
        if fits:
            return tensors, meta
        path.unlink(missing_ok=True)
        return None

    def _file(self, concept: Concept) -> Path:
        prompts = [concept.apply(p, i) for i, p in enumerate(self.settings.fit_prompts)]
        key = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:12]
        return self.root / f"{slugify(concept.name)[:60]}-{key}.safetensors"

    def ensure(self, concepts: Sequence[Concept]) -> list[str]:
        """Capture every concept not cached yet (or whose file is damaged); returns the names of
        those captured now."""
        captured, used = [], set()
        keys = [f"fit.{layer}" for layer in self.settings.layers]
        for concept in concepts:
            raise_if_cancelled()
            path = self._file(concept)
            if self._read(path, keys) is None:
                prompts = [concept.apply(p, i) for i, p in enumerate(self.settings.fit_prompts)]
                pooled = self._forward(self._recorded(prompts))  # the fitting seeds: paired with the sources
                dtype = STORAGE_DTYPES[self.settings.storage_dtype]
                save_tensors(path, {f"fit.{layer}": pooled[layer].to(dtype) for layer in self.settings.layers},
                             {"concept": concept.name, "settings_digest": self.settings.digest()})
                captured.append(concept.name)
            self._files[concept.name] = path
            used.add(path)
        self._evict(keep=used)
        return captured

    def _evict(self, keep: set[Path]) -> None:
        """Remove the oldest concept files beyond `max_concepts`, never those in `keep` (this call's)."""
        if self.max_concepts is None:
            return
        files = sorted((p for p in self.root.glob("*.safetensors") if p.name != "source.safetensors" and p not in keep),
                       key=lambda p: p.stat().st_mtime_ns)
        for old in files[: max(len(files) + len(keep) - self.max_concepts, 0)]:
            old.unlink(missing_ok=True)
            self._files = {name: path for name, path in self._files.items() if path != old}

    def names(self) -> list[str]:
        return list(self._files)

    def fitting_samples(self, samples: int | None = None) -> int:
        available = len(self.settings.fit_seeds)
        if samples is not None and not 2 <= samples <= available:
            raise HTError(f"samples= must be from 2 to the {available} fitting samples, got {samples}")
        return available if samples is None else samples

    def targets(self, names: Sequence[str], part: str = "fit") -> dict[str, Tensor]:
        """Pooled targets per layer, float32, (K, N, D) for the K concepts `names` (captured by `ensure`)."""
        if part != "fit":
            raise HTError("captured targets have fitting samples only (refining evaluates on a dataset)")
        missing = [name for name in names if name not in self._files]
        if missing:
            raise HTError(f"no captured targets for {', '.join(map(repr, missing))}: call ensure() first")
        loaded = [read_tensors(self._files[name], "refine cache")[0] for name in names]
        return {layer: torch.stack([t[f"fit.{layer}"].float() for t in loaded]) for layer in self.settings.layers}
