"""Fitting baselines concept by concept, each scored on its held-out evaluation samples.

`fit_baselines` is the one loop behind `ht fit-linear-baselines`, the demo and the benchmarks:
for every concept it fits the method on the concept's fitting samples, measures the residual
ratio on its evaluation samples (other prompts and seeds), and, given a folder, saves the
intervention file and `summary.json` after every concept. A rerun with the same settings skips
the concepts already in the summary, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from htcli.core.files import read_json, write_json
from htcli.core.interventions import Intervention
from htcli.core.runtime import Progress
from htcli.data.concepts import slugify
from htcli.data.dataset import ActivationDataset
from htcli.data.forward import Frozen
from htcli.errors import HTError
from htcli.evaluation.residuals import MethodResult, residuals
from htcli.methods.baselines import METHOD_FITS, LineasConfig, fit_method


def check_method(method: str) -> None:
    if method not in METHOD_FITS:
        raise HTError(f"unknown method {method!r}; use one of {', '.join(sorted(METHOD_FITS))}")


def fit_baselines(
    method: str,
    frozen: Frozen,
    dataset: ActivationDataset,
    names: Sequence[str],
    *,
    samples: int | None = None,
    lineas: LineasConfig | None = None,
    incremental: bool = False,
    out: Path | None = None,
    progress: Progress | None = None,
) -> MethodResult:
    """Fit `method` on each concept of `names` and score it on the concept's evaluation samples.

    `samples`: fitting samples per concept (None: all the dataset has). With `out` (a
    baselines folder, e.g. runs/<model>/baselines), files go to `out/<method>/`: one
    intervention file per concept and summary.json, both written after every concept.
    """
    check_method(method)
    n = dataset.fitting_samples(samples)
    lineas = (lineas or LineasConfig()) if method == "lineas" else None
    settings = {"samples": n, "dataset_digest": dataset.manifest["settings_digest"],
                "lineas": asdict(lineas) if lineas else None, "incremental": incremental if method == "linear-act" else None}
    fit_inputs = {k: v[:n] for k, v in dataset.source_inputs("fit").items()}  # (N, ...) per input
    source_fit = {k: v[:n] for k, v in dataset.source_activations("fit").items()}  # (N, D) per layer
    eval_inputs, source_eval = dataset.source_inputs("eval"), dataset.source_activations("eval")
    folder = out / method if out is not None else None
    summary = _summary(folder, method, frozen.spec.id, settings)
    result = MethodResult(method, [], [])
    for index, name in enumerate(names):
        row = summary["concepts"].get(name)
        if row is None or folder is None or not (folder / row["file"]).exists():
            target_fit = {k: v[0, :n] for k, v in dataset.targets([name], "fit").items()}  # (N, D)
            maps, seconds, info = fit_method(method, frozen, fit_inputs, source_fit, target_fit, lineas, incremental)
            target_eval = {k: v[0] for k, v in dataset.targets([name], "eval").items()}  # (M, D)
            overall, per_layer = residuals(frozen, eval_inputs, source_eval, target_eval, maps)
            intervention = Intervention(maps, frozen.spec.id, method, name, dataset.settings.encoder,
                                        info=info | {"fit_seconds": seconds, "samples": n, "residual": overall})
            row = {"file": f"{slugify(name)}.safetensors", "split": dataset.split_of(name), "fit_seconds": seconds,
                   "residual": overall, "residual_per_layer": per_layer, "support": intervention.support(),
                   **{k: v for k, v in info.items() if k.startswith("loss")}}
            if folder is not None:  # the file first: a summary row always has its file
                intervention.save(folder / row["file"])
                summary["concepts"][name] = row
                write_json(folder / "summary.json", summary)
        result.residuals.append(row["residual"])
        result.seconds.append(row["fit_seconds"])
        if progress:
            progress(index + 1, len(names), name)
    return result


def _summary(folder: Path | None, method: str, model: str, settings: dict) -> dict:
    """The summary to continue: the saved one if fitted with `settings`, else a fresh one."""
    path = folder / "summary.json" if folder is not None else None
    if path is not None and path.exists():
        saved = read_json(path)
        if saved.get("settings") == settings and saved.get("model") == model:
            return saved
    return {"method": method, "model": model, "settings": settings, "concepts": {}}


@dataclass
class BaselineRun:
    """What `ht fit-linear-baselines` reports: one summary row per concept."""

    method: str
    model: str
    folder: Path
    rows: dict[str, dict]


def run_baselines(
    method: str,
    dataset: ActivationDataset,
    *,
    names: Sequence[str] = (),
    split: str = "test",
    samples: int | None = None,
    lineas: LineasConfig | None = None,
    incremental: bool = False,
    out: Path | None = None,
    device: str | None = None,
    progress: Progress | None = None,
) -> BaselineRun:
    """Load the dataset's denoiser and fit `method` on the named concepts (else the split's),
    writing to `out/<method>/` (default runs/<model>/baselines/<method>)."""
    from htcli.core.hooks import resolve_layers
    from htcli.core.runtime import resolve_device, run_path
    from htcli.models import get_model, load_denoiser

    check_method(method)  # every check before the model loads
    chosen = dataset.select(names, split)
    dataset.fitting_samples(samples)
    spec = get_model(dataset.settings.model)
    denoiser = load_denoiser(spec, resolve_device(device))
    frozen = Frozen(spec, denoiser, resolve_layers(denoiser, dataset.settings.layers))
    out = Path(out) if out is not None else run_path(spec.id, "baselines")
    fit_baselines(method, frozen, dataset, chosen, samples=samples, lineas=lineas, incremental=incremental, out=out,
                  progress=progress)
    summary = read_json(out / method / "summary.json")
    return BaselineRun(method, spec.id, out / method, {name: summary["concepts"][name] for name in chosen})
