"""Writing steered images: PNGs (videos: animated WebPs) with JSON sidecars, a labelled grid, the composed intervention.

`steer_and_save` is all of `ht steer`: check the output paths, steer, write.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from htcli.core.files import check_output_dir, write_json
from htcli.errors import HTError
from htcli.generate.source_maps import Steerer
from htcli.generate.steer import Progress, Steered, SteeredImage, SteerRequest, steer
from htcli.generate.video import frame_by_frame, media_suffix, save_media
from htcli.models.interventions import check_intervention_out

CAPTION_PX = 14  # height of the caption band under each grid cell


def noise_banner(weights: str | None, model: str) -> str | None:
    """The line a grid of images made with random weights carries (sidecar `weights`, see
    `htcli.generate.steer.weights_kind`): such images are noise; None for pretrained weights."""
    return None if weights in (None, "pretrained") else f"{model} has random weights: these images are noise"


def grid(images: Sequence[Image.Image], labels: Sequence[str], columns: int, banner: str | None = None) -> Image.Image:
    """Images in rows of `columns`, each with its label underneath; `banner`, a line above them all."""
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    top = CAPTION_PX if banner else 0
    sheet = Image.new("RGB", (columns * width, top + rows * (height + CAPTION_PX)), "white")
    draw = ImageDraw.Draw(sheet)
    if banner:
        draw.text((2, 1), banner, fill="firebrick")
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = (i % columns) * width, top + (i // columns) * (height + CAPTION_PX)
        sheet.paste(image.resize((width, height)), (x, y))
        draw.text((x + 2, y + height + 1), label, fill="black")
    return sheet


def image_stem(index: int, steered: SteeredImage) -> str:
    """A distinct, readable file stem: `003-art-deco-strength-0.5-seed7`. The strength keeps its
    sign (`strength+0.5` vs `strength-0.5`), so a sweep through 0 never reuses a name."""
    from htcli.data.concepts import slugify

    meta = steered.metadata
    parts = [f"{index:03d}"]
    if meta.get("source"):
        parts.append(slugify(meta["source"]))
    if meta.get("strength") is not None:
        parts.append(f"strength{meta['strength']:+g}")
    parts.append(f"seed{meta['seed']}")
    return "-".join(parts)


def check_outputs(request: SteerRequest, out: Path | None, export: Path | None) -> None:
    """Refuse output paths that cannot be written, before anything is generated: `out` must be
    a folder (or new), `export` a new .safetensors path or an ht intervention file (anything else
    there is never overwritten)."""
    if out is not None:
        check_output_dir(out)
    if export is not None:
        if request.each or request.method != "hypertransport":
            raise HTError("export= needs one composed intervention: drop each=True, and use method='hypertransport'")
        check_intervention_out(export, "export")


def save_steered(steered: Steered, folder: Path, export: Path | None = None) -> list[Path]:
    """Write each image as PNG (a video as animated WebP) + JSON sidecar, a grid when there are
    several, and optionally the composed intervention to `export`. Every file is written
    atomically. Returns the PNGs (WebPs)."""
    check_output_dir(folder)
    if export is not None:
        check_intervention_out(export, "export")
    intervention = steered.intervention() if export is not None else None  # refuse before writing
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, item in enumerate(steered.images):
        path = folder / f"{image_stem(index, item)}{media_suffix(item.image)}"
        save_media(item.image, path)
        write_json(path.with_suffix(".json"), item.metadata)
        written.append(path)
    if len(steered.images) > 1:
        first = steered.images[0].metadata
        banner = noise_banner(first.get("weights"), first.get("model", "the model"))
        media = [i.image for i in steered.images]
        sheet = frame_by_frame(grid, media, [i.label for i in steered.images], steered.columns, banner)
        save_media(sheet, folder / f"grid{media_suffix(sheet)}")
    if intervention is not None:
        intervention.save(export)
    return written


@dataclass
class SteerRun:
    steered: Steered
    folder: Path
    files: list[Path]  # the PNGs (videos: WebPs) written


def steer_and_save(
    request: SteerRequest,
    *,
    model: str | None = None,
    hyper: Path | None = None,
    out: Path | None = None,
    export: Path | None = None,
    model_path: str | None = None,
    device: str | None = None,
    resolution: int | None = None,
    progress: Progress | None = None,
) -> SteerRun:
    """`ht steer`: check everything, load the model, steer, and write to `out` (default
    runs/<model>/generations/<time>-<prompt>); `resolution` in pixels (None: the model's)."""
    from htcli.core.runtime import run_path
    from htcli.data.concepts import slugify
    from htcli.models import get_model

    spec = get_model(model).at_resolution(resolution)
    request.check()
    check_outputs(request, out, export)
    steered = steer(Steerer(spec, hyper=hyper, model_path=model_path, device=device), request, progress)
    folder = out or run_path(spec.id, "generations") / f"{time.strftime('%Y%m%d-%H%M%S')}-{slugify(request.prompt)[:40]}"
    return SteerRun(steered, folder, save_steered(steered, folder, export))
