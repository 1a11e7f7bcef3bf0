"""`ht build-dataset`: cache source inputs and pooled target activations per concept."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from htcli.cli.app import app
from htcli.cli.options import (
    BUILD_EVAL_SAMPLES,
    BUILD_SAMPLES,
    BuildSamplesOption,
    ConceptDirsOption,
    DatasetSplit,
    DeviceOption,
    EvalSamplesOption,
    ExtraConceptsOption,
    GuidanceOption,
    LayersOption,
    LimitConceptsOption,
    ModelOption,
    ModelPathOption,
    RandomWeightsOption,
    ResolutionOption,
    SeedOption,
    SplitOption,
    StepsOption,
)
from htcli.cli.output import console, steps
from htcli.core.runtime import is_main_process
from htcli.data.build import DatasetRequest
from htcli.data.concepts import read_concept_names


@app.command("build-dataset")
def build_dataset_command(
    model: ModelOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Dataset directory. Default: runs/<model>/data.")] = None,
    split: SplitOption = DatasetSplit.all,
    concept_dirs: ConceptDirsOption = None,
    concept: Annotated[
        Optional[list[str]],
        typer.Option("--concept", "-c", help="Build only this concept (library name or any free text); repeatable."),
    ] = None,
    limit_concepts: LimitConceptsOption = None,
    extra_concepts: ExtraConceptsOption = None,
    samples: BuildSamplesOption = BUILD_SAMPLES,
    eval_samples: EvalSamplesOption = BUILD_EVAL_SAMPLES,
    layers: LayersOption = None,
    seed: SeedOption = DatasetRequest.seed,
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = DatasetRequest.batch_size,
    encoder: Annotated[Optional[str], typer.Option(help="Concept encoder id. Default: the spec's (tiny: minilm).")] = None,
    model_path: ModelPathOption = None,
    random_weights: RandomWeightsOption = False,
    resolution: ResolutionOption = None,
    denoising_steps: StepsOption = None,
    guidance: GuidanceOption = None,
    device: DeviceOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a dataset built with other settings.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and disk estimate; load and write nothing.")] = False,
) -> None:
    """Cache source inputs and pooled target activations for the concepts.

    Resumable: rerun the same command after an interruption. Under `torchrun --nproc_per_node K
    -m htcli build-dataset ...` concepts are sharded across ranks.

    Example: ht build-dataset --model tiny --limit-concepts 40
    """
    from htcli.data.build import build, estimate
    from htcli.models import default_model_name
    from htcli.models.folder import with_settings
    from htcli.models.plan import human_bytes

    extra = read_concept_names(extra_concepts) if extra_concepts else ()
    model = with_settings(model or default_model_name(), steps=denoising_steps, guidance=guidance)
    request = DatasetRequest(model, out, split.value, concept or (), extra, concept_dirs or (),
                             limit_concepts, samples, eval_samples, layers, seed, batch_size, encoder, resolution)
    if dry_run:
        plan = estimate(request)
        console.print(f"model {plan.model}: {plan.layers} layers, {plan.neurons:,} neurons")
        console.print(f"concepts: {plan.concepts} (+ the source), {plan.samples} fit + {plan.eval_samples} eval samples each")
        console.print(f"disk estimate: {human_bytes(plan.bytes_on_disk)} of activations in {plan.out}")
        return
    with steps("build-dataset", enabled=is_main_process()) as bar:  # one bar under torchrun
        summary = build(request, model_path=model_path, device=device, overwrite=overwrite,
                        progress=lambda done, total, name: bar.update(done, total, name))
    if summary is not None:  # rank 0 reports for all ranks
        console.print(
            f"[green]dataset[/] {summary.out}: {summary.concepts} concepts ({summary.built} built, {summary.skipped} already there), "
            f"{summary.samples} fit + {summary.eval_samples} eval samples, {summary.layers} layers "
            f"({summary.neurons:,} neurons), {human_bytes(summary.bytes_on_disk)} on disk, "
            f"{summary.seconds_per_concept:.2f} s per concept"
        )
