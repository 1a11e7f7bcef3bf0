"""`ht fit-linear-baselines` and `ht inspect`: per-concept interventions and their files."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from htcli.cli.app import app
from htcli.cli.options import (
    DataOption,
    DatasetSplit,
    DeviceOption,
    DtypeOption,
    GradCheckpointingOption,
    HyperOption,
    JsonOption,
    MicroBatchOption,
    ModelOption,
    ModelPathOption,
    RandomWeightsOption,
    RefineOption,
    SamplesOption,
    SeedOption,
    SplitOption,
    TrainingDtype,
)
from htcli.cli.output import console, print_table, steps, warn
from htcli.core.files import dumps_json
from htcli.methods.baselines import METHOD_FITS, LineasConfig

# The choices of --method and --optimizer: help lists them, a typo is a usage error.
BaselineMethod = Enum("BaselineMethod", {name: name for name in sorted(METHOD_FITS)}, type=str)


class Optimizer(str, Enum):
    adam = "adam"
    sgd = "sgd"


DEFAULT_OPTIMIZER = Optimizer(LineasConfig.optimizer)


@app.command("fit-linear-baselines")
def fit_baselines_command(
    method: Annotated[BaselineMethod, typer.Option("--method", help="Baseline to fit per concept.")],
    data: DataOption = None,
    model: ModelOption = None,
    concept: Annotated[Optional[list[str]], typer.Option("--concept", "-c", help="Fit this dataset concept; repeatable.")] = None,
    split: SplitOption = DatasetSplit.test,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory. Default: runs/<model>/baselines.")] = None,
    samples: SamplesOption = None,
    steps_: Annotated[
        Optional[int], typer.Option("--steps", help=f"LinEAS optimisation steps. Default: {LineasConfig.steps}.")
    ] = None,
    refine: RefineOption = None,
    hyper: HyperOption = None,
    lr: Annotated[float, typer.Option(help="LinEAS learning rate.")] = LineasConfig.lr,
    optimizer: Annotated[Optimizer, typer.Option(help="LinEAS optimiser.")] = DEFAULT_OPTIMIZER,
    l1: Annotated[float, typer.Option(help="LinEAS sparsity: L1 weight per neuron.")] = LineasConfig.l1,
    group: Annotated[float, typer.Option(help="LinEAS sparsity: group-lasso weight per layer.")] = LineasConfig.group,
    incremental: Annotated[
        bool, typer.Option("--incremental", help="Linear-AcT: fit layer l with layers < l already steered.")
    ] = False,
    micro_batch: MicroBatchOption = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the method's fits in --out made with other settings.")
    ] = False,
    seed: SeedOption = LineasConfig.seed,
    dtype: DtypeOption = TrainingDtype.auto,
    grad_checkpointing: GradCheckpointingOption = False,
    model_path: ModelPathOption = None,
    random_weights: RandomWeightsOption = False,
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Fit a per-concept baseline and write one intervention file per concept.

    Residual ratios W2(steered, target) / W2(source, target) are measured on the dataset's
    evaluation samples (other prompts and seeds than the fit): 1 = no change, 0 = perfect.
    Resumable: a rerun with the same settings skips the concepts already fitted; fits made
    with other settings are refused unless --overwrite, which removes them first.

    Example: ht fit-linear-baselines --model tiny --method lineas --steps 300
    """
    from htcli.data.dataset import open_dataset
    from htcli.errors import HTError
    from htcli.methods.fitting import run_baselines

    name = method.value
    if refine is not None and steps_ is not None:
        raise HTError("--refine N runs N LinEAS steps from the hypernetwork's prediction; drop --steps")
    lineas = (LineasConfig(steps=LineasConfig.steps if steps_ is None else steps_, lr=lr, optimizer=optimizer.value,
                           l1=l1, group=group, seed=seed, micro_batch=micro_batch) if name == "lineas" else None)
    with steps(name) as bar:
        run = run_baselines(name, open_dataset(data, model), names=concept or (), split=split.value, samples=samples,
                            lineas=lineas, incremental=incremental, refine=refine, hyper=hyper, out=out,
                            overwrite=overwrite, device=device, dtype=dtype.value, grad_checkpointing=grad_checkpointing,
                            model_path=model_path, progress=lambda done, total, text: bar.update(done, total, text))
    if (diverged := run.diverged_warning()) is not None:
        warn(diverged)
    if as_json:
        typer.echo(dumps_json({"method": run.method, "model": run.model, "out": str(run.folder), "concepts": run.rows}))
        return
    table = Table(title=f"{run.method} on {run.model}: held-out residual ratio (evaluation samples)")
    for column in ("concept", "split", "fit s", "residual", "support"):
        table.add_column(column, justify="left" if column in ("concept", "split") else "right")
    for concept_name, row in run.rows.items():
        residual = "-" if row["residual"] is None else f"{row['residual']:.3f}"
        table.add_row(concept_name, row["split"], f"{row['fit_seconds']:.3f}", residual, f"{row['support']:.2f}")
    print_table(table)
    mean = "-" if run.mean_residual is None else f"{run.mean_residual:.3f}"
    console.print(f"{len(run.rows)} concepts: mean residual {mean}, median fit {run.median_fit_seconds:.3f} s; "
                  f"files in {run.folder}")


@app.command("inspect")
def inspect_command(
    file: Annotated[str, typer.Argument(help="Intervention file (.safetensors), or a Hub reference "
                                             "USER/REPO[/FILE.safetensors].")],
    as_json: JsonOption = False,
) -> None:
    """Show an intervention file's metadata and per-layer statistics.

    Example: ht inspect runs/tiny/baselines/lineas/art-deco.safetensors
    """
    from htcli.models.interventions import Intervention, layer_stats

    intervention = Intervention.load(file)
    meta, stats = intervention.describe(), layer_stats(intervention)
    if as_json:
        typer.echo(dumps_json({**meta, "layer_stats": stats}))
        return
    width = max(len(key) for key in meta) + 2
    for key, value in meta.items():  # nested fit settings as JSON, not a Python repr
        console.print(f"{key + ':':{width}} {dumps_json(value) if isinstance(value, dict) else value}", markup=False)
    table = Table(title="per-layer statistics")
    columns = ("layer", "dim", "omega_mean", "omega_std", "omega_min", "omega_max", "beta_mean", "beta_std", "support")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="left" if column == "layer" else "right")
    for row in stats:
        table.add_row(*(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    print_table(table)
