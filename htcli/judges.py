"""Judges of steering: CLIP scores of an evaluation run's images, and the transport residual.

CLIP judge, per image (all embeddings L2-normalised, `cos` their dot product):
- concept fidelity: cos(image, concept phrase), e.g. "in the style of Art Deco";
- zero-shot probability of the concept against a neutral "something", as Linear-AcT
  reports: softmax(s * [cos(image, phrase), cos(image, "something")])[0], s = CLIP's logit scale;
- input fidelity: cos(image, the source prompt), i.e. is the asked-for scene still there;
- preservation: cos(image, the unsteered image of the same concept, prompt and seed).

Transport judge: the W2 residual ratio in activation space on held-out concepts (1 = no
change, 0 = the target distribution), for HyperTransport and every fitted baseline.

Intervals are seeded percentile bootstraps of the mean over the scored items. The pairwise VLM
judge lives in `htcli.vlm`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from htcli.errors import HTError
from htcli.io import load_rgb_images

NEUTRAL = "something"
DEFAULT_CLIP = ("ViT-L-14", "openai")
METRICS = ("concept_fidelity", "zero_shot", "input_fidelity", "preservation")


# --- statistics --------------------------------------------------------------------------


def bootstrap_ci(values: Sequence[float], level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean and percentile-bootstrap interval of the mean, seeded (the same data gives the same interval)."""
    data = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if data.size == 0:
        return {"mean": None, "lo": None, "hi": None}
    mean = float(data.mean())
    if data.size == 1:
        return {"mean": mean, "lo": mean, "hi": mean}
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, (n_boot, data.size))].mean(1)  # (n_boot,)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    # The percentile interval of a skewed resample can miss the sample mean by rounding; clamp.
    return {"mean": mean, "lo": float(min(lo, mean)), "hi": float(max(hi, mean))}


def strength_order(strength: float | None) -> float:
    """Sort key: prompting (no strength) first, then increasing strength."""
    return -1.0 if strength is None else float(strength)


def method_order(method: str) -> tuple[int, str]:
    fixed = {"none": 0, "prompt": 1, "hypertransport": 2}
    return fixed.get(method, 3), method


def aggregate(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], metrics: Sequence[str], seed: int = 0) -> list[dict]:
    """Group `rows` by `keys`; per group the count and each metric's mean with its bootstrap interval."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for key, members in groups.items():
        entry: dict[str, Any] = dict(zip(keys, key)) | {"n": len(members)}
        for metric in metrics:
            entry[metric] = bootstrap_ci([m[metric] for m in members], seed=seed)
        out.append(entry)

    def order(entry: dict) -> tuple:
        parts = []
        for k in keys:
            value = entry[k]
            parts.append(method_order(value) if k == "method" else strength_order(value) if k == "strength" else value)
        return tuple(parts)

    return sorted(out, key=order)


# --- CLIP judge --------------------------------------------------------------------------


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


def load_images(root: Path, files: Iterable[str]) -> list:
    try:
        return load_rgb_images([root / name for name in files], "evaluation-run image")
    except HTError as error:
        raise HTError(f"{error}; rerun `ht evaluate` on the run to regenerate it") from None


def embed_images(encoder, root: Path, files: Sequence[str], batch: int = 32,
                 progress: Callable[[int], None] | None = None) -> dict[str, Tensor]:
    """CLIP embedding of each distinct image file, in batches."""
    unique = list(dict.fromkeys(files))
    out: dict[str, Tensor] = {}
    for start in range(0, len(unique), batch):
        chunk = unique[start : start + batch]
        out |= dict(zip(chunk, encoder.encode_images(load_images(root, chunk))))
        if progress:
            progress(len(chunk))
    return out


def clip_scores(encoder, root: Path, records: Sequence[Mapping[str, Any]], neutral: str = NEUTRAL,
                progress: Callable[[int], None] | None = None) -> list[dict]:
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
               progress: Callable[[int], None] | None = None) -> dict:
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


# --- transport judge ---------------------------------------------------------------------


def baseline_concepts(folder: Path) -> dict[str, set[str]]:
    """Concepts fitted by each baseline method under `folder` (runs/<model>/baselines)."""
    from htcli.io import read_json

    if not folder.is_dir():
        return {}
    return {p.parent.name: set(read_json(p)["concepts"]) for p in sorted(folder.glob("*/summary.json"))}


def transport_judge(checkpoint, encoder, library, frozen, dataset, names: Sequence[str], baselines: Path | None,
                    seed: int = 0) -> dict:
    """The transport section of scores.json: residual ratios per method on `names`, with intervals.

    Each method's residuals use the dataset's evaluation samples (never the fitted ones).
    """
    from htcli.evaluation import baseline_results, compare, evaluate_hyper

    hyper = evaluate_hyper(checkpoint, encoder, library, frozen, dataset, names)
    found = baseline_results(baselines, names) if baselines is not None and baselines.is_dir() else []
    rows = compare(hyper, found)
    per_method = {"none": [1.0] * len(names), "hypertransport": hyper.residuals} | {b.method: b.residuals for b in found}
    for row in rows:
        row["residual"] = bootstrap_ci(per_method[row["method"]], seed=seed)
    return {
        "judge": "transport",
        "data": str(dataset.root),
        "concepts": list(names),
        "rows": rows,
        "per_concept": {m: dict(zip(names, r)) for m, r in per_method.items() if len(r) == len(names)},
        "hyper_seconds_median": statistics.median(hyper.seconds) if hyper.seconds else None,
    }
