"""The plots of the reports, drawn with matplotlib in one style and written atomically.

- `plot_tradeoff`: CLIP concept fidelity against input fidelity, one line per steering method
  as its strength grows from the unsteered image (prompting is one point);
- `plot_vlm`: the VLM judge's win / tie / loss rates of A, stacked, one bar per strength;
- `plot_residuals`: residual ratio per method (lower is better; 1 = no steering);
- `plot_residual_vs_similarity`: a hypernetwork's residual ratio per held-out concept against
  the concept's similarity to its nearest training concept.

Figures are `matplotlib.figure.Figure` objects, never pyplot's: no global backend is chosen
and no figure state is shared, so importing this module changes nothing for a notebook, and
plotting works with no display and from several threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
from matplotlib.figure import Figure

from htcli.core.files import atomic_path
from htcli.evaluation.stats import strength_label

STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.spines.top": False, "axes.spines.right": False,
         "axes.grid": True, "grid.alpha": 0.3, "legend.frameon": False, "savefig.dpi": 120}
PALETTE = mpl.colormaps["tab10"].colors
OUTCOME_COLORS = {"win": "#2ca02c", "tie": "#aaaaaa", "loss": "#d62728"}


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def _errors(ci: Mapping[str, float]) -> list[list[float]]:
    """matplotlib's asymmetric error bar of one interval: [[below], [above]]."""
    return [[ci["mean"] - ci["lo"]], [ci["hi"] - ci["mean"]]]


def plot_tradeoff(section: Mapping[str, Any], path: Path) -> Path:
    """Concept fidelity (y) against input fidelity (x), with the 95% intervals as error bars."""
    rows = [r for r in section["summary"]
            if r["concept_fidelity"]["mean"] is not None and r["input_fidelity"]["mean"] is not None]
    none = next((r for r in rows if r["method"] == "none"), None)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "none"]
    with mpl.rc_context(STYLE):
        figure = Figure(figsize=(7.5, 4.8))
        axes = figure.subplots()
        for i, method in enumerate(methods):
            own = [r for r in rows if r["method"] == method]
            if method != "prompt" and none is not None:
                own = [none, *own]  # every strength curve starts at the unsteered image
            color = PALETTE[i % len(PALETTE)]
            xs = [r["input_fidelity"]["mean"] for r in own]
            ys = [r["concept_fidelity"]["mean"] for r in own]
            marker = "s" if method == "prompt" else "o"
            label = "prompt (no strength)" if method == "prompt" else method
            axes.plot(xs, ys, marker=marker, color=color, label=label, linewidth=1.8)
            for r in own:
                axes.errorbar(r["input_fidelity"]["mean"], r["concept_fidelity"]["mean"], xerr=_errors(r["input_fidelity"]),
                              yerr=_errors(r["concept_fidelity"]), color=color, alpha=0.5, linewidth=1)
                if r["strength"] is not None and r["method"] != "none":
                    axes.annotate(strength_label(r["strength"]), (r["input_fidelity"]["mean"], r["concept_fidelity"]["mean"]),
                                  textcoords="offset points", xytext=(5, 5), color=color, fontsize=8)
        if none is not None:
            axes.plot([none["input_fidelity"]["mean"]], [none["concept_fidelity"]["mean"]], marker="o", color="black",
                      linestyle="none", label="unsteered (strength 0)", zorder=5)
        axes.set_xlabel("input fidelity: cos(image, source prompt)")
        axes.set_ylabel("concept fidelity: cos(image, concept)")
        axes.set_title(f"CLIP {section['clip_model']}: concept vs input fidelity as strength grows")
        axes.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
        return _save(figure, path)


