"""What /openapi.json says of `ht serve`: both request bodies (JSON, and forms with file uploads)
and every status each route answers, with its schema.

The routes read their bodies themselves (`htcli.serve.parse`: a JSON body and a form go through
one model, `Body`), so FastAPI cannot infer them; `describe(route)` gives each route's
`openapi_extra`, and the JSON body's schema is `Body`'s own, so the two cannot drift apart.
`/docs`-style tools, generated clients and fuzzers (tests/test_serve_schema.py runs schemathesis)
read the same description.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from htcli.generate.request_fields import FIELDS
from htcli.serve.parse import Body

ERROR = {"type": "object", "required": ["error", "field"], "additionalProperties": False,
         "properties": {"error": {"type": "string"}, "field": {"type": ["string", "null"],
                                                               "description": "the field at fault; null: the request"}}}
_FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}
# The form's fields: the request's declared fields, as text (curl -F, the web page; repeatable fields
# repeat, a strength sweep is "0,0.5,1"); uploads are files.
_FORM_FIELDS: dict[str, Any] = {name: field.form_schema() for name, field in FIELDS.items()}
_FORM = {"type": "object", "additionalProperties": False,
         "properties": _FORM_FIELDS | {"reference_images": _FILES, "interventions": _FILES}}
_URLENCODED = {"type": "object", "additionalProperties": False, "properties": _FORM_FIELDS}
REQUEST_BODY = {"required": True, "content": {  # the schemas are components: FastAPI would turn big integers to floats
    "application/json": {"schema": {"$ref": "#/components/schemas/Body"}},
    "multipart/form-data": {"schema": {"$ref": "#/components/schemas/Form"}, "encoding": {"reference_images": {"contentType": "image/png, image/jpeg, image/webp"},
                                                          "interventions": {"contentType": "application/octet-stream"}}},
    "application/x-www-form-urlencoded": {"schema": {"$ref": "#/components/schemas/UrlencodedForm"}}}}

_NUMBER = {"type": "number"}
_IMAGE = {"type": "object", "required": ["png", "label", "metadata", "batch_size", "queue_ms", "generate_ms"],
          "properties": {"png": {"type": "string", "description": "base64 PNG, its metadata in a text chunk 'ht'"},
                         "label": {"type": "string"}, "metadata": {"type": "object", "description": "ht steer's sidecar"},
                         "batch_size": {"type": "integer"}, "queue_ms": _NUMBER, "generate_ms": _NUMBER}}
_SOURCE = {"type": "object", "required": ["source", "nearest_training_concepts", "ood"],
           "properties": {"source": {"type": "string"}, "ood": {"type": ["boolean", "null"]},
                          "nearest_training_concepts": {"type": "array", "items": {
                              "type": "object", "properties": {"name": {"type": "string"}, "similarity": _NUMBER}}}}}
GENERATED = {"type": "object", "required": ["images", "columns", "notes", "sources", "timings"], "properties": {
    "images": {"type": "array", "items": _IMAGE}, "columns": {"type": "integer"},
    "notes": {"type": "array", "items": {"type": "string"}}, "sources": {"type": "array", "items": _SOURCE},
    "timings": {"type": "object", "properties": {"maps_ms": {"type": ["number", "null"]}, "queue_ms": _NUMBER,
                                                 "generate_ms": _NUMBER, "total_ms": _NUMBER}}}}

_REFUSALS = {  # status -> when (every POST route)
    400: "a field the server refuses (named in `field`), a body that is not JSON (or nests too deeply, or holds a "
         "number too long to read), a damaged intervention file, reference images to a text-only encoder, or a Host "
         "header that does not name this server (`field`: Host)",
    403: "a cross-origin POST from a browser (`field`: Origin or Sec-Fetch-Site)",
    408: "the body did not arrive within --body-timeout-s, or the headers within --header-timeout-s (the connection "
         "is then closed)",
    413: "a body over --max-body-mb (a urlencoded form: over 256 KiB), a JSON body of more than 10000 items, keys, "
         "lists or objects (refused as it arrives), a reference image "
         "over --max-image-pixels (or a JPEG of more than 64 scans), or reference images over --max-request-pixels "
         "together",
    415: "a body that is neither JSON nor a form",
    422: "a field of the wrong type or length, an unknown field, or text holding a lone UTF-16 surrogate",
    429: "--max-queue requests already in progress, too many pixels being decoded at once, or another request "
         "refining; retry after Retry-After",
    431: "request headers over 16 KiB, or more than 64 header fields",
    499: "the client disconnected before its images were made (their generation is cancelled; nobody receives this)",
    500: "a bug in the server: a generic message (the server's log has the traceback)",
    503: "--max-connections connections open and none idle to close, the model process stopped (ht serve then "
         "exits), or (--replicas) the replica answering died and so did the retry; retry after Retry-After",
}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _bad_host() -> dict:
    return {"400": _json({"$ref": "#/components/schemas/Error"}, "a Host header that does not name this server")}


def describe(route: str) -> dict:
    """The `openapi_extra` of a route: "generate", "intervention", "health", "concepts" or "page"."""
    if route in ("generate", "intervention"):
        ok = _json(GENERATED, "the images, in ht steer's grid order") if route == "generate" else {
            "description": "the composed intervention, a .safetensors file (what ht inspect and ht steer -i read)",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
        refusals = {str(status): _json({"$ref": "#/components/schemas/Error"}, why) for status, why in _REFUSALS.items()}
        for status in ("429", "503"):
            refusals[status]["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
        refusals["499"] = {"description": _REFUSALS[499]}
        return {"requestBody": REQUEST_BODY, "responses": {"200": ok} | refusals}
    ok = {"page": {"description": "the web page", "content": {"text/html": {"schema": {"type": "string"}}}},
          "health": _json({"type": "object"}, "model, hypernetwork, device, queue, batching, cache, limits, defaults (the strength the page starts at), replica"),
          "concepts": _json({"type": "object", "properties": {"concepts": {"type": "array"}}}, "the concept library")}
    return {"responses": {"200": ok[route]} | _bad_host()}


def document(app: FastAPI) -> None:
    """Give `app` an /openapi.json with the schemas the routes refer to: `Body` (and its parts) and `Error`."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            body = Body.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas |= body.pop("$defs", {}) | {"Body": body, "Form": _FORM, "UrlencodedForm": _URLENCODED, "Error": ERROR}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
