"""Statistics of judged items: seeded bootstrap intervals and grouped summaries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


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


def strength_label(strength: float | str | None) -> str:
    """`0.5`, `all`, or `-` for prompting (no strength)."""
    if strength is None:
        return "-"
    return strength if isinstance(strength, str) else f"{strength:g}"


def plural(count: int, noun: str, many: str | None = None) -> str:
    """`1 concept`, `2 concepts`, `1,000 held-out concepts`, `3 categories` (with `many`): the
    count and its noun, agreed."""
    return f"{count:,} {noun if count == 1 else many or noun + 's'}"


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
