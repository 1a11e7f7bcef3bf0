"""Request bodies of `ht serve` -> a `SteerRequest`, or a `FieldError` naming the field at fault.

A body is JSON (uploads as base64 strings) or a form (uploads as multipart files: `curl -F`,
the web page); both go through one pydantic model, `Body`, whose text fields are capped in
length. The body, read already (`htcli.serve.limits.read_body`), is parsed off the event loop,
JSON after its separators were counted as it was read (`JsonSeparators`: a million keys are
413 before `json.loads` builds them), forms in a thread of their own; deep nesting, integers too long to
read and lone surrogates are 4xx, not crashes. Sources are counted before anything is decoded;
reference images must be PNG, JPEG (of at most `MAX_JPEG_SCANS` scans) or WebP, are refused
undecoded when the encoder has no image tower, and every upload's header is read, its size
checked (per image, per request, and against the server's `PixelBudget`) before any pixel is
decoded. Uploaded intervention files are written under names the server chooses: nothing a
client sends is ever opened as a path.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request

from htcli.core.strength import parse_strengths
from htcli.errors import HTError
from htcli.generate.request_fields import FIELDS, MAX_TEXT_CHARS
from htcli.generate.steer import SteerRequest
from htcli.serve.limits import MAX_FORM_TEXT_BYTES
from htcli.serve.service import FieldError, Limits, PixelBudget

UPLOADS = ("reference_images", "interventions")
SOURCES = ("concepts", "reference_images", "interventions")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # what reference images may be: Pillow is never asked to try another format
MAX_NAME_CHARS = 255  # an upload's file name
Files = dict[str, list[tuple[str, bytes]]]  # upload field -> (file name the client gave, bytes)
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
Word = Annotated[str, Field(max_length=32)]
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_JPEG_SCANS = 64  # a progressive JPEG has about 10; each scan is another pass over the pixels


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Concept(_Strict):
    name: Text
    weight: float = 1.0


class _Intervention(_Strict):
    data: str  # base64 of the .safetensors file
    weight: float = 1.0
    name: Annotated[str, Field(max_length=MAX_NAME_CHARS)] = ""


class Body(_Strict):
    """The fields of /v1/generate and /v1/intervention (docs/serve.md); JSON uploads are base64."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "cyberpunk city", "concepts": ["art deco:0.6", {"name": "ukiyo-e", "weight": 0.3}],
         "strength": [0, 0.5, 1], "seed": 7},
        {"prompt": "a lighthouse", "concepts": ["bauhaus@transformer_blocks.[01].*"], "layers": ["*.norm2"]}]})

    # The request's own fields: defaults, bounds and descriptions from their one declaration.
    prompt: str = FIELDS["prompt"].pydantic()
    concepts: list[Text | _Concept] = FIELDS["concepts"].pydantic()  # or {"name": ..., "weight": ...}
    strength: float | list[float] | None = FIELDS["strength"].pydantic()
    seed: int = FIELDS["seed"].pydantic()
    num_images: int = FIELDS["num_images"].pydantic()
    method: str = FIELDS["method"].pydantic()
    steer_steps: str = FIELDS["steer_steps"].pydantic()
    layers: list[Text] = FIELDS["layers"].pydantic()
    gap_correction: bool = FIELDS["gap_correction"].pydantic()
    refine: int | None = FIELDS["refine"].pydantic()
    reference_images: list[str] = Field([], description="Base64 PNG, JPEG or WebP images (or data: URLs).")
    interventions: list[str | _Intervention] = Field([], description="Base64 .safetensors intervention files.")


@dataclass
class Parsed:
    """A request ready for the service, holding the temporary folder its intervention uploads are
    in and its share of the server's decoded-pixel budget: `with parsed:` gives both back once the
    service has read them."""

    request: SteerRequest
    folder: tempfile.TemporaryDirectory
    names: dict[str, str] = field(default_factory=dict)  # upload's path in `folder` -> the name the client gave
    pixels: ExitStack = field(default_factory=ExitStack)  # the decoded images' hold on the PixelBudget

    def __enter__(self) -> Parsed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.folder.cleanup()
        self.pixels.close()

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


