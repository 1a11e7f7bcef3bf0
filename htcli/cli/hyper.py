"""`ht train-hyper` and `ht hyper export`: the HyperTransport hypernetwork."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from htcli.cli.app import app
from htcli.cli.options import (
    CONCEPTS_PER_STEP,
    DataOption,
    DeviceOption,
    DtypeOption,
    ExtraConceptsOption,
    GradCheckpointingOption,
    HyperOption,
    LimitConceptsOption,
    MicroBatchOption,
    ModelOption,
    ModelPathOption,
    RandomWeightsOption,
    RefineOption,
    SamplesOption,
    SeedOption,
    TrainingDtype,
)
from htcli.cli.output import console, err, note, steps
from htcli.core.runtime import is_main_process
from htcli.data.concepts import read_concept_names
from htcli.methods.hypernetwork import HyperConfig
from htcli.methods.train_config import TrainConfig

hyper_app = typer.Typer(help="Use a trained hypernetwork.", no_args_is_help=True)
app.add_typer(hyper_app, name="hyper")


@app.command("train-hyper")
def train_hyper_command(
    model: ModelOption = None,
    data: DataOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory. Default: runs/<model>/hyper.")] = None,
    arch: Annotated[str, typer.Option(help="Hypernetwork architecture.")] = HyperConfig.arch,
    hidden: Annotated[int, typer.Option(help="Trunk width.")] = HyperConfig.hidden,
    depth: Annotated[int, typer.Option(help="Trunk layers.")] = HyperConfig.depth,
    rank: Annotated[int, typer.Option(help="Rank of the per-layer output heads; 0 for dense heads.")] = HyperConfig.rank,
    embedding: Annotated[str, typer.Option(help="What is embedded of a concept: 'templates' (the mean of its "
                                           "templates' phrases) or 'phrase' (the first one).")] = HyperConfig.embedding,
    prior: Annotated[str, typer.Option(help="What the maps start from: 'linear' (a ridge regression of the training "
                                       "concepts' Linear-AcT maps on the embedding), 'mean' (their mean) or 'none' "
                                       "(the identity).")] = HyperConfig.prior,
    steps_: Annotated[int, typer.Option("--steps", help="Optimisation steps; 0 saves and scores the network as it "
                                        "starts (its --prior alone).")] = TrainConfig.steps,
    concepts_per_step: Annotated[int, typer.Option(help="Training concepts per step (K).")] = CONCEPTS_PER_STEP,
    samples: SamplesOption = None,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (warm-up, then cosine).")] = TrainConfig.lr,
    l1: Annotated[float, typer.Option(help="Sparsity: L1 weight on predicted (omega - 1, beta).")] = TrainConfig.l1,
    group: Annotated[float, typer.Option(help="Sparsity: group-lasso weight per layer.")] = TrainConfig.group,
    eval_every: Annotated[int, typer.Option(help="Evaluate and checkpoint every E steps.")] = TrainConfig.eval_every,
    average: Annotated[float, typer.Option(help="Checkpoint averaging: average the weights of this share of the last "
                                           "steps (0: off).")] = TrainConfig.average,
    val_fraction: Annotated[float, typer.Option(help="Training concepts held aside to choose settings.")] = TrainConfig.val_fraction,
    limit_concepts: LimitConceptsOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out after an interruption (same settings).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a finished or different run in --out.")] = False,
    seed: SeedOption = TrainConfig.seed,
    extra_concepts: ExtraConceptsOption = None,
    dtype: DtypeOption = TrainingDtype.auto,
    grad_checkpointing: GradCheckpointingOption = False,
    micro_batch: MicroBatchOption = None,
    calibration_images: Annotated[
        Optional[Path], typer.Option(help="Folder of images to estimate the modality gap (image-capable encoders).")
    ] = None,
    model_path: ModelPathOption = None,
    random_weights: RandomWeightsOption = False,
    device: DeviceOption = None,
) -> None:
    """Train the hypernetwork end to end with the W2 loss on the dataset's training concepts.

    Held-out residuals (test concepts, evaluation samples) are logged every --eval-every steps
    to history.json/csv; settings should be chosen on the validation concepts, never on test.
    --limit-concepts trains on a seeded sample of the training concepts (learning curves).
    Runs under `torchrun --nproc_per_node K -m htcli train-hyper ...` with DDP.

    Example: ht train-hyper --model tiny --steps 1500
    """
    from htcli.core.runtime import run_path
    from htcli.data.dataset import open_dataset
    from htcli.methods.training_run import train_hypernetwork

    dataset = open_dataset(data, model)
    config = TrainConfig(steps=steps_, concepts_per_step=concepts_per_step, samples=samples, lr=lr, l1=l1, group=group,
                         eval_every=eval_every, average=average, val_fraction=val_fraction, limit_concepts=limit_concepts, seed=seed,
                         dtype=dtype.value, micro_batch=micro_batch,
                         extra_concepts=tuple(read_concept_names(extra_concepts)) if extra_concepts else ())
    with steps("train-hyper", config.steps, enabled=is_main_process()) as bar:  # one bar under torchrun
        result = train_hypernetwork(
            dataset, out or run_path(dataset.settings.model, "hyper"), config,
            {"arch": arch, "hidden": hidden, "depth": depth, "rank": rank or None, "embedding": embedding, "prior": prior},
            resume=resume, overwrite=overwrite, device=device, grad_checkpointing=grad_checkpointing,
            model_path=model_path, calibration_images=calibration_images, progress=lambda step, total, text: bar.update(step, total, text),
            say=lambda line: err.print(line, markup=False),
        )
    if result is None:  # not rank 0
        return
    held_out = ("no held-out test concepts in the dataset" if result.test_residual is None
                else f"held-out residual {result.test_residual:.3f}")
    seen = [f"{split} {value:.3f}" for split, value in (("train", result.train_residual),
                                                          ("validation", result.val_residual)) if value is not None]
    validation = f" ({', '.join(seen)})" if seen else ""
    finished = " (already finished: nothing trained)" if result.already_finished else ""
    console.print(f"[green]hypernetwork[/] {result.checkpoint}: {result.steps} steps in {result.train_seconds:.1f} s"
                  f"{finished}, {held_out}{validation}")


@hyper_app.command("export")
def export_command(
    concept: Annotated[str, typer.Option("--concept", "-c", help="Concept text (library name or free text).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Intervention file to write (.safetensors).")],
    hyper: HyperOption = None,
    model: ModelOption = None,
    refine: RefineOption = None,
    data: DataOption = None,
    model_path: ModelPathOption = None,
    random_weights: RandomWeightsOption = False,
) -> None:
    """Write the intervention the hypernetwork predicts for a concept, as a standard file.

    --refine N spends seconds on N LinEAS steps from the prediction (method lineas-refine<N>).

    Example: ht hyper export --model tiny --concept "art deco" --out art-deco.safetensors
    """
    from htcli.cli.steer import neighbours_line
    from htcli.methods.predict import Predictor
    from htcli.methods.refine import export_intervention

    written = export_intervention(concept, out, hyper, model, refine, data, model_path)
    console.print(f"wrote {out} ({written.model}, {len(written.maps)} layers) for {written.concept!r}", markup=False)
    if refine is not None:
        info = written.info
        residual = (f": residual {info['residual_before']:.3f} -> {info['residual_after']:.3f} (evaluation samples)"
                    if "residual_after" in info else " (captured targets: no evaluation samples to report on)")
        console.print(f"refined with {refine} LinEAS steps in {info['seconds']:.2f} s{residual}",
                      highlight=False, markup=False)
    if written.info["nearest_training_concepts"]:
        console.print(neighbours_line(written.concept, written.info["nearest_training_concepts"]), highlight=False,
                      markup=False)
    if text := Predictor.neighbour_note(written.concept, written.info):
        note(text)
