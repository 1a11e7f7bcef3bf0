"""`ht fit-linear-baselines` and `ht inspect`: per-concept interventions and their files."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from htcli.cli import app
from htcli.cli.hyper import SamplesOption
from htcli.cli.options import DataOption, DeviceOption, JsonOption, ModelOption, SeedOption
from htcli.cli.output import console, print_table, steps
from htcli.core.files import dumps_json


@app.command("fit-linear-baselines")
def fit_baselines_command(
    method: Annotated[str, typer.Option("--method", help="linear-act, lineas or mean-shift.")],
    data: DataOption = None,
    model: ModelOption = None,
    concept: Annotated[Optional[list[str]], typer.Option("--concept", "-c", help="Fit this dataset concept; repeatable.")] = None,
    split: Annotated[str, typer.Option(help="Concepts to fit when no --concept: train, test or all.")] = "test",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory. Default: runs/<model>/baselines.")] = None,
    samples: SamplesOption = None,
    steps_: Annotated[int, typer.Option("--steps", help="LinEAS optimisation steps.")] = 1000,
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
    Resumable: a rerun with the same settings skips the concepts already fitted.

    Example: ht fit-linear-baselines --model tiny --method lineas --steps 300
    """
    from htcli.data.dataset import open_dataset
    from htcli.methods.baselines import LineasConfig
    from htcli.methods.fitting import run_baselines

    lineas = (LineasConfig(steps=steps_, lr=lr, optimizer=optimizer, l1=l1, group=group, seed=seed, micro_batch=micro_batch)
              if method == "lineas" else None)
    with steps(method) as bar:
        run = run_baselines(method, open_dataset(data, model), names=concept or (), split=split, samples=samples,
                            lineas=lineas, incremental=incremental, out=out, device=device,
                            progress=lambda done, total, name: bar.update(done, total, name))
    if as_json:
        typer.echo(dumps_json({"method": run.method, "model": run.model, "out": str(run.folder), "concepts": run.rows}))
        return
    table = Table(title=f"{run.method} on {run.model}: held-out residual ratio (evaluation samples)")
    for column in ("concept", "split", "fit s", "residual", "support"):
        table.add_column(column, justify="left" if column in ("concept", "split") else "right")
    for name, row in run.rows.items():
        table.add_row(name, row["split"], f"{row['fit_seconds']:.3f}", f"{row['residual']:.3f}", f"{row['support']:.2f}")
    print_table(table)
    console.print(
        f"{len(run.rows)} concepts: mean residual {statistics.fmean(r['residual'] for r in run.rows.values()):.3f}, "
        f"median fit {statistics.median(r['fit_seconds'] for r in run.rows.values()):.3f} s; files in {run.folder}"
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
    meta, stats = intervention.describe(), layer_stats(intervention)
    if as_json:
        typer.echo(dumps_json({**meta, "layer_stats": stats}))
        return
    for key, value in meta.items():
        console.print(f"{key + ':':10} {value}", markup=False)
    table = Table(title="per-layer statistics")
    columns = ("layer", "dim", "omega_mean", "omega_std", "omega_min", "omega_max", "beta_mean", "beta_std", "support")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="left" if column == "layer" else "right")
    for row in stats:
        table.add_row(*(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    print_table(table)
