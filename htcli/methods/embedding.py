"""What the hypernetwork reads of a concept: the embedding of its text, by one rule for every command.

A concept's target activations come from neutral prompts with its category's templates applied
in turn ("{prompt}, in the style of {concept}", "{prompt}, {concept} artwork"). Three rules, named
in the checkpoint's `HyperConfig.embedding`, so that training and prediction always agree:

- `phrase`: the first template without the prompt ("in the style of Art Deco"): checkpoints
  saved before the rule was recorded;
- `templates`: the mean of the normalised embeddings of every template's phrase, renormalised;
- `prompts`: the concept as the denoiser sees it: neutral prompts (`EMBEDDING_PROMPTS`, stored in
  the checkpoint: `HyperConfig.embedding_prompts`) with its templates applied in turn, as its
  target samples were made, their embeddings averaged and renormalised.

A plain string (not a `Concept`) is a phrase already: `phrase` and `templates` embed it as it is,
`prompts` appends it to each prompt after a comma, as the default template does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from htcli.data.concepts import Concept
from htcli.errors import HTError

EMBEDDINGS = ("phrase", "templates", "prompts")
# The neutral prompts of the `prompts` rule (new checkpoints store theirs): 16 of the library's
# source prompts, the first fitting prompts of a dataset built with the default seed. 16 rather
# than 8 or 32 was chosen on validation concepts (docs/results.md).
EMBEDDING_PROMPTS = (
    "a waiting room with chairs", "a paper boat on water", "a bee landing on a flower",
    "a knight in armour on horseback", "a toolbox", "a home office with a desk and shelves",
    "a woman carrying water jugs", "a plate of spaghetti", "a man reading a newspaper on a train",
    "a narrow street with houses on both sides", "a camel walking over sand", "a man fixing a leaking roof",
    "a cave entrance in a hillside", "a lizard basking on a stone", "a peacock spreading its feathers",
    "a plate of tacos",
)


def check_embedding(rule: str, prompts: Sequence[str] = ()) -> None:
    if rule not in EMBEDDINGS:
        raise HTError(f"unknown concept embedding {rule!r}; use one of {', '.join(EMBEDDINGS)}")
    if rule == "prompts" and not prompts:
        raise HTError("the 'prompts' concept embedding needs its neutral prompts")


def concept_texts(concept: str | Concept, rule: str, prompts: Sequence[str] = ()) -> list[str]:
    """The texts whose embeddings are averaged into the concept's embedding."""
    if rule == "prompts":
        if isinstance(concept, str):
            return [f"{prompt}, {concept}" for prompt in prompts]
        return [concept.apply(prompt, i) for i, prompt in enumerate(prompts)]
    if isinstance(concept, str):
        return [concept]
    if rule == "phrase":
        return [concept.phrase]
    return list(dict.fromkeys(concept.phrases))


def embed_concepts(encoder: Any, concepts: Sequence[str | Concept], rule: str, prompts: Sequence[str] = ()) -> Tensor:
    """(K, E) normalised embeddings of `concepts` by `rule`, with one encoder call for all texts."""
    check_embedding(rule, prompts)
    texts = [concept_texts(concept, rule, prompts) for concept in concepts]
    flat = encoder.encode_text([text for group in texts for text in group])  # (sum of texts, E)
    groups = flat.split([len(group) for group in texts])
    return F.normalize(torch.stack([group.mean(0) for group in groups]), dim=-1)


def bare_text(concept: str | Concept) -> str:
    """The concept's own words, without a template: what the out-of-distribution check reads."""
    return concept if isinstance(concept, str) else concept.name
