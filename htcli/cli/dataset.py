"""`ht build-dataset`: cache source inputs and pooled target activations per concept."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from htcli.cli import app
from htcli.cli.models import _gib
from htcli.cli.options import ConceptDirsOption, DeviceOption, ModelOption, SeedOption
from htcli.errors import HTError

console = Console(stderr=True, soft_wrap=True)



@app.command("build-dataset")
def build_dataset_command(
    model: ModelOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Dataset directory. Default: runs/<model>/data.")] = None,
    split: Annotated[str, typer.Option(help="Library concepts to build: train, test or all.")] = "all",
    concept_dirs: ConceptDirsOption = None,
    concept: Annotated[
        Optional[list[str]],
        typer.Option("--concept", "-c", help="Build only this concept (library name or any free text); repeatable."),
    ] = None,
    limit_concepts: Annotated[
        Optional[int], typer.Option(help="Build a seeded sample of this many concepts of the split.")
    ] = None,
    samples_per_concept: Annotated[int, typer.Option(help="Fitting samples per concept (N).")] = 32,
    eval_samples: Annotated[int, typer.Option(help="Evaluation samples per concept (other prompts and seeds).")] = 128,
    layers: Annotated[
        Optional[list[str]], typer.Option("--layers", "-l", help="Module-name pattern to hook; repeatable. Default: the spec's.")
    ] = None,
    seed: SeedOption = 0,
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 16,
    encoder: Annotated[Optional[str], typer.Option(help="Concept encoder id. Default: the spec's (tiny: minilm).")] = None,
    model_path: Annotated[Optional[str], typer.Option(help="Local pipeline directory instead of the Hub.")] = None,
    device: DeviceOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a dataset built with other settings.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the plan and disk estimate; load and write nothing.")] = False,
) -> None:
    """Cache source inputs and pooled target activations for the concepts.

    Resumable: rerun the same command after an interruption. Under `torchrun --nproc_per_node K
    -m htcli build-dataset ...` concepts are sharded across ranks.

    Example: ht build-dataset --model tiny --limit-concepts 40
    """
    from htcli.core.hooks import resolve_layers
    from htcli.core.runtime import close_distributed, init_distributed, resolve_device, run_path
    from htcli.data.concepts import load_library
    from htcli.data.dataset import Builder, build_dataset, check_existing, make_settings, select_concepts
    from htcli.methods.encoders import get_encoder
    from htcli.models import build_meta_denoiser, default_model_name, denoiser, get_model, load_pipeline

    spec = get_model(model or default_model_name())
    out = out or run_path(spec.id, "data")
    if out.exists() and not out.is_dir():
        raise HTError(f"--out {out} is a file, not a directory")
    library = load_library(concept_dirs or ())
    concepts = select_concepts(library, split, concept or (), limit_concepts, seed)
    meta_layers = resolve_layers(build_meta_denoiser(spec), layers or spec.hook_patterns)
    settings = make_settings(spec, library, meta_layers, samples_per_concept, eval_samples, seed, encoder, batch_size)
    if dry_run:
        from htcli.models.plan import make_plan

        plan = make_plan(spec, layers)
        per_concept = plan.dataset_bytes_per_concept(samples_per_concept, eval_samples)
        console.print(f"model {spec.id}: {len(plan.layers)} layers, {plan.neurons:,} neurons")
        console.print(f"concepts: {len(concepts)} (+ the source), {samples_per_concept} fit + {eval_samples} eval samples each")
        console.print(f"disk estimate: {_gib(per_concept * (len(concepts) + 1))} of activations in {out}")
        return
    distributed = init_distributed()
    try:
        import torch.distributed as dist

        rank = dist.get_rank() if distributed else 0
        if rank == 0:
            check_existing(out, settings, overwrite)
        torch_device = resolve_device(device)
        pipe = load_pipeline(spec, model_path=model_path, device=torch_device)
        hooked_layers = resolve_layers(denoiser(pipe, spec), settings.layers)
        builder = Builder(spec, pipe, hooked_layers, settings, get_encoder(settings.encoder, str(torch_device)))
        with Progress(
            TextColumn("[bold]build-dataset[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=console,
            disable=rank != 0,
        ) as bar:
            task = bar.add_task("source", total=None)
            summary = build_dataset(
                builder, library, concepts, out, progress=lambda i, n, name: bar.update(task, completed=i, total=n, description=name)
            )
    finally:
        close_distributed()
    if rank == 0:
        console.print(
            f"[green]dataset[/] {summary.out}: {summary.concepts} concepts ({summary.built} built, {summary.skipped} already there), "
            f"{summary.samples_per_concept} fit + {summary.eval_samples} eval samples, {summary.layers} layers "
            f"({summary.neurons:,} neurons), {_gib(summary.bytes_on_disk)} on disk, {summary.seconds_per_concept:.2f} s per concept",
            soft_wrap=True,
        )
