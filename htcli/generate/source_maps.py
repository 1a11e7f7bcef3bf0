"""A model ready to steer, and the maps each steering source gets from it.

    steerer = Steerer(get_model("tiny"))                       # loads on first use, then keeps
    composed = compose_sources(steerer, resolve_sources(steerer.spec, ["art deco:0.6"]))
    composed.combined()                                        # {layer: (omega (D,), beta (D,))}

`Steerer` holds the spec, the pipeline, the hypernetwork `Predictor` and the `Refiner`, each
loaded on first use and kept, so that a server answers many requests with one load.
`compose_sources` turns checked sources (`htcli.generate.compose`) into their maps: predicted
in one pass (and with `refine`, refined), read from files, restricted to the layers each source
acts on, on one device, with each prediction's nearest training concepts. `ht steer`,
`ht serve` and `ht.HyperTransport.intervention` all make their maps here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from htcli.core.transport import Maps, maps_to
from htcli.errors import HTError
from htcli.generate.compose import Sources, combine, select_layers
from htcli.models import ModelSpec

if TYPE_CHECKING:
    from htcli.methods.predict import Prediction


class Steerer:
    """A model ready to steer: its spec, the pipeline and the hypernetwork `Predictor`, each
    loaded on first use and then kept, so that a server answers many requests with one load."""

    def __init__(self, spec: ModelSpec, *, pipe: Any = None, predictor: Any = None, hyper: Path | None = None,
                 model_path: str | None = None, device: str | None = None, refiner: Any = None) -> None:
        if predictor is not None and predictor.model != spec.id:
            raise HTError(f"the hypernetwork was trained for model {predictor.model!r}, not {spec.id!r}")
        self.spec, self.hyper, self.model_path, self.device = spec, hyper, model_path, device
        self._pipe, self._predictor, self._refiner, self._library = pipe, predictor, refiner, None

    @property
    def pipe(self) -> Any:
        if self._pipe is None:
            from htcli.core.runtime import resolve_device
            from htcli.models import load_pipeline

            self._pipe = load_pipeline(self.spec, model_path=self.model_path, device=resolve_device(self.device))
        return self._pipe

    @property
    def refiner(self) -> Any:
        """What `--refine` fits with (`htcli.methods.refine.Refiner`: the frozen denoiser, targets
        captured for any concept text through this pipeline), made on first use."""
        if self._refiner is None:
            from htcli.methods.refine import Refiner

            self._refiner = Refiner(self.spec, lambda: self.pipe, lambda: self.library, self.device, self.model_path)
        return self._refiner

    @property
    def maps_device(self) -> torch.device:
        """Where every source's maps meet for composition and batching: the device the pipeline
        runs on (`device`), whichever device the hypernetwork or a file's maps come from."""
        from htcli.core.runtime import resolve_device

        return resolve_device(self.device)

    @property
    def library(self) -> Any:
        """The concept library (`htcli.data.concepts.load_library`), read once: a server plans every
        request against it, and reading it takes ~0.3 s."""
        if self._library is None:
            from htcli.data.concepts import load_library

            self._library = load_library()
        return self._library

    @property
    def predictor(self) -> Any:
        """The `htcli.methods.predict.Predictor` of `hyper` (default runs/<model>/hyper)."""
        if self._predictor is None:
            from htcli.core.runtime import resolve_device
            from htcli.methods.predict import Predictor, resolve_checkpoint

            path = resolve_checkpoint(self.hyper, self.spec.id)
            self._predictor = Predictor.load(path, model=self.spec.id, device=resolve_device(self.device))
        return self._predictor


def _refine_dataset(steerer: Steerer, sources: Sources, refine: int | None, data: Path | None) -> Any:
    """The dataset `--refine` reads first (`htcli.methods.refine.refine_dataset`; None without
    `refine` or without a dataset), opened before anything loads."""
    if refine is None or not sources.concepts:
        return None
    from htcli.methods.refine import refine_dataset

    return refine_dataset(data, steerer.spec.id)


