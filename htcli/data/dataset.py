"""Activation datasets on disk: the format, its settings, and read access.

Layout of a dataset directory:

    manifest.json               settings (model, layers, prompts, seeds, encoder), concept list
    source.safetensors          the denoiser's recorded calls on the source prompts (fit.call.*,
                                eval.call.*; their structure in the metadata, `htcli.models.call`)
                                and pooled source activations act.fit.<layer>, act.eval.<layer>
    concepts/<slug>.safetensors pooled target activations fit.<layer> (N, D), eval.<layer>
                                (M, D), and the concept embedding (E,)

Target sample i is source prompt i with the concept's template applied, under the same seed
(paired samples: only the concept differs). Fitting samples and evaluation samples use disjoint
prompts and seeds. `htcli.data.build` writes datasets; this module reads them.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from htcli.core.files import read_json
from htcli.core.runtime import run_path
from htcli.data.concepts import Concept, ConceptLibrary, slugify
from htcli.errors import HTError
from htcli.models.call import DenoiserCall
from htcli.models.spec import ModelSpec

FORMAT = "ht-dataset/2"  # 2: the pipeline's recorded denoiser calls; 1: cached inputs per model family
SOURCE_CALL = "call"  # source.safetensors' metadata key of the recorded calls' structure
SPLITS = ("train", "test", "all")


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
    random_weights: bool = False  # built on the model's architecture with random weights (`--random-weights`)
    resolution: int | None = None  # pixels, when not the model's own (`--resolution`)

    def digest(self) -> str:
        # Settings added later count only away from their default: older datasets keep their digest.
        data = {k: v for k, v in asdict(self).items() if not (k in _ADDED_LATER and v == _ADDED_LATER[k])}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, data: dict) -> DatasetSettings:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


_ADDED_LATER = {"random_weights": False, "resolution": None}


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise HTError(f"split= must be train, test or all, got {split!r}")


def check_limit(limit: int | None) -> None:
    """`--limit-concepts`: None (all) or a positive count."""
    if limit is not None and limit < 1:
        raise HTError(f"limit_concepts= must be positive, got {limit}")


def select_concepts(
    library: ConceptLibrary, split: str, names: Sequence[str] = (), limit: int | None = None, seed: int = 0
) -> list[Concept]:
    """Library concepts to build or score: the named ones (library or free text), else a split's, optionally a
    seeded sample of `limit` of them (so a small dataset still mixes train and test)."""
    if names:
        concepts = []
        for name in names:
            if not name.strip():
                raise HTError("concept= got an empty concept name")
            concepts.append(library.resolve(name))
    else:
        check_split(split)
        concepts = library.targets(split=None if split == "all" else split)
        check_limit(limit)
        if limit is not None:
            concepts = list(concepts)
            random.Random(seed).shuffle(concepts)
            concepts = sorted(concepts[:limit], key=lambda c: c.name.lower())
    slugs = [slugify(c.name) for c in concepts]
    if len(set(slugs)) != len(slugs):
        raise HTError("two selected concepts map to the same file name; rename one")
    return list(concepts)




def resolve_dataset(data: Path | None, model: str) -> Path:
    """`data`, else runs/<model>/data; a missing default names the command that builds it."""
    if data is not None:
        return Path(data)
    path = run_path(model, "data")
    if not (path / "manifest.json").exists():
        raise HTError(f"no dataset at {path}; build it with `ht build-dataset` (model={model!r}) or pass data=")
    return path


def open_dataset(data: Path | None, model: str | None) -> ActivationDataset:
    """The dataset `--data` (default runs/<model>/data), checked to be built for `model` if given."""
    from htcli.models import default_model_name

    dataset = ActivationDataset(resolve_dataset(data, model or default_model_name()))
    if model and model != dataset.settings.model:
        raise HTError(f"data={str(dataset.root)!r} was built for model {dataset.settings.model!r}, not {model!r}")
    dataset.spec()  # built on the weights asked for: random or real
    return dataset


class ActivationDataset:
    """Read access to a built dataset; tensors are read lazily, file by file."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not (self.root / "manifest.json").exists():
            raise HTError(f"{self.root} is not an ht dataset (no manifest.json); build one with `ht build-dataset`")
        self.manifest = read_json(self.root / "manifest.json")
        self.settings = DatasetSettings.from_json(self.manifest["settings"])
        found = self.manifest.get("format")
        if found != FORMAT:
            raise HTError(f"{self.root} is a dataset of format {found!r}, which this ht cannot read ({FORMAT!r}); rebuild "
                          f"it with `ht build-dataset` (model='{self.settings.model}', out={self.root}, overwrite=True)")
        self._entries = {c["name"]: c for c in self.manifest["concepts"]}

    @property
    def layers(self) -> dict[str, int]:
        return dict(zip(self.settings.layers, self.settings.widths))

    def spec(self) -> ModelSpec:
        """The spec of the model the dataset was built on, at the resolution it was built at. Its
        weights must be the dataset's: random ones (`--random-weights`) for a dataset built on
        them, and real ones for the others; anything else is an HTError."""
        from htcli.models import get_model
        from htcli.models.random_weights import check_same_weights

        spec = get_model(self.settings.model)
        check_same_weights(spec, self.settings.random_weights, f"the dataset {self.root}")
        return spec.at_resolution(self.settings.resolution)

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

    def split_of(self, name: str) -> str:
        """'train', 'test' or 'free' (a concept outside the library)."""
        self._path(name)  # an unknown name is an HTError
        return self._entries[name]["split"]

    def select(self, names: Sequence[str] = (), split: str = "test") -> list[str]:
        """The named concepts (each must be built), else the built concepts of `split`
        ('train', 'test' or 'all'); an empty choice says how to make another."""
        if names:
            built = self.names()
            for name in names:
                if name not in built:
                    raise HTError(f"concept {name!r} is not built in the dataset {self.root}; "
                                  "add it with `ht build-dataset` (concept=..., the same out=)")
            return list(names)
        check_split(split)
        chosen = self.names(None if split == "all" else split)
        if not chosen:
            counts = ", ".join(f"{len(self.names(s))} {s}" for s in ("train", "test", "free"))
            raise HTError(f"no concepts of split {split!r} in {self.root} (it has {counts}); "
                          "choose another with split='train' or split='all', or name concepts with concept=")
        return chosen

    def fitting_samples(self, samples: int | None = None) -> int:
        """`--samples`: how many of the dataset's fitting samples per concept to use (None: all)."""
        available = len(self.settings.fit_seeds)
        if samples is None:
            return available
        if samples < 2:
            raise HTError(f"samples= must be at least 2 (W2 compares distributions), got {samples}")
        if samples > available:
            raise HTError(f"samples={samples} exceeds the dataset's {available} fitting samples; "
                          "pass a smaller samples=, or leave it out to use them all")
        return samples

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

    def source_inputs(self, part: str = "fit") -> DenoiserCall:
        """The denoiser's recorded call on the source samples of `part` ("fit" or "eval")."""
        from safetensors import safe_open

        with safe_open(str(self.root / "source.safetensors"), "pt") as f:
            prefix = f"{part}.call."
            tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118
            return DenoiserCall.from_tensors((f.metadata() or {})[SOURCE_CALL], tensors, prefix)

    def source_activations(self, part: str = "fit") -> dict[str, Tensor]:
        from safetensors import safe_open

        with safe_open(str(self.root / "source.safetensors"), "pt") as f:
            return {layer: f.get_tensor(f"act.{part}.{layer}").float() for layer in self.settings.layers}
