"""Held-out comparison of methods: residual ratio and time per concept, side by side.

`none` is the unsteered model (residual 1 by definition); per-concept baselines are read from
the summaries `ht fit-linear-baselines` writes (their residuals use the same evaluation
samples); HyperTransport is evaluated here, one forward pass per concept, timed from concept
text to maps (embedding included).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from htcli.core.files import read_json
from htcli.core.transport import Maps, residual_ratio
from htcli.data.concepts import ConceptLibrary
from htcli.data.dataset import ActivationDataset
from htcli.data.forward import Frozen
from htcli.evaluation.stats import bootstrap_ci
from htcli.methods.baselines import LineasConfig, fit_method
from htcli.methods.hypernetwork import HyperCheckpoint, unbatch


def residuals(
    frozen: Frozen, inputs: Mapping[str, Tensor], source: Mapping[str, Tensor], target: Mapping[str, Tensor], maps: Maps
) -> tuple[float, dict[str, float]]:
    """Residual ratio W2(steered, target) / W2(source, target), overall and per layer.

    Overall concatenates every layer's neurons. `inputs`, `source` and `target` are the
    evaluation samples: never the ones the maps were fitted on.
    """
    steered = frozen.pooled(inputs, maps)
    per_layer = {n: residual_ratio(steered[n], source[n], target[n]) for n in target}
    cat = lambda acts: torch.cat([acts[n] for n in target], dim=-1)  # noqa: E731
    return residual_ratio(cat(steered), cat(source), cat(target)), per_layer


@dataclass
class MethodResult:
    method: str
    residuals: list[float]
    seconds: list[float]  # per concept: fit time, or text-to-maps time

    @property
    def row(self) -> dict:
        spread = statistics.stdev(self.residuals) if len(self.residuals) > 1 else 0.0
        return {
            "method": self.method,
            "concepts": len(self.residuals),
            "residual_mean": statistics.fmean(self.residuals),
            "residual_std": spread,
            "seconds_median": statistics.median(self.seconds) if self.seconds else 0.0,
        }


def evaluate_hyper(
    checkpoint: HyperCheckpoint, encoder, library: ConceptLibrary, frozen: Frozen, dataset: ActivationDataset,
    names: Sequence[str],
) -> MethodResult:
    eval_inputs, source = dataset.source_inputs("eval"), dataset.source_activations("eval")
    device = frozen.model.device
    checkpoint.network.to(device)
    result = MethodResult("hypertransport", [], [])
    for name in names:
        start = time.perf_counter()
        embedding = encoder.encode_text([library.resolve(name).phrase])
        maps = unbatch(checkpoint.maps(embedding.to(device)))[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        result.seconds.append(time.perf_counter() - start)
        target = {k: v[0] for k, v in dataset.targets([name], "eval").items()}
        result.residuals.append(residuals(frozen, eval_inputs, source, target, maps)[0])
    return result


def evaluate_baseline(
    method: str, frozen: Frozen, dataset: ActivationDataset, names: Sequence[str], lineas: LineasConfig | None = None,
    on_fit: Callable[[str, dict, dict], None] | None = None,
) -> MethodResult:
    """Fit `method` on each concept's fitting samples and score it on its evaluation samples.
    `on_fit(name, maps, info)` sees every fit (e.g. to save it)."""
    fit_inputs, source_fit = dataset.source_inputs("fit"), dataset.source_activations("fit")
    eval_inputs, source_eval = dataset.source_inputs("eval"), dataset.source_activations("eval")
    result = MethodResult(method, [], [])
    for name in names:
        target = {k: v[0] for k, v in dataset.targets([name], "fit").items()}
        maps, seconds, info = fit_method(method, frozen, fit_inputs, source_fit, target, lineas)
        target_eval = {k: v[0] for k, v in dataset.targets([name], "eval").items()}
        result.residuals.append(residuals(frozen, eval_inputs, source_eval, target_eval, maps)[0])
        result.seconds.append(seconds)
        if on_fit:
            on_fit(name, maps, info)
    return result


def baseline_results(folder: Path, names: Sequence[str]) -> list[MethodResult]:
    """Results of every baseline method under `folder` (runs/<model>/baselines), for `names`."""
    results = []
    for summary_path in sorted(folder.glob("*/summary.json")):
        summary = read_json(summary_path)
        rows = [summary["concepts"][n] for n in names if n in summary["concepts"]]
        if rows:
            results.append(MethodResult(summary["method"], [r["residual"] for r in rows], [r["fit_seconds"] for r in rows]))
    return results


def compare(hyper: MethodResult, baselines: Sequence[MethodResult]) -> list[dict]:
    """Rows for none, each baseline and HyperTransport, with speed-ups against HyperTransport."""
    none = MethodResult("none", [1.0] * len(hyper.residuals), [0.0])
    rows = [none.row, *(b.row for b in baselines), hyper.row]
    ht_seconds = hyper.row["seconds_median"]
    for row in rows:
        row["times_ht"] = row["seconds_median"] / ht_seconds if ht_seconds and row["method"] != "none" else None
    return rows


# --- the transport judge -----------------------------------------------------------------


def baseline_concepts(folder: Path) -> dict[str, set[str]]:
    """Concepts fitted by each baseline method under `folder` (runs/<model>/baselines)."""
    if not folder.is_dir():
        return {}
    return {p.parent.name: set(read_json(p)["concepts"]) for p in sorted(folder.glob("*/summary.json"))}


def transport_judge(checkpoint, encoder, library, frozen, dataset, names: Sequence[str], baselines: Path | None,
                    seed: int = 0) -> dict:
    """The transport section of scores.json: residual ratios per method on `names`, with intervals.

    Each method's residuals use the dataset's evaluation samples (never the fitted ones).
    """
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
