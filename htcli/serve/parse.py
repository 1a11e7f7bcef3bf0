"""Request bodies of `ht serve` -> a `SteerRequest`, or a `FieldError` naming the field at fault.

A body is JSON (uploads as base64 strings) or a form (uploads as multipart files: `curl -F`,
the web page); both go through one pydantic model, `Body`. The body is capped before it is
read, reference images are decoded in memory with their size checked before their pixels,
and uploaded intervention files are written under names the server chooses: nothing a client
sends is ever opened as a path.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request

from htcli.errors import HTError
from htcli.generate.steer import SteerRequest, parse_strengths
from htcli.serve.service import FieldError, Limits

UPLOADS = ("reference_images", "interventions")
Files = dict[str, list[tuple[str, bytes]]]  # upload field -> (file name the client gave, bytes)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Concept(_Strict):
    name: str
    weight: float = 1.0


class _Intervention(_Strict):
    data: str  # base64 of the .safetensors file
    weight: float = 1.0
    name: str = ""


class Body(_Strict):
    """The fields of /v1/generate and /v1/intervention (docs/serve.md); JSON uploads are base64."""

    prompt: str = ""
    concepts: list[str | _Concept] = []  # "art deco", "art deco:0.6", or {"name": ..., "weight": ...}
    strength: float | list[float] | None = None  # one value or a sweep; None: ht steer's default
    seed: int = 0
    num_images: int = 1
    method: str = "hypertransport"
    steer_steps: str = "all"
    layers: list[str] = []  # steer only the intervention's layers matching these patterns (ht steer --layers)
    gap_correction: bool = True
    reference_images: list[str] = []
    interventions: list[str | _Intervention] = []


@dataclass
class Parsed:
    """A request ready for the service, with the temporary folder its intervention uploads are in
    (remove it with `with parsed.folder:` once the service has read them)."""

    request: SteerRequest
    folder: tempfile.TemporaryDirectory
    names: dict[str, str] = field(default_factory=dict)  # upload's path in `folder` -> the name the client gave

    def scrubbed(self, error: HTError) -> FieldError:
        """`error` with upload paths replaced by the names the client gave."""
        message = str(error)
        for path, name in self.names.items():
            message = message.replace(path, name)
        return FieldError(message, getattr(error, "field", None), getattr(error, "status", 400))

    def renamed(self, sources: list[dict]) -> list[dict]:
        """Source records with uploads named as the client named them, not by their temporary path."""
        return [s | {"intervention": self.names.get(s["intervention"], s["intervention"])} if "intervention" in s else s
                for s in sources]


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise FieldError(f"the request body is {declared} bytes; this server takes at most {limit}", None, 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise FieldError(f"the request body exceeds {limit} bytes", None, 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_request(request: Request, limits: Limits) -> Parsed:
    """Read, decode and check a request body (JSON or a form) into a `Parsed` request."""
    body = await read_body(request, limits.max_body_bytes)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    files: Files = {name: [] for name in UPLOADS}
    if kind == "application/json":
        try:
            fields = json.loads(body)  # NaN and Infinity parse, and are refused by field below
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise FieldError(f"the body is not valid JSON: {error}") from None
        if not isinstance(fields, dict):
            raise FieldError("the body must be a JSON object")
    elif kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        fields, files = await _form(request, body, limits)
    else:
        raise FieldError(f"send application/json or a form (multipart/form-data for uploads), "
                         f"not {kind or 'no content type'!r}", None, 415)
    return await run_in_threadpool(_build, fields, files, limits)  # image decoding is not for the event loop


async def _form(request: Request, body: bytes, limits: Limits) -> tuple[dict, Files]:
    """A form's text fields as Body fields, and its uploads."""

    async def replay() -> dict:  # the body is read already (and capped): parse it from memory
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=limits.max_sources, max_fields=4 * limits.max_sources + 16,
                                                     max_part_size=limits.max_body_bytes)
    fields: dict[str, Any] = {}
    files: Files = {name: [] for name in UPLOADS}
    for key, value in form.multi_items():
        if key in UPLOADS:
            if not isinstance(value, UploadFile):
                raise FieldError(f"{key} takes files (curl -F '{key}=@FILE')", key)
            files[key].append((value.filename or "", await value.read()))
        elif isinstance(value, UploadFile):
            raise FieldError(f"{key} takes text, not a file", key)
        elif key in ("concepts", "layers"):  # repeatable fields
            fields.setdefault(key, []).append(value)
        elif key == "strength":
            try:
                fields["strength"] = parse_strengths(value)
            except HTError as error:
                raise FieldError(str(error).replace("--strength", "strength"), "strength") from None
        else:
            fields[key] = value
    return fields, files


