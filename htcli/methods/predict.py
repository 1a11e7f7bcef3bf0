"""Concept text or reference images -> affine maps, in one hypernetwork pass.

`Predictor` pairs a trained hypernetwork checkpoint with its concept encoder. It is the one
place where maps are predicted, for steering, evaluation runs, activation-space residuals,
exports and the demo:

    predictor = Predictor.load(resolve_checkpoint(None, "tiny"), model="tiny")
    prediction = predictor.predict([load_library().resolve("art deco"), "as a film noir still"])
    art_deco, noir = prediction.maps
    prediction.neighbours[0], prediction.ms  # nearest training concepts, out of distribution or not; the time

A concept is embedded by the checkpoint's rule (`htcli.methods.embedding`: the mean of its
templates' phrases); a plain string is a phrase, embedded as it is. Whether a concept is out of
distribution is read from its bare text (`htcli.methods.ood`). Reference images are embedded with the encoder's image tower, averaged, and moved into the
text region by the checkpoint's modality-gap correction (`close_gap`) when it stores one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from htcli.core.files import file_digest
from htcli.core.hub_access import HubError, HubOptions
from htcli.core.references import resolve_file
from htcli.core.runtime import run_path
from htcli.core.transport import Maps
from htcli.data.concept_files import normalize
from htcli.data.concepts import Concept
from htcli.errors import HTError
from htcli.methods.embedding import bare_text, embed_concepts
from htcli.methods.hypernetwork import (
    HyperCheckpoint,
    TrainingConcepts,
    load_checkpoint,
    unbatch,
)
from htcli.methods.ood import WEAKEST_CUE_TEXT
from htcli.models import get_model
from htcli.models.encoders import close_gap, get_encoder, modality_gap

CHECKPOINT = "hyper.safetensors"  # in a run folder; a Hub-layout folder has model.safetensors
# A Hub-layout folder wins over a stale run checkpoint beside it (a repo pushed to twice).
CHECKPOINT_NAMES = ("model.safetensors", CHECKPOINT)


def shipped_checkpoint(model: str) -> Path | None:
    """The hypernetwork shipped with the package for `model` (only `tiny` has one), else None.
    How it was trained, and the command that reproduces it: docs/results.md."""
    from htcli.models.tiny import WEIGHTS_DIR

    path = WEIGHTS_DIR / f"{model}_hyper.safetensors"
    return path if path.is_file() else None


def resolve_checkpoint(hyper: str | Path | None, model: str, weight_name: str | None = None,
                       subfolder: str | None = None, hub: HubOptions = HubOptions(),
                       parameter: str = "hyper") -> Path:
    """The checkpoint file: `hyper` (a run folder, a Hub-layout folder, the file itself, or a Hub
    reference read with `hub`'s revision, token...: `htcli.core.references`), else
    runs/<model>/hyper, else the one shipped for `model` (`shipped_checkpoint`). Errors name
    `hyper` as the caller's `parameter`."""
    if hyper is not None:
        try:
            return resolve_file(hyper, "hypernetwork", CHECKPOINT_NAMES, weight_name, subfolder, hub=hub)
        except HubError:  # the repo could not be read: training one is not the fix
            raise
        except HTError as error:
            raise HTError(f"{error}; train one with `ht train-hyper`{f' (model={model!r})' if model else ''}") from None
    path = run_path(model, "hyper") / CHECKPOINT
    if path.is_file():
        return path
    if (shipped := shipped_checkpoint(model)) is not None:
        return shipped
    hint = "" if get_model(model).offline else " (offline, without its weights? try model='tiny')"
    raise HTError(f"no hypernetwork at {path}; train one with `ht train-hyper` (model={model!r}) or pass {parameter}= (a run folder, a .safetensors file or a Hub repo){hint}")


UNKNOWN_NEIGHBOURS = {"nearest_training_concepts": [], "ood": None, "ood_threshold": None}  # no training concepts stored


@dataclass
class Prediction:
    """What one `Predictor.predict` call made: one map per concept, then one for the reference
    images (if any), each map's neighbour record, and the call's wall-clock time."""

    maps: list[Maps]  # {layer: ((D,), (D,))} each
    # Per map, JSON-ready: its nearest training concepts (name, cosine similarity), whether it is
    # out of distribution (None: unknown), the threshold that says so and, where the checkpoint is
    # calibrated for it (`htcli.methods.ood`), the score compared with it, its cues and the weakest.
    neighbours: list[dict]
    ms: float  # encoding included


@dataclass
class Predictor:
    """A hypernetwork checkpoint with its concept encoder, on one device. It holds no per-call
    state: `predict` returns everything a call made, so threads may share one."""

    checkpoint: HyperCheckpoint
    encoder: Any  # MiniLMEncoder | OpenClipEncoder
    path: Path | None = None
    digest: str | None = None  # of the checkpoint file: names the weights behind a result

    @classmethod
    def load(cls, path: Path, model: str | None = None, device: str | torch.device = "cpu") -> Predictor:
        """Load a checkpoint strictly; with `model`, refuse one trained for another model. One
        trained on random weights (`--random-weights`) is refused unless they are asked for, and
        the reverse."""
        from htcli.models import get_model
        from htcli.models.random_weights import check_same_weights

        checkpoint = load_checkpoint(path, device)
        if model is not None and checkpoint.model != model:
            raise HTError(f"{path} was trained for model {checkpoint.model!r}, not {model!r}")
        check_same_weights(get_model(checkpoint.model), checkpoint.random_weights, f"the hypernetwork {path}")
        return cls(checkpoint, get_encoder(checkpoint.encoder, str(torch.device(device))), Path(path), file_digest(path))

    @property
    def model(self) -> str:
        return self.checkpoint.model

    @property
    def has_gap(self) -> bool:
        return self.checkpoint.gap is not None

    @property
    def training_concepts(self) -> TrainingConcepts | None:
        return self.checkpoint.training_concepts

    def nearest(self, embeddings: Tensor, k: int = 3) -> list[list[tuple[str, float]]]:
        """The k training concepts nearest to each (Q, E) concept embedding, best first, as
        (name, cosine similarity)."""
        if self.training_concepts is None:
            raise HTError(f"{self.path or 'this hypernetwork'} stores no training concepts (an older checkpoint)")
        return self.training_concepts.nearest(embeddings, k)

    @staticmethod
    def neighbour_note(source: str, info: dict) -> str | None:
        """The note for a `Prediction.neighbours` record: `source` is out of distribution, or the checkpoint
        cannot tell (the same words for every source); None when it is in distribution."""
        if not info["nearest_training_concepts"]:
            return ("the hypernetwork stores no training concepts (an older checkpoint): "
                    "no nearest neighbours and no out-of-distribution check")
        if info["ood_threshold"] is None:
            return "the hypernetwork has no out-of-distribution threshold (trained without validation concepts)"
        if not info["ood"]:
            return None
        best = info["nearest_training_concepts"][0]
        nearest = f"its nearest training concept, {best['name']!r}, has similarity {best['similarity']:.3f}"
        if "ood_weakest_cue" in info:
            return (f"{source!r} is out of distribution: {WEAKEST_CUE_TEXT[info['ood_weakest_cue']]} (score "
                    f"{info['ood_score']:.3f}, below the hypernetwork's threshold {info['ood_threshold']:.3f}; {nearest}); "
                    "its maps extrapolate beyond training")
        return (f"{source!r} is out of distribution: {nearest}, below the hypernetwork's threshold "
                f"{info['ood_threshold']:.3f}; its maps extrapolate beyond training")

    def embed_images(self, images: Sequence[Any], gap_correction: bool = True) -> Tensor:
        """(1, E): the mean image embedding of `images`, gap-corrected when the checkpoint can."""
        if not self.encoder.has_images:
            raise HTError(f"reference images need an image encoder; this hypernetwork uses {self.encoder.id} (text only)")
        embedding = self.encoder.encode_images(images).mean(0, keepdim=True)
        if gap_correction and self.checkpoint.gap is not None:
            embedding = close_gap(embedding, self.checkpoint.gap)
        return embedding

    def maps(self, phrases: Sequence[str | Concept] = (), images: Sequence[Any] = (),
             gap_correction: bool = True) -> list[Maps]:
        """The maps of `predict`: one per concept, then one for the reference images (if any)."""
        return self.predict(phrases, images, gap_correction).maps

    def predict(self, phrases: Sequence[str | Concept] = (), images: Sequence[Any] = (),
                gap_correction: bool = True) -> Prediction:
        """One map per concept, then one for the reference images (if any), with their neighbour
        records and the time taken. A concept is a `Concept` (embedded as `concept_texts` says; its
        name is what the out-of-distribution check reads) or a phrase, embedded as it is."""
        start = time.perf_counter()
        embeddings = []
        if phrases:
            embeddings.append(self.embed_concepts(phrases))
        if images:
            embeddings.append(self.embed_images(images, gap_correction))
        if not embeddings:
            raise HTError("nothing to predict: give concept text or reference images")
        device = next(self.checkpoint.network.parameters()).device
        predicted = unbatch(self.checkpoint.maps(torch.cat(embeddings).to(device)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        neighbours = self.neighbours(phrases, embeddings[0] if phrases else None, embeddings[-1] if images else None)
        return Prediction(predicted, neighbours, (time.perf_counter() - start) * 1e3)

    def embed_concepts(self, concepts: Sequence[str | Concept]) -> Tensor:
        """(K, E): the hypernetwork's input for each concept (see `maps`)."""
        config = self.checkpoint.config
        return embed_concepts(self.encoder, concepts, config.embedding, config.embedding_prompts)

    def neighbours(self, concepts: Sequence[str | Concept], embedded: Tensor | None = None,
                   images: Tensor | None = None) -> list[dict]:
        """The `Prediction.neighbours` record of each concept (by its bare name, where the checkpoint is
        calibrated for that: `htcli.methods.ood`; `embedded`: their (K, E) embeddings if already
        computed), then of the reference images' (1, E) embedding, if any (by the hypernetwork's
        input embedding, against the nearest-concept threshold of `TrainingConcepts`)."""
        training = self.training_concepts
        if training is None:
            return [dict(UNKNOWN_NEIGHBOURS) for _ in range(len(concepts) + (images is not None))]
        records = []
        if concepts:
            ood = self.checkpoint.ood
            if ood is None:  # checkpoints before the calibration: the nearest embedding, against their threshold
                embedded = self.embed_concepts(concepts) if embedded is None else embedded
                records += [self._record(nearest, training.threshold) for nearest in training.nearest(embedded)]
            else:
                names = [bare_text(c) for c in concepts]
                bare = self.encoder.encode_text(names)  # (K, E)
                nearest = training.nearest(bare, against=ood.names)
                records += [self._record(n, None) | r for n, r in zip(nearest, ood.record(self.encoder, names, bare))]
            trained = {normalize(name) for name in training.names}
            for concept, record in zip(concepts, records):  # a concept trained on is in distribution, whatever the cues say
                if normalize(bare_text(concept)) in trained:
                    record["ood"] = False
        if images is not None:
            records.append(self._record(training.nearest(images)[0], training.threshold))
        return records

    @staticmethod
    def _record(nearest: list[tuple[str, float]], threshold: float | None) -> dict:
        """A record of the nearest training concepts, out of distribution when the best is below `threshold`."""
        return {"nearest_training_concepts": [{"name": name, "similarity": s} for name, s in nearest],
                "ood": None if threshold is None else nearest[0][1] < threshold, "ood_threshold": threshold}


def calibrate_gap(path: Path, images: Sequence[Any], concepts: Sequence[str | Concept]) -> tuple[Tensor, Tensor]:
    """Estimate the encoder's modality gap from calibration images and concepts (embedded by
    the checkpoint's rule, as predictions embed them), and store it in the checkpoint at `path`
    (rewritten atomically). Returns (image mean, text mean)."""
    checkpoint = load_checkpoint(path)
    encoder = get_encoder(checkpoint.encoder)
    if not encoder.has_images:
        raise HTError(f"calibration images need an encoder with an image tower; {encoder.id} has none")
    if not images:
        raise HTError("no calibration images given")
    config = checkpoint.config
    texts = embed_concepts(encoder, concepts, config.embedding, config.embedding_prompts)
    checkpoint.gap = modality_gap(encoder.encode_images(images), texts)
    checkpoint.save(path)
    return checkpoint.gap
