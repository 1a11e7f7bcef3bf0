"""Files that are never half-written: write to a temporary name beside the target, then rename."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from htcli.errors import HTError


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it, so set it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path in `path`'s folder that replaces `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_output_dir(path: Path, option: str = "out") -> Path:
    """A folder that a command will write into: an existing file there is a one-line error,
    raised before any work is done (never a traceback after hours of it)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HTError(f"{option}={str(path)!r} is a file, not a folder; choose a folder (it is created if missing)")
    return path


def check_output_file(path: Path, option: str = "out", suffix: str = ".safetensors") -> Path:
    """A file that a command will write: not a folder, and named `*suffix`."""
    path = Path(path)
    if path.is_dir():
        raise HTError(f"{option}={str(path)!r} is a folder; give a file name such as {path / ('intervention' + suffix)}")
    if path.suffix != suffix:
        raise HTError(f"{option}={str(path)!r} should end in {suffix}")
    return path


def file_digest(path: Path) -> str:
    """Short SHA-256 of a file's bytes: names the exact weights behind a result."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def finite(data: Any) -> Any:
    """`data` with every NaN or infinite float replaced by None: strict JSON has no Infinity."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(value) for value in data]
    return data


def dumps_json(data: Any, sort_keys: bool = False) -> str:
    """Strict JSON (non-finite numbers become null), indented: for files and `--json` output."""
    return json.dumps(finite(data), indent=2, sort_keys=sort_keys, allow_nan=False, ensure_ascii=False)


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(dumps_json(data, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise HTError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HTError(f"{path} is not valid JSON: {error}") from None


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Atomically write a safetensors file (tensors made contiguous, on the CPU)."""
    from safetensors.torch import save_file

    payload = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(payload, str(tmp), metadata=dict(metadata or {}))


def read_tensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; a missing, truncated or corrupt
    file is one HTError that says which `what` (e.g. "intervention file") it was."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise HTError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            # safe_open is not a mapping: `key in f` does not work, f.keys() does
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise HTError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None


def load_rgb_images(paths, what: str = "image") -> list:
    """Open image files as RGB PIL images; a missing or unreadable one is one HTError."""
    from PIL import Image

    images = []
    for path in paths:
        if not Path(path).is_file():
            raise HTError(f"{what} {path} does not exist")
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError) as error:
            raise HTError(f"cannot read {what} {path}: {error}") from None
    return images
