"""Reports of the judges: terminal tables (rich), scores.json, report.md and PNG plots.

Every judge writes its section into the run folder's `scores.json` (`clip`, `vlm` keyed by
pair, `transport`); report.md and the plots are regenerated from all sections present, so
`ht score --judge clip`, `--judge vlm` and `--judge transport` build one report together.
Plots are drawn with PIL (already a dependency) rather than adding matplotlib.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from rich.table import Table

from htcli.core.files import atomic_path, read_json, write_json

SCORES = "scores.json"
REPORT = "report.md"
TRADEOFF_PLOT = "clip_tradeoff.png"
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75), (227, 119, 194)]
CLIP_COLUMNS = (("concept_fidelity", "concept"), ("zero_shot", "P(concept)"), ("input_fidelity", "input"),
                ("preservation", "preserved"))


def strength_label(strength: Any) -> str:
    if strength is None:
        return "-"
    return strength if isinstance(strength, str) else f"{strength:g}"


def ci_text(ci: Mapping[str, Any] | None, digits: int = 3) -> str:
    """`0.512 [0.480, 0.545]`; `-` when there is nothing to show."""
    if not ci or ci.get("mean") is None:
        return "-"
    if ci["lo"] == ci["hi"]:
        return f"{ci['mean']:.{digits}f}"
    return f"{ci['mean']:.{digits}f} [{ci['lo']:.{digits}f}, {ci['hi']:.{digits}f}]"


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


def transport_rows(section: Mapping[str, Any], fmt=ci_text) -> list[list[str]]:
    out = []
    for row in section["rows"]:
        ratio = row.get("times_ht")
        times = "-" if ratio is None else f"{ratio:,.0f}" if ratio >= 10 else f"{ratio:.2f}"
        out.append([row["method"], str(row["concepts"]), fmt(row["residual"]), f"{row['seconds_median']:.3g}", times])
    return out


CLIP_HEAD = ["method", "strength", "n", *(label for _, label in CLIP_COLUMNS)]
VLM_HEAD = ["strength", "judged", "malformed", "win", "tie", "loss", "consistency"]
TRANSPORT_HEAD = ["method", "concepts", "residual ratio", "s / concept", "x HT time"]


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
    return rich_table(f"Transport judge: {len(section['concepts'])} held-out concepts, W2 residual ratio (lower is better)",
                      TRANSPORT_HEAD, transport_rows(section, pm_text))


# --- Markdown ----------------------------------------------------------------------------


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
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
                  "Concept fidelity: cosine of image and concept phrase; P(concept): zero-shot probability of the "
                  f"phrase against \"{clip['neutral']}\"; input fidelity: cosine of image and source prompt; "
                  "preservation: cosine of the image and the unsteered (`none`, strength 0) image of the same "
                  "concept, prompt and seed. Mean [95% bootstrap interval] over images.", "",
                  _md_table(CLIP_HEAD, clip_rows(clip)), "", f"![concept vs input fidelity]({TRADEOFF_PLOT})"]
    for key, section in (scores.get("vlm") or {}).items():
        a, b = section["pair"]
        parts += ["", f"## VLM judge: {a} vs {b} (`{section['backend']}`)", "",
                  f"Each pair asked in both orders; rates are {a}'s wins, ties and losses. Consistency: the share "
                  f"of judged pairs with the same verdict in both orders. Malformed answers: {section['malformed_answers']}.",
                  "", _md_table(VLM_HEAD, vlm_rows(section)), "", f"![win tie loss]({vlm_plot_name(key)})"]
    if transport := scores.get("transport"):
        parts += ["", "## Transport judge", "",
                  f"W2 residual ratio in activation space on {len(transport['concepts'])} held-out concepts of "
                  f"`{transport['data']}` (evaluation samples; 1 = no change, 0 = the target).", "",
                  _md_table(TRANSPORT_HEAD, transport_rows(transport))]
    return "\n".join(parts) + "\n"


# --- plots -------------------------------------------------------------------------------


def _font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (count - 1) for i in range(count)]


def plot_tradeoff(section: Mapping[str, Any], path: Path) -> Path:
    """Concept fidelity (y) against input fidelity (x): one line per steering method as its
    strength grows from the unsteered image; prompting is a single point."""
    rows = [r for r in section["summary"] if r["concept_fidelity"]["mean"] is not None and r["input_fidelity"]["mean"] is not None]
    width, height, left, right, top, bottom = 760, 480, 70, 190, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(image), _font()
    xs = [v for r in rows for v in (r["input_fidelity"]["lo"], r["input_fidelity"]["hi"])]
    ys = [v for r in rows for v in (r["concept_fidelity"]["lo"], r["concept_fidelity"]["hi"])]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
    pad_x, pad_y = max((x1 - x0) * 0.08, 1e-3), max((y1 - y0) * 0.08, 1e-3)
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right), height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    # 1. Frame, ticks and labels.
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for x in _ticks(x0, x1):
        px, _ = at(x, y0)
        draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
        draw.text((px - 14, height - bottom + 6), f"{x:.3f}", fill="black", font=font)
    for y in _ticks(y0, y1):
        _, py = at(x0, y)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((4, py - 7), f"{y:.3f}", fill="black", font=font)
    draw.text((left, 4), f"CLIP {section['clip_model']}: concept vs input fidelity as strength grows", fill="black", font=font)
    draw.text(((left + width - right) / 2 - 40, height - 20), "input fidelity", fill="black", font=font)
    draw.text((4, top - 22), "concept fidelity", fill="black", font=font)

    # 2. One polyline per steering method, from the unsteered point; whiskers are the 95% intervals.
    def point(row: Mapping[str, Any], color: tuple, square: bool = False) -> tuple[float, float]:
        cx, cy = at(row["input_fidelity"]["mean"], row["concept_fidelity"]["mean"])
        lx, _ = at(row["input_fidelity"]["lo"], 0)
        hx, _ = at(row["input_fidelity"]["hi"], 0)
        _, ly = at(0, row["concept_fidelity"]["lo"])
        _, hy = at(0, row["concept_fidelity"]["hi"])
        draw.line([lx, cy, hx, cy], fill=color)
        draw.line([cx, ly, cx, hy], fill=color)
        box = [cx - 4, cy - 4, cx + 4, cy + 4]
        draw.rectangle(box, fill=color) if square else draw.ellipse(box, fill=color)
        return cx, cy

    none = next((r for r in rows if r["method"] == "none"), None)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    methods = [m for m in methods if m != "none"] + ["none"] * ("none" in methods)  # unsteered on top
    legend_y = top
    for i, method in enumerate(methods):
        color = (0, 0, 0) if method == "none" else COLORS[i % len(COLORS)]
        own = [r for r in rows if r["method"] == method]
        if method not in ("none", "prompt") and none is not None:
            own = [none, *own]
        centres = [point(r, color, square=method == "prompt") for r in own]
        if len(centres) > 1:
            draw.line(centres, fill=color, width=2)
        for r, (cx, cy) in zip(own, centres):
            if r["strength"] is not None and r["method"] != "none":
                draw.text((cx + 6, cy - 14), strength_label(r["strength"]), fill=color, font=font)
        label = {"none": "unsteered (strength 0)", "prompt": "prompt (no strength)"}.get(method, method)
        draw.line([width - right + 12, legend_y + 7, width - right + 32, legend_y + 7], fill=color, width=3)
        draw.text((width - right + 38, legend_y), label, fill="black", font=font)
        legend_y += 20
    _save(image, path)
    return path


def _save(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def vlm_plot_name(pair_key: str) -> str:
    return "vlm_" + pair_key.replace(",", "_vs_") + ".png"


def plot_vlm(section: Mapping[str, Any], path: Path) -> Path:
    """Stacked bars of win / tie / loss rates per strength."""
    rows = [r for r in section["summary"] if r["judged"]]
    bar, gap, left, top = 26, 12, 110, 40
    width, height = 640, top + len(rows) * (bar + gap) + 50
    image = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(image), _font()
    a, b = section["pair"]
    draw.text((10, 10), f"VLM judge: {a} vs {b} (win / tie / loss of {a})", fill="black", font=font)
    span = width - left - 30
    colors = {"win": (44, 160, 44), "tie": (170, 170, 170), "loss": (214, 39, 40)}
    for i, row in enumerate(rows):
        y = top + i * (bar + gap)
        label = "all strengths" if row["strength"] == "all" else f"strength {strength_label(row['strength'])}"
        draw.text((10, y + 6), label, fill="black", font=font)
        x = float(left)
        for outcome, color in colors.items():
            share = row[outcome]["mean"] or 0.0
            if share > 0:
                draw.rectangle([x, y, x + share * span, y + bar], fill=color)
                if share > 0.08:
                    draw.text((x + 4, y + 6), f"{share:.0%}", fill="white", font=font)
            x += share * span
    legend_x = left
    for outcome, color in colors.items():
        draw.rectangle([legend_x, height - 30, legend_x + 14, height - 16], fill=color)
        draw.text((legend_x + 20, height - 31), outcome, fill="black", font=font)
        legend_x += 80
    _save(image, path)
    return path


def write_report(root: Path, scores: Mapping[str, Any]) -> list[Path]:
    """report.md and the plots of every section in `scores`, written into the run folder."""
    written = []
    if "clip" in scores:
        written.append(plot_tradeoff(scores["clip"], root / TRADEOFF_PLOT))
    for key, section in (scores.get("vlm") or {}).items():
        written.append(plot_vlm(section, root / vlm_plot_name(key)))
    report = root / REPORT
    with atomic_path(report) as tmp:
        tmp.write_text(markdown(scores))
    return [report, *written]
