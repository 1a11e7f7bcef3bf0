"""Reports of the judges: terminal tables (rich), scores.json, report.md and PNG plots.

Every judge writes its section into the run folder's `scores.json` (`clip`, `vlm` keyed by
pair, `transport`); report.md and the plots (see `plots`) are regenerated from all sections
present, so `ht score --judge clip`, `--judge vlm` and `--judge transport` build one report
together. The Markdown helpers (`markdown_table`, `transport_rows`) also make the demo's report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from htcli.core.files import atomic_path, read_json, write_json
from htcli.evaluation.plots import plot_residuals, plot_tradeoff, plot_vlm
from htcli.evaluation.stats import plural, strength_label

SCORES = "scores.json"
REPORT = "report.md"
TRADEOFF_PLOT = "clip_tradeoff.png"
RESIDUALS_PLOT = "transport_residuals.png"
CLIP_COLUMNS = (("concept_fidelity", "concept"), ("zero_shot", "P(concept)"), ("input_fidelity", "input"),
                ("preservation", "preserved"))


def ci_text(ci: Mapping[str, Any] | None, digits: int = 3) -> str:
    """`0.512 [0.480, 0.545]`; `0.512` alone when the interval rounds to a point (as `pm_text`);
    `-` when there is nothing to show."""
    if not ci or ci.get("mean") is None:
        return "-"
    mean, lo, hi = (f"{ci[key]:.{digits}f}" for key in ("mean", "lo", "hi"))
    return mean if lo == hi == mean else f"{mean} [{lo}, {hi}]"


def pm_text(ci: Mapping[str, Any] | None, digits: int = 3) -> str:
    """`0.512±0.033` (the larger side of the interval): compact, for the terminal."""
    if not ci or ci.get("mean") is None:
        return "-"
    half = max(ci["hi"] - ci["mean"], ci["mean"] - ci["lo"])
    return f"{ci['mean']:.{digits}f}" if round(half, digits) == 0 else f"{ci['mean']:.{digits}f}±{half:.{digits}f}"


def update_scores(root: Path, judge: str, section: dict, header: Mapping[str, Any]) -> dict:
    """Put one judge's section into root/scores.json (atomically) and return the whole file."""
    path = root / SCORES
    scores = read_json(path) if path.is_file() else {}
    scores |= dict(header)
    if judge == "vlm":
        scores.setdefault("vlm", {})[",".join(section["pair"])] = section
    else:
        scores[judge] = section
    write_json(path, scores)
    return scores


# --- tables ------------------------------------------------------------------------------


def clip_rows(section: Mapping[str, Any], fmt=ci_text) -> list[list[str]]:
    return [[row["method"], strength_label(row["strength"]), str(row["n"]), *(fmt(row[k]) for k, _ in CLIP_COLUMNS)]
            for row in section["summary"]]


def vlm_rows(section: Mapping[str, Any], fmt=ci_text) -> list[list[str]]:
    out = []
    for row in section["summary"]:
        consistency = "-" if row["consistency"] is None else f"{row['consistency']:.2f}"
        out.append([strength_label(row["strength"]), str(row["judged"]), str(row["malformed"]),
                    *(fmt(row[k], 2) for k in ("win", "tie", "loss")), consistency])
    return out


def transport_rows(rows: Sequence[Mapping[str, Any]], fmt=ci_text) -> list[list[str]]:
    """One line per method of a residual comparison (the transport judge's or the demo's): the
    seconds from the concept's text (capture of its targets included; `-` where not measured),
    the fit alone, and the first against HyperTransport's."""
    out = []
    for row in rows:
        ratio, total = row.get("times_ht"), row.get("seconds_total")
        times = "-" if ratio is None else f"{ratio:,.0f}" if ratio >= 10 else f"{ratio:.2f}"
        fit = "-" if row["method"] == "none" else f"{row['seconds_median']:.3g}"
        out.append([row["method"], str(row["concepts"]), fmt(row["residual"]), "-" if total is None else f"{total:.3g}",
                    fit, times])
    return out


CLIP_HEAD = ["method", "strength", "n", *(label for _, label in CLIP_COLUMNS)]
VLM_HEAD = ["strength", "judged", "malformed", "win", "tie", "loss", "consistency"]
TRANSPORT_HEAD = ["method", "concepts", "residual ratio", "s / concept from text", "s fit only", "x HT time"]