def _source_maps(steerer: Steerer, sources: Sources, gap_correction: bool, notes: list[str],
                 refine: int | None = None, dataset: Any = None) -> tuple[list[tuple[Maps, float]], Prediction | None]:
    """(maps, weight) per source in `sources` order, and the prediction behind them (None when
    nothing was predicted), its time including `refine` LinEAS steps per concept (on `dataset` or
    captured targets). Every map is on `steerer.maps_device`."""
    device = steerer.maps_device
    files = [(maps_to(f.maps, device), w) for f, w, _ in sources.files]
    if not (sources.concepts or sources.images):
        return files, None
    refined, refine_ms = [], 0.0
    if refine is not None and sources.concepts:
        from htcli.methods.refine import refine_maps

        concepts = [concept for concept, _ in sources.concepts]
        started = time.perf_counter()
        fit_sources, layers = steerer.refiner.fit_sources(concepts, dataset, steerer.predictor)  # captures if need be
        refine_ms += (time.perf_counter() - started) * 1e3
        frozen = steerer.refiner.frozen(layers)
        for concept in concepts:
            maps, info = refine_maps(steerer.predictor, frozen, concept, fit_sources[concept.name], refine,
                                     evaluate=False)
            refined.append(maps)
            refine_ms += info["seconds"] * 1e3
    predictor = steerer.predictor
    # Predicted last, all sources at once: the prediction's records are the sources' neighbours.
    prediction = predictor.predict([c for c, _ in sources.concepts], sources.images, gap_correction)
    predicted = prediction.maps
    predicted[: len(refined)] = refined
    if sources.images and gap_correction and not predictor.has_gap:
        notes.append("the hypernetwork stores no modality gap; raw image embeddings were used "
                     "(train it with calibration_images= to store one)")
    weights = [w for _, w in sources.concepts] + [1.0] * bool(sources.images)
    per_source = [(maps_to(maps, device), w) for maps, w in zip(predicted, weights)] + files
    return per_source, replace(prediction, ms=prediction.ms + refine_ms)


def _neighbours(prediction: Prediction | None, sources: Sources, notes: list[str]) -> list[dict]:
    """Per predicted source (concepts, then the reference images): its `Prediction.neighbours`
    record with a "source" label. Notes name the sources that are out of distribution, or say
    once that the checkpoint cannot tell."""
    if prediction is None:
        return []
    from htcli.methods.predict import Predictor

    labels = sources.labels[: len(sources.concepts) + bool(sources.images)]
    records = [{"source": label, **record} for label, record in zip(labels, prediction.neighbours, strict=True)]
    for record in records:
        text = Predictor.neighbour_note(record["source"], record)
        if text and text not in notes:
            notes.append(text)
    return records


def ood_flag(records: list[dict], labels: Sequence[str] | None = None) -> bool | None:
    """Whether a source among `labels` (None: any) of these `_neighbours` records is out of
    distribution; None when that is unknown."""
    flags = [r["ood"] for r in records if labels is None or r["source"] in labels]
    return None if not flags or None in flags else any(flags)


def nearest_records(records: list[dict]) -> list[dict]:
    """The `_neighbours` records' nearest training concepts in one list, each with its "source"."""
    return [{"source": r["source"], **n} for r in records for n in r["nearest_training_concepts"]]


@dataclass
class Composed:
    """Each source's maps at its weight, restricted to the layers it acts on, and what made them."""

    per_source: list[tuple[Maps, float]]  # in `sources.labels` order: ({layer: ((D,), (D,))}, weight)
    digest: str | None  # of the hypernetwork checkpoint; None when nothing was predicted
    ms: float  # concept/image/file -> maps, encoding and refinement included
    neighbours: list[dict]  # per predicted source: its nearest training concepts and out-of-distribution flag

    def combined(self) -> Maps:
        return combine(self.per_source)


def compose_sources(steerer: Steerer, sources: Sources, *, layers: Sequence[str] = (), gap_correction: bool = True,
                    refine: int | None = None, data: Path | None = None, notes: list[str] | None = None) -> Composed:
    """Predict (and with `refine`, refine) the maps of every source, keep the layers each acts on
    (its @LAYERS and the steer-time `layers` patterns), and note what a user should know (sources
    out of distribution, a missing modality gap) in `notes`. Layer and dataset errors come before
    any prediction or fit."""
    notes = [] if notes is None else notes
    dataset = _refine_dataset(steerer, sources, refine, data)
    predicted = []  # the hypernetwork's layers, when it predicts a source
    if sources.concepts or sources.images:
        predicted = [name for name, _ in steerer.predictor.checkpoint.config.layers]
    kept = select_layers(sources.known_layers(predicted), sources.layers, layers, sources.labels)
    per_source, prediction = _source_maps(steerer, sources, gap_correction, notes, refine, dataset)
    per_source = [({name: maps[name] for name in names}, w) for (maps, w), names in zip(per_source, kept)]
    digest, ms = (steerer.predictor.digest, prediction.ms) if prediction is not None else (None, 0.0)
    return Composed(per_source, digest, ms, _neighbours(prediction, sources, notes))
