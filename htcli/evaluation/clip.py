"""The CLIP judge: per-image scores of an evaluation run, aggregated with bootstrap intervals.

Per image (all embeddings L2-normalised, `cos` their dot product):
- concept fidelity: cos(image, concept phrase), e.g. "in the style of Art Deco";
- zero-shot probability of the concept against a neutral "something", as Linear-AcT
  reports: softmax(s * [cos(image, phrase), cos(image, "something")])[0], s = CLIP's logit scale;
- input fidelity: cos(image, the source prompt), i.e. is the asked-for scene still there;
- preservation: cos(image, the unsteered image of the same concept, prompt and seed).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from htcli.errors import HTError
from htcli.evaluation.runs import Progress, load_images
from htcli.evaluation.stats import aggregate

NEUTRAL = "something"
DEFAULT_CLIP = ("ViT-L-14", "openai")
METRICS = ("concept_fidelity", "zero_shot", "input_fidelity", "preservation")


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity of (..., E) embeddings."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def zero_shot(image: Tensor, concept: Tensor, neutral: Tensor, logit_scale: float) -> Tensor:
    """P(concept) of CLIP's two-way zero-shot classifier: concept text against the neutral text."""
    logits = logit_scale * torch.stack([cosine(image, concept), cosine(image, neutral)], dim=-1)  # (..., 2)
    return logits.softmax(-1)[..., 0]


def clip_encoder_id(arch: str | None, pretrained: str | None) -> str:
    """`open_clip:ARCH/TAG`; no --clip-model means the default ViT-L-14/openai."""
    if arch is None:
        arch, pretrained = DEFAULT_CLIP[0], pretrained or DEFAULT_CLIP[1]
    return f"open_clip:{arch}/{pretrained}" if pretrained else f"open_clip:{arch}"


def check_clip_arch(arch: str) -> None:
    """An open_clip architecture name that exists, else one line with a few close matches
    (open_clip's own error lists all of its hundreds of models)."""
    import open_clip

    from htcli.models.encoders import TINY_CLIP

    known = [*open_clip.list_models(), TINY_CLIP]
    if arch in known:
        return
    close = difflib.get_close_matches(arch, known, n=3, cutoff=0.5) or [DEFAULT_CLIP[0], "ViT-B-32", TINY_CLIP]
    raise HTError(f"unknown open_clip architecture {arch!r} for clip_model=; for example {', '.join(close)} "
                  "(python -c 'import open_clip; print(open_clip.list_models())' lists them all)")


def embed_images(encoder, root: Path, files: Sequence[str], batch: int = 32,
                 progress: Progress | None = None) -> dict[str, Tensor]:
    """CLIP embedding of each distinct image file, in batches."""
    unique = list(dict.fromkeys(files))
    out: dict[str, Tensor] = {}
    for start in range(0, len(unique), batch):
        chunk = unique[start : start + batch]
        out |= dict(zip(chunk, encoder.encode_images(load_images(root, chunk))))
        if progress:
            progress(len(out), len(unique), "images embedded")
    return out


def clip_scores(encoder, root: Path, records: Sequence[Mapping[str, Any]], neutral: str = NEUTRAL,
                progress: Progress | None = None) -> list[dict]:
    """Per-image CLIP metrics of an evaluation run's records (see the module docstring)."""
    # 1. Every image and text embedded once.
    images = embed_images(encoder, root, [r["file"] for r in records], progress=progress)
    texts = list(dict.fromkeys([neutral, *(r["phrase"] for r in records), *(r["prompt"] for r in records)]))
    text_emb = dict(zip(texts, encoder.encode_text(texts)))
    # CLIP's learned temperature (100 for trained models); untrained ones start at 1 / 0.07.
    scale = float(encoder.model.logit_scale.detach().exp()) if hasattr(encoder.model, "logit_scale") else 100.0
    # 2. The unsteered image of each (concept, prompt, seed): preservation's reference.
    reference = {(r["concept"], r["prompt"], r["seed"]): r["file"] for r in records if r["method"] == "none"}
    rows = []
    for r in records:
        image = images[r["file"]]
        ref = reference.get((r["concept"], r["prompt"], r["seed"]))
        rows.append({
            "concept": r["concept"], "method": r["method"], "strength": r["strength"], "prompt": r["prompt"],
            "seed": r["seed"], "file": r["file"],
            "concept_fidelity": float(cosine(image, text_emb[r["phrase"]])),
            "zero_shot": float(zero_shot(image, text_emb[r["phrase"]], text_emb[neutral], scale)),
            "input_fidelity": float(cosine(image, text_emb[r["prompt"]])),
            "preservation": None if ref is None else float(cosine(image, images[ref])),
        })
    return rows


def clip_judge(encoder, root: Path, records: Sequence[Mapping[str, Any]], seed: int = 0,
               progress: Progress | None = None) -> dict:
    """The CLIP section of scores.json: per-image rows, per (concept, method, strength) and
    per (method, strength) aggregates with bootstrap intervals."""
    rows = clip_scores(encoder, root, records, progress=progress)
    return {
        "judge": "clip",
        "clip_model": encoder.id,
        "neutral": NEUTRAL,
        "images": rows,
        "by_concept": aggregate(rows, ("concept", "method", "strength"), METRICS, seed),
        "summary": aggregate(rows, ("method", "strength"), METRICS, seed),
    }
