"""`ht models` and `ht plan`: what can be steered, and what a run would cost."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from htcli.cli.app import app
from htcli.cli.options import (
    BUILD_EVAL_SAMPLES,
    BUILD_SAMPLES,
    CONCEPTS_PER_STEP,
    BuildSamplesOption,
    EvalSamplesOption,
    JsonOption,
    LayersOption,
    ModelOption,
)
from htcli.cli.output import console, print_table
from htcli.core.files import dumps_json
from htcli.models import get_model, list_models

if TYPE_CHECKING:
    pass


@app.command("models")
def models_command(as_json: JsonOption = False) -> None:
    """List the model specs.

    Example: ht models
    """
    specs = list_models()
    if as_json:
        typer.echo(dumps_json([spec.record() for spec in specs]))
        return
    table = Table(title="Model specs")
    for column in ("id", "timesteps", "px", "description"):
        table.add_column(column, no_wrap=column != "description")
    for s in specs:
        table.add_row(s.id, ",".join(map(str, s.timesteps)), str(s.resolution), s.description)
    print_table(table)


@app.command("plan")
def plan_command(
    model: ModelOption = None,
    layers: LayersOption = None,
    samples: BuildSamplesOption = BUILD_SAMPLES,
    eval_samples: EvalSamplesOption = BUILD_EVAL_SAMPLES,
    concepts_per_step: Annotated[int, typer.Option(help="Concepts per training step (as train-hyper).")] = CONCEPTS_PER_STEP,
    as_json: JsonOption = False,
) -> None:
    """Show hooked layers, neurons, hypernetwork size, disk and GPU memory, with no download.

    Example: ht plan --model pixart --layers 'transformer_blocks.*.norm2'
    """
    from htcli.models.memory import plan_report
    from htcli.models.plan import human_bytes, human_count

    plan = plan_report(model, layers, samples, eval_samples, concepts_per_step)
    spec = get_model(plan["model"])
    if as_json:
        typer.echo(dumps_json(plan))
        return
    table = Table(title=f"{spec.id}: hooked modules")
    for column in ("module", "neurons", "tokens/sample"):
        table.add_column(column, justify="right" if column != "module" else "left")
    for layer in plan["layers"]:
        table.add_row(layer["name"], str(layer["width"]), str(layer["tokens"]))
    print_table(table)
    console.print(f"layers: {len(plan['layers'])}   neurons: {plan['neurons']:,}")
    console.print(f"hypernetwork output size: {plan['hyper_outputs']:,} (omega - 1 and beta per neuron)")
    console.print(f"denoiser: {human_count(plan['denoiser_params'])} parameters, {human_bytes(plan['weights_bytes'])} "
                  f"in {spec.dtype}")
    console.print(f"dataset per concept ({samples} fit + {eval_samples} eval samples, {plan['dataset_dtype']}): "
                  f"{human_bytes(plan['dataset_bytes_per_concept'])}")
    console.print(
        f"training memory, {concepts_per_step} concepts x {samples} samples, no checkpointing "
        f"(estimate): {human_bytes(plan['training_bytes'])} ({human_bytes(plan['activation_bytes_per_sample'])} of "
        "activations per sample)"
    )
    batches = plan["batches"]
    console.print(
        f"batches on {batches['device']} ({human_bytes(batches['free_bytes'])} free, {batches['dtype']}): "
        f"micro-batch {batches['micro_batch']} "
        f"({batches['micro_batch_grad_checkpointing']} with --grad-checkpointing), "
        f"forward batch {batches['forward_batch']}"
    )
