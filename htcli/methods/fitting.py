"""Fitting baselines concept by concept, each scored on its held-out evaluation samples.

`fit_baselines` is the one loop behind `ht fit-linear-baselines`, the demo and the benchmarks:
for every concept it fits the method on the concept's fitting samples, measures the residual
ratio on its evaluation samples (other prompts and seeds), and, given a folder, saves the
intervention file and `summary.json` after every concept. A rerun with the same settings skips
the concepts already in the summary, so an interrupted run resumes where it stopped; a folder
fitted with other settings is refused unless `overwrite`, which first removes its old files (so
no stale intervention file is ever evaluated as if it were part of the new run).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from htcli.core.files import check_output_dir, read_json, write_json
from htcli.core.runtime import Progress
from htcli.data.concepts import slugify
from htcli.data.dataset import ActivationDataset
from htcli.data.forward import Frozen
from htcli.errors import HTError
from htcli.methods.baselines import METHOD_FITS, LineasConfig, fit_method
from htcli.methods.objective import residuals
from htcli.methods.predict import Predictor
from htcli.methods.refine import check_refine_steps, refine_maps, refined_method
from htcli.models.interventions import Intervention

SUMMARY = "summary.json"  # per baseline method, written by `ht fit-linear-baselines`


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


def check_method(method: str) -> None:
    if method not in METHOD_FITS:
        raise HTError(f"unknown method {method!r}; use one of {', '.join(sorted(METHOD_FITS))}")


def fit_settings(method: str, dataset: ActivationDataset, samples: int | None = None,
                 lineas: LineasConfig | None = None, incremental: bool = False, refine: int | None = None,
                 checkpoint: str | None = None) -> dict:
    """The settings a method's summary.json records: a rerun with equal ones resumes the folder.
    `refine` N: LinEAS runs N steps from the predictions of the hypernetwork whose file digest
    is `checkpoint`; both are recorded with the LinEAS settings, so another checkpoint is refused."""
    check_method(method)
    lineas = (lineas or LineasConfig()) if method == "lineas" else None
    # --micro-batch changes memory only (the gradient is exact): a rerun with another one resumes.
    fitted = {k: v for k, v in asdict(lineas).items() if k != "micro_batch"} if lineas else None
    if refine is not None:
        if method != "lineas":
            raise HTError(f"--refine warm-starts LinEAS from HyperTransport; use it with --method lineas, not {method}")
        check_refine_steps(refine)
        fitted |= {"steps": refine, "refine": refine, "hyper": checkpoint}
    return {"samples": dataset.fitting_samples(samples), "dataset_digest": dataset.manifest["settings_digest"],
            "lineas": fitted, "incremental": incremental if method == "linear-act" else None}


def settings_differences(saved: dict, model: str, settings: dict) -> list[str]:
    """What differs from a saved summary's model and settings, by the option that sets it:
    '--samples 8 (saved 16)', 'another dataset (settings digest ...)', '--lr 0.1 (saved 0.01)'."""
    old = saved.get("settings") or {}
    differ = []
    if saved.get("model") != model:
        differ.append(f"model {model} (saved {saved.get('model')})")
    if old.get("dataset_digest") != settings["dataset_digest"]:
        differ.append(f"another dataset (settings digest {settings['dataset_digest']}, saved {old.get('dataset_digest')})")
    if old.get("samples") != settings["samples"]:
        differ.append(f"--samples {settings['samples']} (saved {old.get('samples')})")
    if old.get("incremental") != settings["incremental"]:
        differ.append(f"--incremental {_on(settings['incremental'])} (saved {_on(old.get('incremental'))})")
    new_lineas, old_lineas = settings["lineas"] or {}, old.get("lineas") or {}
    for key in sorted(set(new_lineas) | set(old_lineas)):
        if new_lineas.get(key) != old_lineas.get(key):
            differ.append(f"--{key.replace('_', '-')} {new_lineas.get(key)} (saved {old_lineas.get(key)})")
    return differ


def _on(flag: bool | None) -> str:
    return "on" if flag else "off"


def prepare_folder(folder: Path, method: str, model: str, settings: dict, overwrite: bool = False) -> dict:
    """The summary to continue in a method's `folder`: the saved one if fitted with `settings`
    (an interrupted run resumes), else a fresh one. A folder fitted with other settings is an
    HTError naming what differs, unless `overwrite`: then its summary and intervention files go."""
    check_output_dir(folder, "--out")
    fresh = {"method": method, "model": model, "settings": settings, "concepts": {}}
    path = folder / SUMMARY
    if not path.exists():
        return fresh
    saved = read_json(path)
    differ = settings_differences(saved if isinstance(saved, dict) else {}, model, settings)
    if not differ:
        return saved
    if not overwrite:
        raise HTError(f"{folder} holds {method} fits made with other settings ({', '.join(differ)}); "
                      "choose another --out, rerun with the saved settings, or pass --overwrite to replace them")
    for old in folder.glob("*.safetensors"):
        old.unlink()
    path.unlink()
    return fresh


def fit_baselines(
    method: str,
    frozen: Frozen,
    dataset: ActivationDataset,
    names: Sequence[str],
    *,
    samples: int | None = None,
    lineas: LineasConfig | None = None,
    incremental: bool = False,
    refine: int | None = None,
    predictor: Predictor | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> MethodResult:
    """Fit `method` on each concept of `names` and score it on the concept's evaluation samples.

    `samples`: fitting samples per concept (None: all the dataset has). `refine` N (LinEAS,
    with `predictor`): N steps from the hypernetwork's prediction instead of `lineas.steps`
    from the identity, saved as method `lineas-refine<N>`; fit seconds include the prediction.
    With `out` (a baselines folder, e.g. runs/<model>/baselines), files go to `out/<method>/`:
    one intervention file per concept and summary.json, both written after every concept. A
    folder fitted with other settings is refused unless `overwrite` (see `prepare_folder`).
    """
    from htcli.data.concepts import load_library

    if (refine is None) != (predictor is None):
        raise HTError("--refine needs a hypernetwork to start from, and a hypernetwork is only used with --refine")
    digest = predictor.digest if predictor is not None else None
    settings = fit_settings(method, dataset, samples, lineas, incremental, refine, digest)
    n = settings["samples"]
    lineas = (lineas or LineasConfig()) if method == "lineas" else None
    label = method if refine is None else refined_method(refine)
    library = load_library() if refine is not None else None  # concept phrases for the hypernetwork
    folder = out / label if out is not None else None
    summary = (prepare_folder(folder, label, frozen.spec.id, settings, overwrite) if folder is not None
               else {"concepts": {}})
    fit_inputs = dataset.source_inputs("fit")[:n]
    source_fit = {k: v[:n] for k, v in dataset.source_activations("fit").items()}  # (N, D) per layer
    eval_inputs, source_eval = dataset.source_inputs("eval"), dataset.source_activations("eval")
    result = MethodResult(label, [], [])
    for index, name in enumerate(names):
        row = summary["concepts"].get(name)
        if row is None or folder is None or not (folder / row["file"]).exists():
            if predictor is None:
                target_fit = {k: v[0, :n] for k, v in dataset.targets([name], "fit").items()}  # (N, D)
                maps, seconds, info = fit_method(method, frozen, fit_inputs, source_fit, target_fit, lineas, incremental)
            else:  # LinEAS from HyperTransport's prediction, on the same fitting samples
                maps, info = refine_maps(predictor, frozen, library.resolve(name), dataset, refine, lineas=lineas,
                                         samples=n, evaluate=False)
                seconds = info["seconds"]
            target_eval = {k: v[0] for k, v in dataset.targets([name], "eval").items()}  # (M, D)
            overall, per_layer = residuals(frozen, eval_inputs, source_eval, target_eval, maps)
            intervention = Intervention(maps, frozen.spec.id, label, name, dataset.settings.encoder,
                                        info=info | {"fit_seconds": seconds, "samples": n, "residual": overall})
            row = {"file": f"{slugify(name)}.safetensors", "split": dataset.split_of(name), "fit_seconds": seconds,
                   "residual": overall, "residual_per_layer": per_layer, "support": intervention.support(),
                   **{k: v for k, v in info.items() if k.startswith("loss")}}
            if "loss_first" in info:  # an optimised fit whose loss rose: a warning, not an error
                row["diverged"] = bool(info["loss_last"] > info["loss_first"])
            if folder is not None:  # the file first: a summary row always has its file
                intervention.save(folder / row["file"])
                summary["concepts"][name] = row
                write_json(folder / SUMMARY, summary)
        result.residuals.append(row["residual"])
        result.seconds.append(row["fit_seconds"])
        if progress:
            progress(index + 1, len(names), name)
    return result


@dataclass
class BaselineRun:
    """What `ht fit-linear-baselines` reports: one summary row per concept."""

    method: str
    model: str
    folder: Path
    rows: dict[str, dict]

    @property
    def mean_residual(self) -> float | None:
        """Mean held-out residual ratio over the concepts whose residual is finite (None: none is)."""
        finite = [r["residual"] for r in self.rows.values() if r["residual"] is not None and math.isfinite(r["residual"])]
        return statistics.fmean(finite) if finite else None

    @property
    def median_fit_seconds(self) -> float:
        return statistics.median(r["fit_seconds"] for r in self.rows.values()) if self.rows else 0.0

    @property
    def diverged(self) -> list[str]:
        """Concepts whose optimised fit ended with a higher loss than it started with."""
        return [name for name, row in self.rows.items() if row.get("diverged")]

    def diverged_warning(self) -> str | None:
        """One line naming the concepts whose loss rose during the fit, with what to do; None if none."""
        diverged = self.diverged
        if not diverged:
            return None
        shown = ", ".join(diverged[:5]) + (f" and {len(diverged) - 5} more" if len(diverged) > 5 else "")
        first = self.rows[diverged[0]]
        return (f"the {self.method} loss rose during the fit (diverged) on {len(diverged)} of {len(self.rows)} concepts: "
                f"{shown} ({first['loss_first']:.3g} -> {first['loss_last']:.3g} on the first); "
                "refit with a lower --lr and --overwrite")


def run_baselines(
    method: str,
    dataset: ActivationDataset,
    *,
    names: Sequence[str] = (),
    split: str = "test",
    samples: int | None = None,
    lineas: LineasConfig | None = None,
    incremental: bool = False,
    refine: int | None = None,
    hyper: Path | None = None,
    out: Path | None = None,
    device: str | None = None,
    dtype: str = "auto",
    grad_checkpointing: bool = False,
    model_path: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> BaselineRun:
    """Load the dataset's denoiser and fit `method` on the named concepts (else the split's),
    writing to `out/<method>/` (default runs/<model>/baselines/<method>). `dtype`: what the
    denoiser computes in (`htcli.core.precision`: auto = bfloat16 on CUDA, float32 on CPU);
    `grad_checkpointing` recomputes its blocks in backward (LinEAS: less memory); `model_path`:
    the local pipeline directory the model generates from (`load_denoiser`). `refine` N:
    LinEAS for N steps from the predictions of the hypernetwork `hyper` (default
    runs/<model>/hyper), in `out/lineas-refine<N>/`."""
    from htcli.core.files import file_digest
    from htcli.core.runtime import run_path
    from htcli.methods.predict import resolve_checkpoint

    # Every check before the model loads: method, concepts, samples, the hypernetwork, the
    # output folder and the settings of what it already holds.
    if hyper is not None and refine is None:
        raise HTError("--hyper is only used with --refine (LinEAS from the hypernetwork's prediction)")
    spec = dataset.spec()
    checkpoint = resolve_checkpoint(hyper, spec.id) if refine is not None else None
    digest = file_digest(checkpoint) if checkpoint is not None else None
    settings = fit_settings(method, dataset, samples, lineas, incremental, refine, digest)
    chosen = dataset.select(names, split)
    label = method if refine is None else refined_method(refine)
    out = check_output_dir(Path(out) if out is not None else run_path(spec.id, "baselines"))
    prepare_folder(out / label, label, spec.id, settings, overwrite)
    frozen = Frozen.load(spec, dataset.settings.layers, device, dtype, grad_checkpointing, model_path)
    predictor = Predictor.load(checkpoint, model=spec.id, device=frozen.model.device) if checkpoint else None
    fit_baselines(method, frozen, dataset, chosen, samples=samples, lineas=lineas, incremental=incremental,
                  refine=refine, predictor=predictor, out=out, overwrite=overwrite, progress=progress)
    summary = read_json(out / label / SUMMARY)
    return BaselineRun(label, spec.id, out / label, {name: summary["concepts"][name] for name in chosen})
