"""Held-out comparison of methods: residual ratio and time per concept, side by side.

`none` is the unsteered model (residual 1 by definition); per-concept baselines are read from
the summaries `ht fit-linear-baselines` writes (their residuals use the same evaluation
samples); HyperTransport is evaluated here, one forward pass per concept, timed from concept
text to maps (embedding included) by its `Predictor`. A baseline's cost from the concept's text
adds the capture of its target activations (`capture_seconds`), where that was measured.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from htcli.core.files import read_json
from htcli.core.runtime import Progress
from htcli.data.build import Builder
from htcli.data.concepts import Concept, ConceptLibrary
from htcli.data.dataset import ActivationDataset, check_limit, check_split
from htcli.data.forward import Frozen
from htcli.errors import HTError
from htcli.evaluation.stats import bootstrap_ci
from htcli.methods.fitting import SUMMARY, MethodResult
from htcli.methods.objective import residuals
from htcli.methods.predict import Predictor


def evaluate_hyper(
    predictor: Predictor, library: ConceptLibrary, frozen: Frozen, dataset: ActivationDataset, names: Sequence[str],
    progress: Progress | None = None,
) -> MethodResult:
    """HyperTransport's residual on each concept's evaluation samples, and its concept-text-to-maps time."""
    eval_inputs, source = dataset.source_inputs("eval"), dataset.source_activations("eval")
    result = MethodResult("hypertransport", [], [])
    for done, name in enumerate(names, 1):
        prediction = predictor.predict([library.resolve(name)])
        maps = prediction.maps[0]
        result.seconds.append(prediction.ms / 1e3)
        target = {k: v[0] for k, v in dataset.targets([name], "eval").items()}
        result.residuals.append(residuals(frozen, eval_inputs, source, target, maps)[0])
        if progress:
            progress(done, len(names), name)
    return result




def baseline_folders(folders: Sequence[Path]) -> list[Path]:
    """The baseline method folders in `folders`: each is a method's own folder or a baselines
    root (runs/<model>/baselines) whose subfolders are methods. One rule, for every reader of
    baselines (`ht evaluate`, `ht score`): a method folder is one with the summary.json that
    `ht fit-linear-baselines` writes; stray intervention files without one are not a method."""
    found = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise HTError(f"baselines={str(folder)!r} is not a directory; fit baselines with `ht fit-linear-baselines`")
        methods = [folder] if (folder / SUMMARY).is_file() else sorted(p.parent for p in folder.glob(f"*/{SUMMARY}"))
        if not methods:
            raise HTError(f"no baselines in {folder} or its subfolders (no {SUMMARY}); "
                          "fit some with `ht fit-linear-baselines`")
        found += methods
    return found


def baseline_summaries(folders: Sequence[Path]) -> list[Path]:
    """summary.json of each baseline method in `folders` (see `baseline_folders`)."""
    return [folder / SUMMARY for folder in baseline_folders(folders)]


def baseline_results(folders: Sequence[Path], names: Sequence[str]) -> list[MethodResult]:
    """Results of every baseline method in `folders` for the concepts `names` it has fitted."""
    results = []
    for path in baseline_summaries(folders):
        summary = read_json(path)
        rows = [summary["concepts"][n] for n in names if n in summary["concepts"]]
        if rows:
            results.append(MethodResult(summary["method"], [r["residual"] for r in rows], [r["fit_seconds"] for r in rows]))
    return results


def capture_seconds(builder: Builder, concepts: Sequence[Concept]) -> list[float]:
    """Seconds to capture each concept's target activations on the fitting samples, from its
    text (`Builder.capture`): the cost every per-concept baseline pays before it can fit."""
    seconds = []
    for concept in concepts:
        start = time.perf_counter()
        builder.capture(concept)
        seconds.append(time.perf_counter() - start)
    return seconds


def compare(hyper: MethodResult, baselines: Sequence[MethodResult], seed: int = 0,
            capture: Sequence[float] = ()) -> list[dict]:
    """Rows for none, each baseline and HyperTransport: the residual's mean, spread and seeded
    bootstrap interval over concepts, and the time per concept.

    `seconds_median` is the fit alone (HyperTransport: concept text to maps). A baseline needs the
    concept's target activations first: with `capture` (seconds per concept, `capture_seconds`),
    `seconds_total` is the median capture plus the median fit, the cost from the concept's text,
    and `times_ht` compares it with HyperTransport's; without, both are None (not measured)."""
    none = MethodResult("none", [1.0] * len(hyper.residuals), [0.0])
    ht_seconds = hyper.row["seconds_median"]
    capture_median = statistics.median(capture) if capture else None
    rows = []
    for result in [none, *baselines, hyper]:
        row = result.row | {"residual": bootstrap_ci(result.residuals, seed=seed)}
        if result is hyper:
            row["seconds_total"] = ht_seconds
        elif result is none or capture_median is None:
            row["seconds_total"] = None
        else:
            row["seconds_total"] = capture_median + row["seconds_median"]
        row["capture_seconds"] = capture_median if result not in (none, hyper) else None
        row["times_ht"] = row["seconds_total"] / ht_seconds if ht_seconds and row["seconds_total"] is not None else None
        rows.append(row)
    return rows


# --- the transport judge -----------------------------------------------------------------


def transport_concepts(dataset: ActivationDataset, split: str, baselines: Sequence[Path], limit: int | None = None,
                       seed: int = 0) -> list[str]:
    """The dataset's `split` concepts that every baseline in `baselines` has fitted (a paired
    comparison); with `limit`, a seeded sample of that many."""
    check_split(split)
    check_limit(limit)
    names = dataset.names(None if split == "all" else split)
    for path in baseline_summaries(baselines):
        fitted = set(read_json(path)["concepts"])
        names = [n for n in names if n in fitted]
    if limit is not None and limit < len(names):
        names = sorted(random.Random(seed).sample(names, limit), key=str.lower)
    if not names:
        where = f" fitted by the baselines in {', '.join(map(str, baselines))}" if baselines else ""
        raise HTError(f"no {split} concepts of {dataset.root}{where} to judge; try split='all' or other baselines=")
    return names


def transport_judge(predictor: Predictor, library: ConceptLibrary, frozen: Frozen, dataset: ActivationDataset,
                    names: Sequence[str], baselines: Sequence[Path] = (), seed: int = 0,
                    progress: Progress | None = None) -> dict:
    """The transport section of scores.json: residual ratios per method on `names`, with intervals.

    Each method's residuals use the dataset's evaluation samples (never the fitted ones).
    """
    hyper = evaluate_hyper(predictor, library, frozen, dataset, names, progress)
    found = baseline_results(baselines, names)
    per_method = {"none": [1.0] * len(names), "hypertransport": hyper.residuals} | {b.method: b.residuals for b in found}
    return {
        "judge": "transport",
        "data": str(dataset.root),
        "concepts": list(names),
        "rows": compare(hyper, found, seed),
        "per_concept": {m: dict(zip(names, r)) for m, r in per_method.items() if len(r) == len(names)},
        "hyper_seconds_median": statistics.median(hyper.seconds) if hyper.seconds else None,
    }
