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
    DeviceOption,
    DtypeOption,
    EvalSamplesOption,
    GuidanceOption,
    JsonOption,
    LayersOption,
    MicroBatchOption,
    ModelOption,
    RandomWeightsOption,
    ResolutionOption,
    StepsOption,
    TrainingDtype,
)
from htcli.cli.output import console, note, print_table, steps
from htcli.core.files import dumps_json
from htcli.models import default_model_name, get_model, list_models

if TYPE_CHECKING:
    from htcli.methods.measure import Measurement


def _schedule(timesteps: tuple[int, ...]) -> str:
    """A schedule in one short cell: every timestep up to 4 steps, else the count and the ends."""
    if len(timesteps) <= 4:
        return ",".join(map(str, timesteps))
    return f"{len(timesteps)} steps: {timesteps[0]}..{timesteps[-1]}"


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
        table.add_row(s.id, _schedule(s.timesteps), str(s.resolution), s.description)
    print_table(table)


@app.command("plan")
def plan_command(
    model: ModelOption = None,
    layers: LayersOption = None,
    samples: BuildSamplesOption = BUILD_SAMPLES,
    eval_samples: EvalSamplesOption = BUILD_EVAL_SAMPLES,
    concepts_per_step: Annotated[int, typer.Option(help="Concepts per training step (as train-hyper).")] = CONCEPTS_PER_STEP,
    resolution: ResolutionOption = None,
    denoising_steps: StepsOption = None,
    guidance: GuidanceOption = None,
    measure: Annotated[
        bool, typer.Option("--measure", help="Also run capture, a LinEAS step and a training step (with and without "
                           "--grad-checkpointing) on the model's architecture with random weights (no download), "
                           "each in a fresh process, and print their peak memory and seconds per sample beside the "
                           "estimates. Use small --samples and --concepts-per-step on a CPU.")
    ] = False,
    device: DeviceOption = None,
    dtype: DtypeOption = TrainingDtype.auto,
    micro_batch: MicroBatchOption = None,
    random_weights: RandomWeightsOption = False,
    as_json: JsonOption = False,
) -> None:
    """Show hooked layers, neurons, hypernetwork size, disk and GPU memory, with no download.

    Example: ht plan --model pixart --layers 'transformer_blocks.*.norm2'
    Measured: ht plan --model pixart --measure --resolution 256 --samples 4 --concepts-per-step 2
    """
    from htcli.methods.measure import MeasureRequest, plan
    from htcli.models.folder import with_settings

    if denoising_steps is not None or guidance is not None:
        model = with_settings(model or default_model_name(), steps=denoising_steps, guidance=guidance)
    request = MeasureRequest(model, resolution, device, dtype.value, samples, concepts_per_step, micro_batch,
                             layers) if measure else None
    with steps("measure", enabled=measure) as bar:
        estimates, measured = plan(model, layers, samples, eval_samples, concepts_per_step, resolution, request,
                                   progress=lambda done, total, what: bar.update(done, total, what))
    if as_json:
        typer.echo(dumps_json(estimates | ({"measured": measured.record()} if measured else {})))
        return
    _print_plan(estimates)
    if measured is not None:
        _print_measurement(measured)


def _print_plan(plan: dict) -> None:
    from htcli.models.plan import human_bytes, human_count

    table = Table(title=f"{plan['model']}: hooked modules ({plan['layers_from']})")
    for column in ("module", "class", "neurons", "tokens/sample", "output per sample"):
        table.add_column(column, justify="right" if column in ("neurons", "tokens/sample") else "left")
    for layer in plan["layers"]:
        table.add_row(layer["name"], layer["kind"], str(layer["width"]), str(layer["tokens"]), layer["output"])
    print_table(table)
    console.print(f"layers: {len(plan['layers'])}   neurons: {plan['neurons']:,}   resolution: {plan['resolution']} px")
    console.print(f"hypernetwork output size: {plan['hyper_outputs']:,} (omega - 1 and beta per neuron)")
    console.print(f"denoiser: {human_count(plan['denoiser_params'])} parameters, {human_bytes(plan['weights_bytes'])} "
                  f"in {get_model(plan['model']).dtype}")
    console.print(f"dataset per concept ({plan['samples']} fit + {plan['eval_samples']} eval samples, "
                  f"{plan['dataset_dtype']}): {human_bytes(plan['dataset_bytes_per_concept'])}")
    console.print(
        f"training memory, {plan['concepts_per_step']} concepts x {plan['samples']} samples, no checkpointing "
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


def _print_measurement(measured: Measurement) -> None:
    from htcli.models.plan import human_bytes

    peak = "peak allocated" if measured.device.startswith("cuda") else "peak RSS"
    table = Table(title=f"{measured.model} measured on {measured.device}, {measured.resolution} px, random weights "
                        f"(N = {measured.samples} samples per concept, K = {measured.concepts_per_step} concepts per step)")
    for column in ("phase", "dtype", "samples", "batch", "s/sample", peak, "above imports", "estimate", "loading"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for phase in measured.phases:
        table.add_row(phase.name, phase.dtype, str(phase.samples), str(phase.batch), f"{phase.seconds_per_sample:.3g}",
                      human_bytes(phase.peak_bytes), human_bytes(phase.peak_bytes - phase.base_bytes),
                      human_bytes(phase.estimate_bytes), human_bytes(phase.load_peak_bytes))
    print_table(table)
    console.print(f"{peak}: from the model loaded to the phase's end (the weights included); above imports: less the "
                  "process with torch and diffusers imported; loading: the process's peak while it loaded the model",
                  highlight=False, markup=False)
    if not measured.random_weights:
        return
    note("estimates count the denoiser's weights and one batch's activations (htcli.models.memory); capture also "
         "loads the text encoders and the VAE, which random weights keep shallow: the real T5-XXL encoder "
         "(4.8B parameters) adds about 8.9 GiB in 16 bits (pixart, flux-schnell), SDXL's two CLIP text encoders "
         "about 1.5 GiB")