def rich_table(title: str, head: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    table = Table(title=title)
    for i, column in enumerate(head):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


# Terminal tables show mean ± the larger half of the 95% interval; report.md shows [lo, hi].
def clip_table(section: Mapping[str, Any]) -> Table:
    return rich_table(f"CLIP judge ({section['clip_model']}), mean ± 95% bootstrap CI", CLIP_HEAD, clip_rows(section, pm_text))


def vlm_table(section: Mapping[str, Any]) -> Table:
    a, b = section["pair"]
    return rich_table(f"VLM judge ({section['backend']}): rates of {a} against {b}, ± 95% CI", VLM_HEAD,
                      vlm_rows(section, pm_text))


def transport_table(section: Mapping[str, Any]) -> Table:
    return rich_table(f"Transport judge: {plural(len(section['concepts']), 'held-out concept')}, W2 residual ratio "
                      "(lower is better)",
                      TRANSPORT_HEAD, transport_rows(section["rows"], pm_text))


TABLES = {"clip": clip_table, "vlm": vlm_table, "transport": transport_table}  # judge -> its terminal table


# --- Markdown ----------------------------------------------------------------------------


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(scores: Mapping[str, Any]) -> str:
    """report.md from every section of scores.json."""
    parts = [f"# Evaluation report: {scores.get('run', '')}", "", f"Model: `{scores.get('model')}`."]
    if scores.get("note"):
        parts += ["", f"> {scores['note']}"]
    if clip := scores.get("clip"):
        parts += ["", f"## CLIP judge (`{clip['clip_model']}`)", "",
                  ("Concept fidelity: cosine of image and concept phrase; P(concept): zero-shot probability of the "
                   f"phrase against \"{clip['neutral']}\"; input fidelity: cosine of image and source prompt; "
                   "preservation: cosine of the image and the unsteered (`none`, strength 0) image of the same "
                   "concept, prompt and seed. Mean [95% bootstrap interval] over images."), "",
                  markdown_table(CLIP_HEAD, clip_rows(clip)), "", f"![concept vs input fidelity]({TRADEOFF_PLOT})"]
    for key, section in (scores.get("vlm") or {}).items():
        a, b = section["pair"]
        parts += ["", f"## VLM judge: {a} vs {b} (`{section['backend']}`)", "",
                  (f"Each pair asked in both orders; rates are {a}'s wins, ties and losses. Consistency: the share "
                   f"of judged pairs with the same verdict in both orders. Malformed answers: {section['malformed_answers']}."),
                  "", markdown_table(VLM_HEAD, vlm_rows(section)), "", f"![win tie loss]({vlm_plot_name(key)})"]
    if transport := scores.get("transport"):
        parts += ["", "## Transport judge", "",
                  (f"W2 residual ratio in activation space on {plural(len(transport['concepts']), 'held-out concept')} of "
                   f"`{transport['data']}` (evaluation samples; 1 = no change, 0 = the target). Fit times are the "
                   "baselines' own; their time from the concept's text (capturing its target activations first) is "
                   "not measured by this judge: `ht demo` and `python -m bench.amortization` measure it."), "",
                  markdown_table(TRANSPORT_HEAD, transport_rows(transport["rows"])), "", f"![residual ratios]({RESIDUALS_PLOT})"]
    return "\n".join(parts) + "\n"


def vlm_plot_name(pair_key: str) -> str:
    return "vlm_" + pair_key.replace(",", "_vs_") + ".png"


def write_report(root: Path, scores: Mapping[str, Any], judge: str | None = None,
                 pair: str | None = None) -> list[Path]:
    """report.md from every section of `scores`, and the plots of `judge` (of its VLM `pair`,
    e.g. "hypertransport,prompt", if given; of every section when no judge is given), written
    into the run folder. Returns what was written: other sections' plots are left as they are."""
    written = []
    if "clip" in scores and judge in (None, "clip"):
        written.append(plot_tradeoff(scores["clip"], root / TRADEOFF_PLOT))
    for key, section in (scores.get("vlm") or {}).items():
        if judge is None or (judge == "vlm" and pair in (None, key)):
            written.append(plot_vlm(section, root / vlm_plot_name(key)))
    if "transport" in scores and judge in (None, "transport"):
        written.append(plot_residuals(scores["transport"]["rows"], root / RESIDUALS_PLOT,
                                      "Transport judge: held-out residual ratio per method"))
    report = root / REPORT
    with atomic_path(report) as tmp:
        tmp.write_text(markdown(scores), encoding="utf-8")
    return [report, *written]