async def parse_request(request: Request, body: bytes, limits: Limits, budget: PixelBudget,
                        images: bool = True) -> Parsed:
    """Decode and check a request's body (JSON or a form, read already) into a `Parsed` request, off
    the event loop. `images`: whether the server takes reference images (else they are refused undecoded)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        fields, files = body, {name: [] for name in UPLOADS}  # parsed in the thread pool below
    elif kind in ("multipart/form-data", "application/x-www-form-urlencoded"):  # read_body bounds urlencoded ones
        # in a thread with its own event loop: a 15 MB form takes seconds to split
        fields, files = await run_in_threadpool(asyncio.run, _form(request.scope, body, limits))
    else:
        raise FieldError(f"send application/json or a form (multipart/form-data for uploads), "
                         f"not {kind[:60] or 'no content type'!r}", None, 415)
    return await run_in_threadpool(_build, fields, files, limits, budget, images)


def _json(body: bytes) -> dict:
    """The JSON body (its separators counted already, as it was read: `htcli.serve.limits.read_body`)."""
    try:
        fields = json.loads(body)  # NaN and Infinity parse, and are refused by field below
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FieldError(f"the body is not valid JSON: {error}") from None
    except RecursionError:
        raise FieldError("the body nests JSON too deeply") from None
    except ValueError as error:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise FieldError(f"the body holds a number too long to read: {str(error)[:120]}") from None
    if not isinstance(fields, dict):
        raise FieldError("the body must be a JSON object")
    _check_text(fields)
    return fields


def _check_text(fields: dict) -> None:
    """FieldError 422 when a string holds a lone surrogate ("\\ud800": valid JSON, not valid text),
    which would fail later, when it is encoded."""
    stack: list[tuple[str, Any]] = [(str(key), value) for key, value in fields.items()]
    while stack:
        key, value = stack.pop()
        texts = [value] if isinstance(value, str) else []
        if isinstance(value, list):
            stack += [(key, item) for item in value]
        elif isinstance(value, dict):
            texts += list(value)
            stack += [(key, item) for item in value.values()]
        if any(_SURROGATE.search(text) for text in texts):
            raise FieldError(f"{key[:60]} holds a lone UTF-16 surrogate, which is not text; send valid Unicode",
                             key[:60], 422)


async def _form(scope: dict, body: bytes, limits: Limits) -> tuple[dict, Files]:
    """A form's text fields as Body fields, and its uploads."""

    async def replay() -> dict:  # the body is read already (and capped): parse it from memory
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(scope, replay).form(max_files=limits.max_sources, max_fields=4 * limits.max_sources + 16,
                                                     max_part_size=MAX_FORM_TEXT_BYTES)  # a text part
    fields: dict[str, Any] = {}
    files: Files = {name: [] for name in UPLOADS}
    for key, value in form.multi_items():
        if key in UPLOADS:
            if not isinstance(value, UploadFile):
                raise FieldError(f"{key} takes files (curl -F '{key}=@FILE')", key)
            name = value.filename or ""
            if len(name) > MAX_NAME_CHARS:
                raise FieldError(f"{key}: the file name has {len(name)} characters; at most {MAX_NAME_CHARS}", key)
            files[key].append((name, await value.read()))
        elif isinstance(value, UploadFile):
            raise FieldError(f"{key[:60]} takes text, not a file", key[:60])
        elif key in ("concepts", "layers"):  # repeatable fields
            fields.setdefault(key, []).append(value)
        elif key == "strength":
            try:
                fields["strength"] = parse_strengths(value)
            except HTError as error:
                raise FieldError(str(error)[:300], "strength") from None
        else:
            fields[key] = value
    _check_text(fields)
    return fields, files