def plot_vlm(section: Mapping[str, Any], path: Path) -> Path:
    """Stacked horizontal bars of A's win / tie / loss rates, one per strength (and overall)."""
    rows = [r for r in section["summary"] if r["judged"]]
    a, b = section["pair"]
    with mpl.rc_context(STYLE | {"axes.grid": False}):
        figure = Figure(figsize=(7.5, 1.2 + 0.5 * max(len(rows), 1)))
        axes = figure.subplots()
        labels = ["all strengths" if r["strength"] == "all" else f"strength {strength_label(r['strength'])}" for r in rows]
        left = [0.0] * len(rows)
        for outcome, color in OUTCOME_COLORS.items():
            shares = [r[outcome]["mean"] or 0.0 for r in rows]
            bars = axes.barh(labels, shares, left=left, color=color, label=outcome)
            axes.bar_label(bars, labels=[f"{s:.0%}" if s >= 0.08 else "" for s in shares], label_type="center",
                           color="white", fontsize=8)
            left = [x + s for x, s in zip(left, shares)]
        axes.set_xlim(0, 1)
        axes.invert_yaxis()  # strengths top to bottom in the summary's order
        axes.set_xlabel(f"share of judged pairs (n = {', '.join(str(r['judged']) for r in rows) or 0})")
        axes.set_title(f"VLM judge: {a} vs {b} (outcomes of {a})")
        axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35 if rows else -0.1), ncol=3)
        return _save(figure, path)


def plot_residuals(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Residual ratio per method with its 95% interval; the dashed line at 1 is no steering."""
    names = [r["method"] for r in rows]
    means = [r["residual"]["mean"] for r in rows]
    with mpl.rc_context(STYLE):
        figure = Figure(figsize=(7.0, 1.2 + 0.45 * len(rows)))
        axes = figure.subplots()
        errors = [[m - r["residual"]["lo"] for m, r in zip(means, rows)], [r["residual"]["hi"] - m for m, r in zip(means, rows)]]
        colors = ["#999999" if n == "none" else PALETTE[i % len(PALETTE)] for i, n in enumerate(names)]
        axes.barh(names, means, xerr=errors, color=colors, capsize=3)
        for y, (mean, row) in enumerate(zip(means, rows)):  # the value past its whisker, never on it
            axes.annotate(f"{mean:.3f}", (row["residual"]["hi"], y), xytext=(4, 0), textcoords="offset points",
                          va="center", fontsize=8)
        axes.axvline(1.0, color="black", linestyle="--", linewidth=1)
        axes.annotate("no steering", (1.0, 0.0), xycoords=("data", "axes fraction"), xytext=(4, 4),
                      textcoords="offset points", fontsize=8)
        axes.invert_yaxis()
        axes.set_xlim(0, max([1.2, *(r["residual"]["hi"] * 1.15 for r in rows)]))
        axes.set_xlabel("W2 residual ratio (lower is better; 0 = the target)")
        axes.set_title(title)
        return _save(figure, path)


def plot_residual_vs_similarity(similarity: Sequence[float], residual: Sequence[float], path: Path, title: str,
                                threshold: float | None = None, reference: float | None = None) -> Path:
    """One point per concept: residual ratio (y) against cosine similarity to the nearest
    training concept (x), with the out-of-distribution `threshold` (vertical) and a `reference`
    residual (horizontal, e.g. a per-concept baseline's mean) when given."""
    with mpl.rc_context(STYLE):
        figure = Figure(figsize=(6.5, 4.5))
        axes = figure.subplots()
        axes.scatter(similarity, residual, s=14, color=PALETTE[0], alpha=0.8, label="held-out concept")
        if threshold is not None:
            axes.axvline(threshold, color=PALETTE[3], linestyle="--", linewidth=1,
                         label=f"out-of-distribution threshold ({threshold:.2f})")
        if reference is not None:
            axes.axhline(reference, color="black", linestyle=":", linewidth=1, label=f"per-concept LinEAS ({reference:.3f})")
        axes.set_xlabel("cosine similarity to the nearest training concept")
        axes.set_ylabel("W2 residual ratio (lower is better)")
        axes.set_title(title)
        axes.legend(loc="upper right")
        return _save(figure, path)
