"""A concept's target activations captured on the fly, so that `--refine` works for any text.

Refining (LinEAS warm-started from a prediction, `htcli.methods.refine`) fits on a concept's
paired targets: the fitting prompts with the concept's template applied, under the fitting
seeds. A concept built into a dataset has them on disk; for any other text, `CapturedTargets`
captures them once (the prompts through the pipeline's own prompt encoding, then one forward
pass of the frozen denoiser with early stop) and keeps them, so that the next request for the
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from htcli.core.files import read_tensors, save_tensors
from htcli.core.runtime import raise_if_cancelled, run_path
from htcli.data.build import STORAGE_DTYPES, make_seeds, split_prompts
from htcli.data.concepts import Concept, ConceptLibrary, slugify
from htcli.data.dataset import DatasetSettings
from htcli.data.forward import pad_text
from htcli.errors import HTError

DEFAULT_SAMPLES = 32  # what `ht build-dataset` draws per concept by default
Encode = Callable[[Sequence[str], Sequence[int]], dict[str, Tensor]]  # (prompts, seeds) -> cached inputs
Forward = Callable[[Mapping[str, Tensor]], dict[str, Tensor]]  # cached inputs -> pooled (N, D) per layer


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
                 source: Mapping[str, Tensor] | None = None, max_concepts: int | None = None) -> None:
        """encode: the pipeline's prompt encoding (`htcli.data.forward.encode_inputs`); forward: the
        frozen denoiser's pooled activations; source: the fitting samples' cached inputs when a
        dataset already has them (else they are encoded once and cached); max_concepts: how many
        concepts' files the folder keeps at most (the oldest written go first; None: no bound)."""
        self.settings, self._encode, self._forward, self.max_concepts = settings, encode, forward, max_concepts
        self.root = Path(root) if root is not None else run_path(settings.model, "refine-cache") / settings.digest()
        self._source = dict(source) if source is not None else None
        self._files: dict[str, Path] = {}  # concept name -> its targets file

    def _encoded(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Cached inputs of `prompts` under the fitting seeds, encoded in the settings' batches."""
        size, seeds = self.settings.batch_size, self.settings.fit_seeds
        batches = [self._encode(prompts[i:i + size], seeds[i:i + size]) for i in range(0, len(prompts), size)]
        padded = pad_text(batches)
        return {key: torch.cat([b[key] for b in padded]) for key in padded[0]}

    def source_inputs(self, part: str = "fit") -> dict[str, Tensor]:
        if part != "fit":
            raise HTError("captured targets have fitting samples only (refining evaluates on a dataset)")
        if self._source is None:
            path = self.root / "source.safetensors"
            self._source = self._read(path, ["noise", "text"])
            if self._source is None:
                self._source = self._encoded(list(self.settings.fit_prompts))
                save_tensors(path, self._source, {"settings_digest": self.settings.digest()})
        return self._source

    def _read(self, path: Path, keys: Sequence[str]) -> dict[str, Tensor] | None:
        """The tensors of a cache file if it is whole and made with these settings, with `keys` of
        one row per fitting sample; else None, after removing it (it is captured again)."""
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
            return tensors
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
                pooled = self._forward(self._encoded(prompts))  # the fitting seeds: paired with the sources
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
