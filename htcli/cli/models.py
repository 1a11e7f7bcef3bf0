"""`ht models` and `ht plan`: what can be steered, and what a run would cost."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from htcli.cli import app
from htcli.cli.options import JsonOption, ModelOption
from htcli.models import default_model_name, get_model, list_models

console = Console()



@app.command("models")
def models_command(as_json: JsonOption = False) -> None:
    """List the model specs.

    Example: ht models
    """
    specs = list_models()
    if as_json:
        rows = [
            {
                "id": s.id,
                "description": s.description,
                "family": s.family,
                "offline": s.offline,
                "base_repo": s.base_repo,
                "weights": list(s.weights),
                "hook_patterns": list(s.hook_patterns),
                "timesteps": list(s.timesteps),
                "guidance_scale": s.guidance_scale,
                "resolution": s.resolution,
                "dtype": s.dtype,
                "licence": s.licence,
            }
            for s in specs
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Model specs")
    for column in ("id", "timesteps", "px", "description"):
        table.add_column(column, no_wrap=column != "description")
    for s in specs:
        table.add_row(s.id, ",".join(map(str, s.timesteps)), str(s.resolution), s.description)
    console.print(table)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@app.command("plan")
def plan_command(
    model: ModelOption = None,
    layers: Annotated[
        Optional[list[str]],
        typer.Option("--layers", "-l", help="Module-name pattern to hook (glob, or regex as 're:...'); repeatable. Default: the spec's."),
    ] = None,
    samples: Annotated[int, typer.Option(help="Fitting samples per concept.")] = 32,
    eval_samples: Annotated[int, typer.Option(help="Evaluation samples per concept.")] = 128,
    concepts_per_step: Annotated[int, typer.Option(help="Concepts per training step.")] = 4,
    as_json: JsonOption = False,
) -> None:
    """Show hooked layers, neurons, hypernetwork size, disk and GPU memory, with no download.

    Example: ht plan --model pixart --layers 'transformer_blocks.*.norm2'
    """
    from htcli.models.plan import make_plan

    spec = get_model(model or default_model_name())
    plan = make_plan(spec, layers)
    per_concept = plan.dataset_bytes_per_concept(samples, eval_samples)
    train = plan.training_bytes(concepts_per_step, samples)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "model": spec.id,
                    "layers": [vars(layer) for layer in plan.layers],
                    "neurons": plan.neurons,
                    "hyper_outputs": plan.hyper_outputs,
                    "denoiser_params": plan.denoiser_params,
                    "weights_bytes": plan.weights_bytes,
                    "activation_bytes_per_sample": plan.activation_bytes_per_sample,
                    "dataset_bytes_per_concept": per_concept,
                    "training_bytes": train,
                },
                indent=2,
            )
        )
        return
    table = Table(title=f"{spec.id}: hooked modules")
    for column in ("module", "neurons", "tokens/sample"):
        table.add_column(column, justify="right" if column != "module" else "left")
    for layer in plan.layers:
        table.add_row(layer.name, str(layer.width), str(layer.tokens))
    console.print(table)
    console.print(f"layers: {len(plan.layers)}   neurons: {plan.neurons:,}")
    console.print(f"hypernetwork output size: {plan.hyper_outputs:,} (omega - 1 and beta per neuron)")
    console.print(f"denoiser: {plan.denoiser_params / 1e6:,.0f}M parameters, {_gib(plan.weights_bytes)} in {spec.dtype}")
    console.print(
        f"dataset per concept ({samples} fit + {eval_samples} eval samples, float16): {_gib(per_concept)}"
    )
    console.print(
        f"training memory, {concepts_per_step} concepts x {samples} samples, no checkpointing "
        f"(estimate): {_gib(train)} ({_gib(plan.activation_bytes_per_sample)} of activations per sample)"
    )
