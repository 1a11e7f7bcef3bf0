"""`ht steer`: generate with an intervention from concepts, reference images or files."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from htcli.cli.app import app
from htcli.cli.options import (
    DataOption,
    DeviceOption,
    HyperOption,
    ModelOption,
    ModelPathOption,
    RandomWeightsOption,
    RefineOption,
    ResolutionOption,
)
from htcli.cli.output import console, note, steps
from htcli.core.strength import parse_strengths
from htcli.evaluation.stats import plural
from htcli.generate.request_fields import FIELDS, METHODS
from htcli.generate.steer import SteerRequest

Method = Enum("Method", {name: name for name in METHODS}, type=str)  # hypertransport | prompt


def neighbours_line(source: str, nearest: list[dict]) -> str:
    """'nearest training concepts of 'art deco': Art Deco 1.000, Bauhaus 0.871' (cosine similarity)."""
    listed = ", ".join(f"{n['name']} {n['similarity']:.3f}" for n in nearest)
    return f"nearest training concepts of {source!r}: {listed}"


@app.command("steer")
def steer_command(
    prompt: Annotated[str, typer.Argument(help="What to generate.")],
    concept: Annotated[
        list[str] | None,
        typer.Option("--concept", "-c", help=FIELDS["concepts"].help + " Repeatable."),
    ] = None,
    reference_image: Annotated[
        list[Path] | None, typer.Option("--reference-image", "-r", help="Steer towards the style of this image; repeatable (averaged).")
    ] = None,
    intervention: Annotated[
        list[str] | None,
        typer.Option("--intervention", "-i", help="Saved intervention file, or a Hub reference USER/REPO[@REVISION][/FILE], "
                     "optionally 'FILE:weight' or 'FILE:weight@LAYERS'; repeatable."),
    ] = None,
    strength: Annotated[
        str | None,
        typer.Option(help=FIELDS["strength"].help + " Write a negative one as --strength=-0.5."),
    ] = FIELDS["strength"].default,
    method: Annotated[
        Method, typer.Option(help=FIELDS["method"].help)
    ] = Method(FIELDS["method"].default),
    steer_steps: Annotated[
        str, typer.Option(help=FIELDS["steer_steps"].help)
    ] = FIELDS["steer_steps"].default,
    layers: Annotated[
        list[str] | None,
        typer.Option("--layers", "-l", help=FIELDS["layers"].help + " Repeatable."),
    ] = None,
    model: ModelOption = None,
    hyper: HyperOption = None,
    seed: Annotated[int, typer.Option(help=FIELDS["seed"].help)] = FIELDS["seed"].default,
    num_images: Annotated[int, typer.Option(help=FIELDS["num_images"].help)] = FIELDS["num_images"].default,
    each: Annotated[
        bool, typer.Option("--each", help="One image per source instead of composing them (one mixed batch).")
    ] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder. Default: runs/<model>/generations/<time>.")] = None,
    export: Annotated[Path | None, typer.Option(help="Also write the composed intervention to this .safetensors file.")] = None,
    no_gap_correction: Annotated[
        bool, typer.Option("--no-gap-correction", help="Use raw reference-image embeddings; by default they are moved "
                           "into the text region with the checkpoint's modality-gap means.")
    ] = False,
    refine: RefineOption = None,
    data: DataOption = None,
    model_path: ModelPathOption = None,
    random_weights: RandomWeightsOption = False,
    resolution: ResolutionOption = None,
    device: DeviceOption = None,
) -> None:
    """Generate images steered towards concepts, reference images or saved interventions.

    Several sources compose additively: omega = 1 + sum w_i (omega_i - 1), beta = sum w_i beta_i,
    then --strength scales the result (0 = the unsteered model, bit for bit). A negative strength
    or weight steers away: it interpolates towards the inverse map z -> (z - beta) / omega.
    --steer-steps limits steering to some denoising steps of multi-step models, --layers (or a
    source's '@LAYERS') to some layers (default: all).

    Example: ht steer "cyberpunk city" --concept "art deco" --strength=-1,0,0.5,1 --model tiny
    """
    from htcli.generate.save import steer_and_save

    request = SteerRequest(
        prompt, concepts=concept or [], reference_images=reference_image or [], interventions=intervention or [],
        strengths=None if strength is None else parse_strengths(strength), method=method.value, seed=seed,
        num_images=num_images, each=each, gap_correction=not no_gap_correction, steer_steps=steer_steps,
        refine=refine, data=data, layers=layers or (),
    )
    with steps("steer") as progress:
        run = steer_and_save(request, model=model, hyper=hyper, out=out, export=export, model_path=model_path,
                             device=device, resolution=resolution, progress=lambda done, total, what: progress.update(done, total, what))
    nearest = run.steered.images[0].metadata.get("nearest_training_concepts", []) if run.steered.images else []
    for source in dict.fromkeys(n["source"] for n in nearest):
        line = neighbours_line(source, [n for n in nearest if n["source"] == source])
        console.print(line, highlight=False, markup=False)
    for text in run.steered.notes:
        note(text)
    if export is not None:
        console.print(f"intervention written to {export}", highlight=False, markup=False)
    ms = run.steered.intervention_ms
    timing = "" if ms is None else f", intervention in {ms:.1f} ms"
    console.print(f"{plural(len(run.files), 'image')} in {run.folder}{timing}", highlight=False, markup=False)