def _validated(fields: dict) -> Body:
    try:
        return Body.model_validate(fields)
    except ValidationError as error:
        # Of a union's alternatives, the error that got deepest says most ("concepts[0].weight", not "not a string").
        worst = max(error.errors(), key=lambda e: len(e["loc"]))
        known = set(Body.model_fields) | set(_Concept.model_fields) | set(_Intervention.model_fields)
        parts = [f"[{part}]" if isinstance(part, int) else f".{part}" for part in worst["loc"]
                 if isinstance(part, int) or part in known]  # not the union's type tags ("float", "_Concept")
        where = "".join(parts).lstrip(".")
        raise FieldError(f"{where}: {worst['msg']}" if where else worst["msg"],
                         str(worst["loc"][0]) if worst["loc"] else None, 422) from None


def _base64(text: str, where: str, field_name: str) -> bytes:
    payload = text.split(",", 1)[1] if text.startswith("data:") else text  # data URLs too
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(f"{where} is not base64 data", field_name) from None


def _image(data: bytes, where: str, max_pixels: int) -> Image.Image:
    """A reference image decoded in memory, its size checked before its pixels are."""
    too_many = f"{where} has more than {max_pixels} pixels, the most this server accepts"
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise FieldError(f"{too_many} ({image.width}x{image.height})", "reference_images", 413)
            return image.convert("RGB")
    except Image.DecompressionBombError:  # beyond Pillow's own limit: refused while reading the header
        raise FieldError(too_many, "reference_images", 413) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise FieldError(f"{where} is not an image this server can read (PNG, JPEG, WebP...)", "reference_images") from None


def _build(fields: dict, files: Files, limits: Limits) -> Parsed:
    """Type-check the fields, decode the uploads (JSON's and the form's), and make the SteerRequest."""
    body = _validated(fields)
    images = [_base64(text, f"reference_images[{i}]", "reference_images") for i, text in enumerate(body.reference_images)]
    images += [data for _, data in files["reference_images"]]
    decoded = [_image(data, f"reference_images[{i}]", limits.max_image_pixels) for i, data in enumerate(images)]
    uploads = [(item.name, _base64(item.data, f"interventions[{i}]", "interventions"), item.weight)
               if isinstance(item, _Intervention) else ("", _base64(item, f"interventions[{i}]", "interventions"), 1.0)
               for i, item in enumerate(body.interventions)]
    uploads += [(name, data, 1.0) for name, data in files["interventions"]]
    folder = tempfile.TemporaryDirectory(prefix="ht-serve-")
    interventions, names = [], {}
    for i, (name, data, weight) in enumerate(uploads):
        path = str(Path(folder.name) / f"upload-{i}.safetensors")  # our name: a client's file name is never a path
        Path(path).write_bytes(data)
        names[path] = re.sub(r"[^\w.\- ]", "_", Path(name).name)[:100] or f"upload-{i}.safetensors"
        interventions.append((path, weight))
    concepts = [item if isinstance(item, str) else (item.name, item.weight) for item in body.concepts]
    strengths = [body.strength] if isinstance(body.strength, float) else body.strength
    request = SteerRequest(body.prompt, concepts=concepts, reference_images=decoded, interventions=interventions,
                           strengths=strengths, method=body.method, seed=body.seed, num_images=body.num_images,
                           gap_correction=body.gap_correction, steer_steps=body.steer_steps,
                           layers=body.layers)
    return Parsed(request, folder, names)