def _validated(fields: dict, strict: bool) -> Body:
    """The fields as a `Body`; JSON strictly (a seed must be a number), form text as the numbers it spells."""
    try:
        return Body.model_validate(fields, strict=strict)
    except ValidationError as error:
        # Of a union's alternatives, the error that got deepest says most ("concepts[0].weight", not "not a string").
        worst = max(error.errors(), key=lambda e: len(e["loc"]))
        known = set(Body.model_fields) | set(_Concept.model_fields) | set(_Intervention.model_fields)
        parts = [f"[{part}]" if isinstance(part, int) else f".{part}" for part in worst["loc"]
                 if isinstance(part, int) or part in known]  # not the union's type tags ("float", "_Concept")
        where = "".join(parts).lstrip(".")
        field_name = str(worst["loc"][0])[:60] if worst["loc"] else None  # an unknown field is named as sent: cut
        raise FieldError(f"{where}: {worst['msg']}" if where else worst["msg"], field_name, 422) from None


def _base64(text: str, where: str, field_name: str) -> bytes:
    payload = text.split(",", 1)[1] if text.startswith("data:") else text  # data URLs too
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(f"{where} is not base64 data", field_name) from None


def _opened(uploads: list[bytes], limits: Limits) -> list[Image.Image]:
    """The reference images, opened but not decoded: each one's format and size read from its
    header and checked, and the request's total, before any pixel is decoded."""
    opened, total = [], 0
    for i, data in enumerate(uploads):
        where = f"reference_images[{i}]"
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError:  # beyond Pillow's own limit: refused while reading the header
            raise FieldError(f"{where} has more than {limits.max_image_pixels} pixels, the most this server accepts",
                             "reference_images", 413) from None
        except (UnidentifiedImageError, OSError, ValueError):
            raise FieldError(f"{where} is not a PNG, JPEG or WebP image", "reference_images") from None
        if image.format == "JPEG" and data.count(b"\xff\xda") > MAX_JPEG_SCANS:  # SOS markers (0xFF is escaped in data)
            raise FieldError(f"{where} is a JPEG of more than {MAX_JPEG_SCANS} scans; re-save it as a baseline JPEG",
                             "reference_images", 413)
        if image.width * image.height > limits.max_image_pixels:
            raise FieldError(f"{where} has more than {limits.max_image_pixels} pixels, the most this server accepts "
                             f"({image.width}x{image.height})", "reference_images", 413)
        total += image.width * image.height
        if total > limits.max_request_pixels:
            raise FieldError(f"the reference images have more than {limits.max_request_pixels} pixels together, "
                             "the most this server accepts in one request", "reference_images", 413)
        opened.append(image)
    return opened


def _decoded(opened: list[Image.Image]) -> list[Image.Image]:
    decoded = []
    for i, image in enumerate(opened):
        try:
            with image:
                decoded.append(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError):  # a header that promised more than the data holds
            raise FieldError(f"reference_images[{i}] is truncated or corrupt", "reference_images") from None
    return decoded


def _count(fields: dict, files: Files, limits: Limits) -> None:
    """The sources, counted before any of them is validated or decoded."""
    limits.check_sources({name: (len(fields[name]) if isinstance(fields.get(name), list) else 0)
                          + len(files.get(name, ())) for name in SOURCES})


def _build(fields: dict | bytes, files: Files, limits: Limits, budget: PixelBudget, images: bool) -> Parsed:
    """Type-check the fields, decode the uploads (JSON's and the form's), and make the SteerRequest."""
    strict = isinstance(fields, bytes)
    fields = _json(fields) if strict else fields
    _count(fields, files, limits)
    body = _validated(fields, strict)
    if not images and (body.reference_images or files["reference_images"]):
        raise FieldError("reference images need an image encoder; this server's hypernetwork encodes text only",
                         "reference_images")
    images = [_base64(text, f"reference_images[{i}]", "reference_images") for i, text in enumerate(body.reference_images)]
    opened = _opened(images + [data for _, data in files["reference_images"]], limits)
    pixels = ExitStack()
    pixels.enter_context(budget.held(sum(image.width * image.height for image in opened)))
    with ExitStack() as on_error:
        on_error.callback(pixels.close)
        decoded = _decoded(opened)
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
                               layers=body.layers, refine=body.refine)
        on_error.pop_all()
    return Parsed(request, folder, names, pixels)
