"""`ht steer`: generate with an intervention from concepts, reference images or files."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from htcli import __version__
from htcli.cli import app
from htcli.cli.options import DeviceOption, HyperOption, ModelOption
from htcli.core.files import file_digest, load_rgb_images
from htcli.errors import HTError

console = Console(stderr=True, soft_wrap=True)


def _model_widths(spec, names: list[str]) -> dict[str, int]:
    """Widths of the named modules of the spec's denoiser (meta device: no weights needed)."""
    from htcli.core.hooks import module_width
    from htcli.models import build_meta_denoiser

    modules = dict(build_meta_denoiser(spec).named_modules())
    return {name: module_width(modules[name]) for name in names if name in modules}


@app.command("steer")
def steer_command(  # noqa: C901  (one linear script: check, build the intervention, generate, write)
    prompt: Annotated[str, typer.Argument(help="What to generate.")],
    concept: Annotated[
        Optional[list[str]], typer.Option("--concept", "-c", help="Concept text, optionally weighted: 'art deco:0.6'; repeatable.")
    ] = None,
    reference_image: Annotated[
        Optional[list[Path]], typer.Option("--reference-image", "-r", help="Steer towards the style of this image; repeatable (averaged).")
    ] = None,
    intervention: Annotated[
        Optional[list[str]], typer.Option("--intervention", "-i", help="Saved intervention file, optionally 'FILE:weight'; repeatable.")
    ] = None,
    strength: Annotated[str, typer.Option(help="Strength, or a sweep '0,0.25,0.5,0.75,1' (one image per value).")] = "0.6",
    method: Annotated[str, typer.Option(help="hypertransport (steer activations) or prompt (append the concept).")] = "hypertransport",
    model: ModelOption = None,
    hyper: HyperOption = None,
    seed: Annotated[int, typer.Option(help="Seed of the first image; image k uses seed + k.")] = 0,
    num_images: Annotated[int, typer.Option(help="Images per strength (one batch).")] = 1,
    each: Annotated[bool, typer.Option(help="One image per concept instead of composing them (one mixed batch).")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder. Default: runs/<model>/generations/<time>.")] = None,
    export: Annotated[Optional[Path], typer.Option(help="Also write the intervention used to this .safetensors file.")] = None,
    no_gap_correction: Annotated[bool, typer.Option(help="Use raw image embeddings (no modality-gap correction).")] = False,
    model_path: Annotated[Optional[str], typer.Option(help="Local pipeline directory instead of the Hub.")] = None,
    device: DeviceOption = None,
) -> None:
    """Generate images steered towards concepts, reference images or saved interventions.

    Several sources compose additively: omega = 1 + sum w_i (omega_i - 1), beta = sum w_i beta_i,
    then --strength scales the result (0 = the unsteered model, bit for bit).

    Example: ht steer "cyberpunk city" --concept "art deco" --strength 0,0.5,1 --model tiny
    """
    from htcli.core.interventions import Intervention, load_intervention
    from htcli.core.runtime import resolve_device, run_path
    from htcli.data.concepts import load_library, slugify
    from htcli.generate.steer import (
        Timer,
        combine,
        generate,
        generate_per_sample,
        grid,
        parse_strengths,
        parse_weighted,
    )
    from htcli.models import default_model_name, get_model, load_pipeline

    # 1. Check every input before loading anything heavy.
    spec = get_model(model or default_model_name())
    strengths = parse_strengths(strength)
    if any(s > 1 for s in strengths):
        console.print("[yellow]warning:[/] strength > 1 extrapolates beyond the fitted transport")
    if method not in ("hypertransport", "prompt"):
        raise HTError(f"--method must be hypertransport or prompt, got {method!r}")
    if num_images < 1:
        raise HTError(f"--num-images must be positive, got {num_images}")
    library = load_library()
    weighted_concepts = [parse_weighted(c) for c in concept or ()]
    concepts = [(library.resolve(text), w) for text, w in weighted_concepts]
    images = load_rgb_images(reference_image or [], "reference image")
    files = []
    for item in intervention or ():
        path, weight = parse_weighted(item)
        loaded = load_intervention(Path(path))
        loaded.check(spec.id, _model_widths(spec, list(loaded.maps)), where=path)
        files.append((loaded, weight))
    if not (concepts or images or files):
        raise HTError("nothing to steer with: give --concept, --reference-image or --intervention")
    if each and method == "prompt":
        raise HTError("--each needs --method hypertransport; run --method prompt once per concept instead")
    if method == "prompt" and (images or files):
        raise HTError("--method prompt appends concept text; it cannot use --reference-image or --intervention")

    # 2. The intervention (or the prompt) to use.
    maps_per_source, checkpoint_hash, ms, combined = [], None, 0.0, None
    text = prompt
    if method == "prompt":
        for c, _ in concepts:
            text = c.apply(text)
        strengths = [None]  # no intervention: strength does not apply
    else:
        checkpoint = None
        if concepts or images:
            from htcli.methods.encoders import close_gap, get_encoder
            from htcli.methods.hypernetwork import load_checkpoint, unbatch
            from htcli.methods.predict import resolve_checkpoint

            path = resolve_checkpoint(hyper, spec.id)
            checkpoint = load_checkpoint(path)
            if checkpoint.model != spec.id:
                raise HTError(f"{path} was trained for model {checkpoint.model!r}, not {spec.id!r}")
            checkpoint_hash = file_digest(path)
            encoder = get_encoder(checkpoint.encoder)
            if images and not encoder.has_images:
                raise HTError(f"--reference-image needs an image encoder; this hypernetwork uses {encoder.id} (text only)")
        with Timer() as timer:
            if concepts:
                predicted = unbatch(checkpoint.maps(encoder.encode_text([c.phrase for c, _ in concepts])))
                maps_per_source += [(maps, w) for maps, (_, w) in zip(predicted, concepts)]
            if images:
                embedding = encoder.encode_images(images).mean(0, keepdim=True)
                if checkpoint.gap is not None and not no_gap_correction:
                    embedding = close_gap(embedding, checkpoint.gap)
                elif checkpoint.gap is None and not no_gap_correction:
                    console.print("[yellow]note:[/] the hypernetwork stores no modality gap; using raw image embeddings")
                maps_per_source.append((unbatch(checkpoint.maps(embedding))[0], 1.0))
            maps_per_source += [(f.maps, w) for f, w in files]
            combined = None if each else combine(maps_per_source)
        ms = timer.ms

    # 3. Generate.
    torch_device = resolve_device(device)
    pipe = load_pipeline(spec, model_path=model_path, device=torch_device)
    seeds = [seed + k for k in range(num_images)]
    folder = out or run_path(spec.id, "generations") / f"{time.strftime('%Y%m%d-%H%M%S')}-{slugify(prompt)[:40]}"
    folder.mkdir(parents=True, exist_ok=True)
    if each and method == "hypertransport":
        labels = [c.name for c, _ in concepts] + ["reference image"] * bool(images) + [f.concept for f, _ in files]
        batch = generate_per_sample(spec, pipe, prompt, [m for m, _ in maps_per_source], strengths[0], seed)
        results = [(img, strengths[0], seed, label) for img, label in zip(batch, labels)]
    else:
        results = [(g.image, g.strength, g.seed, g.label) for g in generate(spec, pipe, text, combined, strengths, seeds)]
    sources = [{"concept": c.name, "weight": w} for c, w in concepts] + [
        {"reference_images": [str(p) for p in reference_image or []]}
    ] * bool(images) + [{"intervention": item} for item in intervention or ()]
    written = []
    for index, (image, s, image_seed, label) in enumerate(results):
        stem = f"{index:03d}-{slugify(label)}"
        image.save(folder / f"{stem}.png")
        sidecar = {
            "prompt": text, "sources": sources, "strength": s, "seed": image_seed, "model": spec.id, "method": method,
            "composition": "each" if each else "additive", "checkpoint_sha256": checkpoint_hash, "ht_version": __version__,
            "intervention_ms": ms,
        }
        (folder / f"{stem}.json").write_text(json.dumps(sidecar, indent=2) + "\n")
        written.append(folder / f"{stem}.png")
    if len(results) > 1:
        columns = len(strengths) if not each else len(results)
        grid([r[0] for r in results], [r[3] for r in results], columns=min(columns, 8)).save(folder / "grid.png")
    if export is not None:
        if combined is None:
            raise HTError("--export needs one composed intervention: drop --each, and use --method hypertransport")
        Intervention(combined, spec.id, "hypertransport" if not files else "composed", "; ".join(c.name for c, _ in concepts),
                     info={"sources": sources}).save(export)
        console.print(f"intervention written to {export}")
    if spec.offline:
        console.print(f"[yellow]note:[/] {spec.id} has random weights: its images are noise (compare in activation space)")
    timing = f", intervention in {ms:.1f} ms" if method == "hypertransport" else ""
    console.print(f"[green]{len(written)} image(s)[/] in {folder}{timing}")
