"""`ht fit-linear-baselines` and `ht inspect`: per-concept interventions and their files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from htcli.cli import app
from htcli.cli.options import DataOption, DeviceOption, JsonOption, ModelOption, SeedOption
from htcli.errors import HTError

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)



@app.command("fit-linear-baselines")
def fit_baselines_command(
    method: Annotated[str, typer.Option("--method", help="linear-act, lineas or mean-shift.")],
    data: DataOption = None,
    model: ModelOption = None,
    concept: Annotated[Optional[list[str]], typer.Option("--concept", "-c", help="Fit this dataset concept; repeatable.")] = None,
    split: Annotated[str, typer.Option(help="Concepts to fit when no --concept: train, test or all.")] = "test",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory. Default: runs/<model>/baselines.")] = None,
    samples: Annotated[Optional[int], typer.Option(help="Fitting samples per concept (default: all in the dataset).")] = None,
    steps: Annotated[int, typer.Option(help="LinEAS optimisation steps.")] = 1000,
    lr: Annotated[float, typer.Option(help="LinEAS learning rate.")] = 1e-2,
    optimizer: Annotated[str, typer.Option(help="LinEAS optimiser: adam or sgd.")] = "adam",
    l1: Annotated[float, typer.Option(help="LinEAS sparsity: L1 weight per neuron.")] = 0.0,
    group: Annotated[float, typer.Option(help="LinEAS sparsity: group-lasso weight per layer.")] = 0.0,
    incremental: Annotated[bool, typer.Option(help="Linear-AcT: fit layer l with layers < l already steered.")] = False,
    micro_batch: Annotated[int, typer.Option(help="LinEAS: samples per backward pass (exact two-pass gradient). 0: all at once.")] = 0,
    seed: SeedOption = 0,
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Fit a per-concept baseline and write one intervention file per concept.

    Residual ratios W2(steered, target) / W2(source, target) are measured on the dataset's
    evaluation samples (other prompts and seeds than the fit): 1 = no change, 0 = perfect.

    Example: ht fit-linear-baselines --model tiny --method lineas --steps 300
    """
    from htcli.core.files import read_json, write_json
    from htcli.core.hooks import resolve_layers
    from htcli.core.interventions import Intervention
    from htcli.core.runtime import resolve_device, run_path
    from htcli.data.concepts import slugify
    from htcli.data.dataset import ActivationDataset, resolve_dataset
    from htcli.data.forward import Frozen
    from htcli.evaluation.residuals import residuals
    from htcli.methods.baselines import LineasConfig, fit_method
    from htcli.models import default_model_name, get_model, load_denoiser

    lineas = (LineasConfig(steps=steps, lr=lr, optimizer=optimizer, l1=l1, group=group, seed=seed, micro_batch=micro_batch)
              if method == "lineas" else None)
    dataset = ActivationDataset(resolve_dataset(data, model or default_model_name()))
    spec = get_model(dataset.settings.model)
    if split not in ("train", "test", "all"):
        raise HTError(f"--split must be train, test or all, got {split!r}")
    names = list(concept) if concept else dataset.names(None if split == "all" else split)
    if not names:
        raise HTError(f"no concepts of split {split!r} in {dataset.root}")
    n_fit = len(dataset.settings.fit_seeds)
    samples = samples or n_fit
    if not 2 <= samples <= n_fit:
        raise HTError(f"--samples must be between 2 and the dataset's {n_fit}, got {samples}")
    torch_device = resolve_device(device)
    denoiser = load_denoiser(spec, torch_device)
    frozen = Frozen(spec, denoiser, resolve_layers(denoiser, dataset.settings.layers))
    fit_inputs = {k: v[:samples] for k, v in dataset.source_inputs("fit").items()}
    source_fit = {k: v[:samples] for k, v in dataset.source_activations("fit").items()}
    eval_inputs, source_eval = dataset.source_inputs("eval"), dataset.source_activations("eval")
    folder = (out or run_path(spec.id, "baselines")) / method
    summary_path = folder / "summary.json"
    summary = read_json(summary_path) if summary_path.exists() else {"method": method, "model": spec.id, "concepts": {}}

    with Progress(
        TextColumn(f"[bold]{method}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("{task.description}"), console=err,
    ) as bar:
        task = bar.add_task("", total=len(names))
        for name in names:
            bar.update(task, description=name)
            target_fit = {k: v[0, :samples] for k, v in dataset.targets([name], "fit").items()}
            maps, seconds, info = fit_method(method, frozen, fit_inputs, source_fit, target_fit, lineas, incremental)
            target_eval = {k: v[0] for k, v in dataset.targets([name], "eval").items()}
            overall, per_layer = residuals(frozen, eval_inputs, source_eval, target_eval, maps)
            intervention = Intervention(maps, spec.id, method, name, dataset.settings.encoder,
                                        info=info | {"fit_seconds": seconds, "samples": samples, "residual": overall})
            path = folder / f"{slugify(name)}.safetensors"
            intervention.save(path)
            summary["concepts"][name] = {
                "file": path.name,
                "split": next(c["split"] for c in dataset.manifest["concepts"] if c["name"] == name),
                "fit_seconds": seconds,
                "residual": overall,
                "residual_per_layer": per_layer,
                "support": intervention.support(),
                **{k: v for k, v in info.items() if k.startswith("loss")},
            }
            write_json(summary_path, summary)  # after every concept: an interrupted run keeps its work
            bar.advance(task)
    rows = {n: summary["concepts"][n] for n in names}
    if as_json:
        typer.echo(json.dumps({"method": method, "model": spec.id, "out": str(folder), "concepts": rows}, indent=2))
        return
    table = Table(title=f"{method} on {spec.id}: held-out residual ratio (evaluation samples)")
    for column in ("concept", "split", "fit s", "residual", "support"):
        table.add_column(column, justify="left" if column in ("concept", "split") else "right")
    for name, row in rows.items():
        table.add_row(name, row["split"], f"{row['fit_seconds']:.3f}", f"{row['residual']:.3f}", f"{row['support']:.2f}")
    console.print(table)
    residuals_ = [r["residual"] for r in rows.values()]
    console.print(
        f"{len(rows)} concepts: mean residual {statistics.fmean(residuals_):.3f}, "
        f"median fit {statistics.median(r['fit_seconds'] for r in rows.values()):.3f} s; files in {folder}"
    )


@app.command("inspect")
def inspect_command(
    file: Annotated[Path, typer.Argument(help="Intervention file (.safetensors).")],
    as_json: JsonOption = False,
) -> None:
    """Show an intervention file's metadata and per-layer statistics.

    Example: ht inspect runs/tiny/baselines/lineas/art-deco.safetensors
    """
    from htcli.core.interventions import layer_stats, load_intervention

    intervention = load_intervention(file)
    stats = layer_stats(intervention)
    meta = {
        "model": intervention.model,
        "method": intervention.method,
        "concept": intervention.concept,
        "encoder": intervention.encoder,
        "strength": intervention.strength,
        "layers": len(intervention.maps),
        "neurons": sum(intervention.widths.values()),
        "support": intervention.support(),
        "info": intervention.info,
    }
    if as_json:
        typer.echo(json.dumps({**meta, "layer_stats": stats}, indent=2))
        return
    for key, value in meta.items():
        console.print(f"{key + ':':10} {value}")
    table = Table(title="per-layer statistics")
    columns = ("layer", "dim", "omega_mean", "omega_std", "omega_min", "omega_max", "beta_mean", "beta_std", "support")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="left" if column == "layer" else "right")
    for row in stats:
        table.add_row(*(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    console.print(table)
