"""`ht train-hyper` and `ht hyper export`: the HyperTransport hypernetwork."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from htcli.cli import app
from htcli.cli.options import DataOption, DeviceOption, HyperOption, ModelOption, SeedOption
from htcli.errors import HTError

console = Console(stderr=True, soft_wrap=True)
hyper_app = typer.Typer(help="Use a trained hypernetwork.", no_args_is_help=True)
app.add_typer(hyper_app, name="hyper")

@app.command("train-hyper")
def train_hyper_command(
    model: ModelOption = None,
    data: DataOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory. Default: runs/<model>/hyper.")] = None,
    arch: Annotated[str, typer.Option(help="Hypernetwork architecture.")] = "mlp",
    hidden: Annotated[int, typer.Option(help="Trunk width.")] = 512,
    depth: Annotated[int, typer.Option(help="Trunk layers.")] = 2,
    rank: Annotated[int, typer.Option(help="Rank of the per-layer output heads; 0 for dense heads.")] = 64,
    steps: Annotated[int, typer.Option(help="Optimisation steps.")] = 2000,
    concepts_per_step: Annotated[int, typer.Option(help="Training concepts per step (K).")] = 8,
    samples: Annotated[int, typer.Option(help="Source samples per concept (N).")] = 32,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (warm-up, then cosine).")] = 1e-3,
    l1: Annotated[float, typer.Option(help="Sparsity: L1 weight on predicted (omega - 1, beta).")] = 0.0,
    group: Annotated[float, typer.Option(help="Sparsity: group-lasso weight per layer.")] = 0.0,
    eval_every: Annotated[int, typer.Option(help="Evaluate and checkpoint every E steps.")] = 250,
    val_fraction: Annotated[float, typer.Option(help="Training concepts held aside to choose settings.")] = 0.1,
    limit_train: Annotated[Optional[int], typer.Option(help="Train on only this many concepts (learning curves).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out after an interruption.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a finished or different run in --out.")] = False,
    seed: SeedOption = 0,
    bf16: Annotated[bool, typer.Option(help="bf16 autocast for the frozen model (maps and loss stay float32).")] = False,
    grad_checkpointing: Annotated[bool, typer.Option(help="Recompute denoiser activations in backward (less memory).")] = False,
    micro_batch: Annotated[int, typer.Option(help="Samples per backward pass (exact two-pass W2 gradient; memory ~ this, not K*N). 0: all at once.")] = 0,
    calibration_images: Annotated[
        Optional[Path], typer.Option(help="Folder of images to estimate the modality gap (image-capable encoders).")
    ] = None,
    device: DeviceOption = None,
) -> None:
    """Train the hypernetwork end to end with the W2 loss on the dataset's training concepts.

    Held-out residuals (test concepts, evaluation samples) are logged every --eval-every steps
    to history.json/csv; settings should be chosen on the validation concepts, never on test.
    Runs under `torchrun --nproc_per_node K -m htcli train-hyper ...` with DDP.

    Example: ht train-hyper --model tiny --steps 1500
    """
    import torch.distributed as dist

    from htcli.core.hooks import resolve_layers
    from htcli.core.runtime import close_distributed, init_distributed, resolve_device, run_path
    from htcli.data.dataset import ActivationDataset, resolve_dataset
    from htcli.data.forward import Frozen
    from htcli.methods.hypernetwork import HyperConfig, parameter_count
    from htcli.methods.training import TrainConfig, Trainer
    from htcli.models import default_model_name, get_model, load_denoiser

    dataset = ActivationDataset(resolve_dataset(data, model or default_model_name()))
    spec = get_model(dataset.settings.model)
    if model and model != spec.id:
        raise HTError(f"--data {dataset.root} was built for model {spec.id!r}, not {model!r}")
    out = out or run_path(spec.id, "hyper")
    if (out / "hyper.safetensors").exists() and not (resume or overwrite):
        raise HTError(f"{out} already holds a hypernetwork; pass --resume to continue it or --overwrite to replace it")
    config = TrainConfig(steps=steps, concepts_per_step=concepts_per_step, samples=samples, lr=lr, l1=l1, group=group,
                         eval_every=eval_every, val_fraction=val_fraction, limit_train=limit_train, seed=seed, bf16=bf16,
                         micro_batch=micro_batch)
    embed_dim = int(dataset.embeddings(dataset.names()[:1]).shape[-1])
    hyper = HyperConfig(embed_dim=embed_dim, layers=tuple(dataset.layers.items()), arch=arch, hidden=hidden,
                        depth=depth, rank=rank or None)
    distributed = init_distributed()
    rank_id, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    try:
        torch_device = resolve_device(device)
        denoiser = load_denoiser(spec, torch_device)
        if grad_checkpointing:
            denoiser.enable_gradient_checkpointing()
            denoiser.train()  # diffusers checkpoints only in training mode; the model has no dropout here
        frozen = Frozen(spec, denoiser, resolve_layers(denoiser, dataset.settings.layers))
        trainer = Trainer(frozen, dataset, hyper, config, out, spec.id, rank_id, world)
        if resume:
            trainer.resume()
        if rank_id == 0:
            console.print(
                f"training {arch} hypernetwork ({parameter_count(hyper) / 1e6:.2f}M parameters, {hyper.neurons:,} neurons) on "
                f"{len(trainer.train)} concepts ({len(trainer.val)} validation, {len(trainer.test)} held-out test), "
                f"{world} process(es)"
            )
        with Progress(TextColumn("[bold]train-hyper[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), TextColumn("{task.description}"), console=console, disable=rank_id != 0) as bar:
            task = bar.add_task("", total=config.steps, completed=trainer.step)
            summary = trainer.fit(lambda step, loss: bar.update(task, completed=step, description=f"loss {loss:.3g}"))
        if rank_id == 0 and calibration_images is not None:
            _store_gap(trainer, calibration_images, out)
    finally:
        close_distributed()
    if rank_id == 0:
        console.print(
            f"[green]hypernetwork[/] {out / 'hyper.safetensors'}: {trainer.step} steps in {summary['train_seconds']:.1f} s, "
            f"held-out residual {summary['test_residual']:.3f} (validation {summary['val_residual']:.3f})"
        )


def _store_gap(trainer, folder: Path, out: Path) -> None:
    """Estimate the encoder's modality gap on a folder of images; store it in the checkpoint."""
    from htcli.core.files import load_rgb_images
    from htcli.data.concepts import load_library
    from htcli.methods.predict import CHECKPOINT, calibrate_gap

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not paths:
        raise HTError(f"no images (.png, .jpg, .webp) in {folder}")
    library = load_library()
    calibrate_gap(out / CHECKPOINT, load_rgb_images(paths, "calibration image"), [library.resolve(n).phrase for n in trainer.train])


@hyper_app.command("export")
def export_command(
    concept: Annotated[str, typer.Option("--concept", "-c", help="Concept text (library name or free text).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Intervention file to write (.safetensors).")],
    hyper: HyperOption = None,
    model: ModelOption = None,
) -> None:
    """Write the intervention the hypernetwork predicts for a concept, as a standard file.

    Example: ht hyper export --model tiny --concept "art deco" --out art-deco.safetensors
    """
    from htcli.core.interventions import Intervention
    from htcli.data.concepts import load_library
    from htcli.methods.predict import Predictor, resolve_checkpoint
    from htcli.models import default_model_name

    predictor = Predictor.load(resolve_checkpoint(hyper, model or default_model_name()), model)
    resolved = load_library().resolve(concept)
    maps = predictor.maps([resolved.phrase])[0]
    Intervention(maps, predictor.model, "hypertransport", resolved.name, predictor.checkpoint.encoder,
                 info={"phrase": resolved.phrase}).save(out)
    console.print(f"wrote {out} ({predictor.model}, {len(maps)} layers) for {resolved.name!r}")
