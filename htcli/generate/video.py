"""Videos: what a video pipeline (Wan 2.1's) makes, and how `ht` writes it: animated WebP.

A video pipeline returns `.frames` (by default an array of (samples, frames, H, W, 3) values in
[0, 1]; with output_type "pil", lists of PIL frames) where an image pipeline returns `.images`.
`pipeline_outputs` turns either into one item per sample, a PIL image or a `Video` (frames
converted to 8 bits as diffusers converts them for "pil"), so generation, sidecars and grids
treat both alike. Pillow
writes animated WebP itself (no ffmpeg, no other package); lossless, so a saved video keeps the
pipeline's frames bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Union

import numpy as np
from PIL import Image

from htcli.core.files import atomic_path

FPS = 16  # Wan 2.1 T2V's frame rate


@dataclass(frozen=True)
class Video:
    """A generated video: its frames (PIL RGB), played at `fps`."""

    frames: tuple[Image.Image, ...]
    fps: int = FPS

    @property
    def size(self) -> tuple[int, int]:
        return self.frames[0].size

    def save(self, fp: str | Path | IO[bytes]) -> None:
        """Write the frames as a looping, lossless animated WebP."""
        first, *rest = self.frames
        first.save(fp, format="WEBP", save_all=True, append_images=rest, duration=round(1000 / self.fps), loop=0,
                   lossless=True)


Media = Union[Image.Image, Video]


def pipeline_outputs(output: Any) -> list[Media]:
    """One item per sample of a pipeline call's `output`: its images, or its videos."""
    frames = getattr(output, "frames", None)
    if frames is None:
        return list(output.images)
    if isinstance(frames, np.ndarray):
        from diffusers.image_processor import VaeImageProcessor

        return [Video(tuple(VaeImageProcessor.numpy_to_pil(sample))) for sample in frames]
    return [Video(tuple(sample)) for sample in frames]


def media_suffix(item: Media) -> str:
    return ".webp" if isinstance(item, Video) else ".png"


def save_media(item: Media, path: Path) -> None:
    """Write an image as PNG or a video as animated WebP to `path`, atomically."""
    with atomic_path(path) as tmp:
        if isinstance(item, Video):
            item.save(tmp)
        else:
            item.save(tmp, format="PNG")


def frame_by_frame(make_sheet, items: Sequence[Media], *args: Any) -> Media:
    """`make_sheet(images, *args)` for images; for videos, a video whose frame i is
    `make_sheet` of every video's frame i (a grid of videos plays as one)."""
    if not isinstance(items[0], Video):
        return make_sheet(items, *args)
    count = min(len(v.frames) for v in items)
    return Video(tuple(make_sheet([v.frames[i] for v in items], *args) for i in range(count)), items[0].fps)
