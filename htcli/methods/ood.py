"""Out of distribution: is a concept's text like the text the hypernetwork was trained on?

A hypernetwork extrapolates on concepts unlike its training concepts, and on text that names
no concept at all ("asdfghjkl", "1234567890", an emoji string). Three cues of the concept's
bare text (its name, not the templated phrase: the template that every phrase shares dominates
the embedding of "in the style of asdfghjkl"), each oriented so that higher is more ordinary:

- `similarity`: cosine of the bare text's embedding to the nearest training concept's name;
- `known_tokens`: the share of its tokens the encoder's tokenizer knows (not its unknown token);
- `token_length`: characters per known token: random letters, digits and foreign scripts fall
  apart into short word pieces ("zx", "##q", "##v"), concept names into words and long pieces.

Each cue is turned into a percentile against the training concepts' own values (a training
concept's similarity is to its nearest *other* training concept), and the score is the lowest of
the three percentiles: a text is as unusual as its most unusual cue. The threshold is the
`OOD_QUANTILE` quantile of the validation concepts' scores (concepts the network never trained
on, none of them held out for testing). All of it is stored in the checkpoint (`OODCalibration`).
`python -m bench.ood` measures it on a labelled set.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from htcli.errors import HTError

CUES = ("similarity", "known_tokens", "token_length")
TIE_ORDER = ("known_tokens", "token_length", "similarity")
# The threshold leaves this share of validation concepts below it. Lower than the 5% a user
# would accept: it is estimated from a few dozen validation concepts, and new concepts sit a
# little further from training than validation concepts do.
OOD_QUANTILE = 0.02
_MARKS = re.compile(r"^(##|\u2581|\u0120)|</w>$")  # word-piece marks: BERT's ##, sentencepiece's and GPT-2's word starts, CLIP's ends


def _tokens(tokenizer: Any, text: str) -> tuple[list[str], str | None]:
    """The tokenizer's pieces of `text` and its unknown token (None: it has none). Hugging Face
    tokenizers (MiniLM, open_clip's HF ones) and open_clip's byte-level BPE, which knows every byte."""
    inner = getattr(tokenizer, "tokenizer", tokenizer)  # open_clip's HFTokenizer wraps a transformers one
    if hasattr(inner, "tokenize") and hasattr(inner, "unk_token"):
        return inner.tokenize(text), inner.unk_token
    return [tokenizer.decoder[i] for i in tokenizer.encode(text)], None


def token_cues(tokenizer: Any, texts: Sequence[str]) -> Tensor:
    """(Q, 2): known_tokens and token_length of each text (see the module doc)."""
    rows = []
    for text in texts:
        tokens, unknown = _tokens(tokenizer, text)
        known = [_MARKS.sub("", t) for t in tokens if t != unknown]
        rows.append((len(known) / max(1, len(tokens)), sum(map(len, known)) / max(1, len(known))))
    return torch.tensor(rows, dtype=torch.float32).reshape(len(texts), 2)


def text_cues(encoder: Any, texts: Sequence[str], names: Tensor, exclude_self: bool = False,
              embeddings: Tensor | None = None) -> Tensor:
    """(Q, 3) cues of bare `texts` against the training concepts' name embeddings `names` (C, E).
    `exclude_self`: the texts are those training concepts, each compared with the others;
    `embeddings`: the texts' (Q, E) normalised embeddings, if already computed."""
    if embeddings is None:
        embeddings = encoder.encode_text(list(texts))
    similarity = embeddings.float() @ names.float().T  # (Q, C)
    if exclude_self:
        similarity.fill_diagonal_(-1.0)
    return torch.cat([similarity.max(-1).values[:, None], token_cues(encoder.tokenizer, texts)], dim=1)


def percentiles(cues: Tensor, reference: Tensor) -> Tensor:
    """(Q, K): for each cue, the share of the reference's (R, K) values at or below it."""
    return (reference[None] <= cues[:, None]).float().mean(1)


@dataclass
class OODCalibration:
    """What the out-of-distribution score needs, stored in a hypernetwork checkpoint."""

    names: Tensor  # (C, E): embeddings of the training concepts' bare names
    reference: Tensor  # (C, K): the training concepts' own cues, the scale of each cue
    threshold: float  # scores below it are out of distribution
    quantile: float = OOD_QUANTILE

    @classmethod
    def fit(cls, encoder: Any, train: Sequence[str], validation: Sequence[str],
            quantile: float = OOD_QUANTILE) -> OODCalibration | None:
        """Calibrate on the training concepts' and the validation concepts' bare names (None
        without validation concepts: there is nothing to set the threshold with)."""
        if not validation:
            return None
        names = encoder.encode_text(list(train)).float()  # (C, E)
        reference = text_cues(encoder, train, names, exclude_self=True)  # (C, K)
        calibration = cls(names, reference, 0.0, quantile)
        scores = calibration.scores(encoder, validation)["score"]
        calibration.threshold = torch.quantile(torch.tensor(scores), quantile).item()
        return calibration

    def scores(self, encoder: Any, texts: Sequence[str], embeddings: Tensor | None = None) -> dict[str, list]:
        """Per text: score (the lowest cue percentile), its cues and their percentiles (`embeddings`:
        the texts' own, if already computed)."""
        cues = text_cues(encoder, texts, self.names, embeddings=embeddings)
        ranks = percentiles(cues, self.reference)
        return {"score": ranks.min(-1).values.tolist(), "cues": cues.tolist(), "percentiles": ranks.tolist()}

    def record(self, encoder: Any, texts: Sequence[str], embeddings: Tensor | None = None) -> list[dict]:
        """Per text, the out-of-distribution part of a `Prediction.neighbours` record."""
        found = self.scores(encoder, texts, embeddings)
        records = []
        for score, cues, ranks in zip(found["score"], found["cues"], found["percentiles"]):
            # The lowest percentile; on a tie, the token cues first: they say more exactly what is wrong.
            weakest = min(TIE_ORDER, key=lambda cue: ranks[CUES.index(cue)])
            records.append({"ood": score < self.threshold, "ood_score": score, "ood_threshold": self.threshold,
                             "ood_cues": dict(zip(CUES, cues)), "ood_weakest_cue": weakest})
        return records

    # --- checkpoint storage -------------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        return {"ood.names": self.names.contiguous(), "ood.reference": self.reference.contiguous()}

    def metadata(self) -> dict[str, str]:
        return {"ood": json.dumps({"cues": list(CUES), "threshold": self.threshold, "quantile": self.quantile})}

    @classmethod
    def load(cls, tensors: dict[str, Tensor], metadata: dict[str, str], path: Any = "the checkpoint") -> OODCalibration | None:
        """The calibration a checkpoint stores; None for one saved before ht stored it."""
        if "ood" not in metadata:
            return None
        stored = json.loads(metadata["ood"])
        if stored.get("cues") != list(CUES):
            raise HTError(f"{path} has an out-of-distribution calibration of other cues ({stored.get('cues')}) than this "
                          f"version of ht reads ({', '.join(CUES)}); upgrade ht")
        return cls(tensors["ood.names"], tensors["ood.reference"], stored["threshold"], stored["quantile"])


WEAKEST_CUE_TEXT = {
    "similarity": "its text is unlike every training concept's",
    "known_tokens": "the encoder does not know its characters",
    "token_length": "the encoder splits it into short fragments",
}
