"""The HTTP side of `ht serve`: FastAPI routes on uvicorn, errors as JSON, the web page, the server.

    POST /v1/generate      prompt, concepts, strength... -> PNG images with `ht steer`'s sidecar metadata
    POST /v1/intervention  the same sources -> their composed intervention file (what `ht inspect` reads)
    GET  /v1/concepts      the concept library
    GET  /v1/health        model, hypernetwork digest, device, queue, batching and cache counters
    GET  /                 the web page

Bodies are JSON or forms (`htcli.serve.parse`), both described in /openapi.json
(`htcli.serve.schema`). A bad request is answered 4xx with `{"error": ..., "field": ...}`, never
a 500, and the server keeps serving; foreign Host names and cross-origin POSTs are refused
before any route runs (`htcli.serve.guard`). Connections, headers and bodies are bounded below
the routes (`htcli.serve.limits`): a body is read whole, under a deadline, before its request
takes a place in the queue. A client that disconnects while its images wait cancels them.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from htcli import __version__
from htcli.core.runtime import Cancelled, cancellable
from htcli.errors import HTError
from htcli.generate.batch import Planned
from htcli.generate.steer import Steered
from htcli.serve.batching import Produced
from htcli.serve.guard import Guard, page_policy
from htcli.serve.limits import HeaderCount, hung_up, read_body, server_config
from htcli.serve.parse import Parsed, parse_request
from htcli.serve.schema import describe, document
from htcli.serve.service import FieldError, Service

DEFAULT_HOST = "127.0.0.1"

T = TypeVar("T")


def _error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


def _png(image: Image.Image, metadata: dict) -> str:
    """Base64 PNG carrying its sidecar metadata as a text chunk ("ht"), so a saved image keeps it."""
    info = PngInfo()
    info.add_text("ht", json.dumps(metadata))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _sources(steered: Steered) -> list[dict]:
    """Per predicted source (concepts, reference images): its nearest training concepts and whether
    it is out of distribution (None: the hypernetwork cannot tell), as `ht steer` prints them."""
    return [{"source": record["source"], "nearest_training_concepts": record["nearest_training_concepts"],
             "ood": record["ood"]} for record in steered.neighbours]


def _generated(planned: Planned, produced: list[Produced], parsed: Parsed, start: float) -> dict:
    """The JSON answer of /v1/generate."""
    steered = planned.fill([p.image for p in produced])
    images = []
    for item, made in zip(steered.images, produced):
        metadata = item.metadata | {"sources": parsed.renamed(item.metadata["sources"])}
        images.append({"png": _png(item.image, metadata), "label": item.label, "metadata": metadata,
                       "batch_size": made.batch_size, "queue_ms": made.queue_ms, "generate_ms": made.generate_ms})
    timings = {"maps_ms": steered.intervention_ms, "queue_ms": max(p.queue_ms for p in produced),
               "generate_ms": max(p.generate_ms for p in produced), "total_ms": (time.perf_counter() - start) * 1e3}
    return {"images": images, "columns": steered.columns, "notes": steered.notes,
            "sources": _sources(steered), "timings": timings}


async def _until_disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read already: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _cancellable(gone: threading.Event, work: Callable[..., T], *args: Any) -> T:
    with cancellable(gone):
        return work(*args)


async def _unless_gone(request: Request, work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` in a worker thread, stopped at its next step (`Cancelled`) if the client
    disconnects first: a refine's LinEAS steps and captures are not paid for nobody."""
    gone = threading.Event()
    watcher = asyncio.ensure_future(_until_disconnected(request))
    watcher.add_done_callback(lambda _: gone.set())  # also when the request is cancelled (Ray Serve)
    try:
        return await run_in_threadpool(_cancellable, gone, work, *args)
    finally:
        watcher.cancel()


async def _produced(request: Request, futures: list) -> list[Produced] | None:
    """The images of `futures`, or None when the client disconnects first: then the images not
    yet generated are cancelled, and the batcher drops them."""
    images = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait((images, gone), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the request itself was cancelled (Ray Serve, when its client left)
        images.cancel()
        gone.cancel()
        raise
    if images.done():
        gone.cancel()
        return images.result()
    images.cancel()  # cancels each wrapped future, and so the batcher's own: it drops them
    return None


def _intervention_bytes(service: Service, parsed: Parsed) -> bytes:
    """The composed intervention of the request's sources, as the bytes of an intervention file."""
    intervention = service.intervention(parsed.request)
    intervention.info["sources"] = parsed.renamed(intervention.info.get("sources", []))
    with tempfile.TemporaryDirectory(prefix="ht-serve-") as folder:
        path = Path(folder) / "intervention.safetensors"
        intervention.save(path)
        return path.read_bytes()


def create_app(service: Service, allowed_hosts: Sequence[str] = ()) -> FastAPI:
    """The FastAPI application serving `service`, answering to loopback names and `allowed_hosts`."""
    app = FastAPI(title="ht serve", version=__version__, docs_url=None, redoc_url=None)
    app.add_middleware(Guard, allowed_hosts=allowed_hosts)
    app.add_middleware(HeaderCount)
    page = Path(__file__).with_name("page.html").read_text(encoding="utf-8")
    page_headers = page_policy(page)
    images = service.predictor.encoder.has_images
    replica = {"X-HT-Replica": service.replica}

    @app.exception_handler(FieldError)
    async def refused(request: Request, error: FieldError) -> JSONResponse:
        return _error(error.status, str(error), error.field, {"Retry-After": "1"} if error.status == 429 else None)

    @app.exception_handler(HTError)
    async def rejected(request: Request, error: HTError) -> JSONResponse:
        return _error(400, str(error))  # what steer() refuses about the request as a whole

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail), headers=error.headers)  # 405 keeps its Allow header

    @app.exception_handler(ClientDisconnect)
    async def left(request: Request, error: ClientDisconnect) -> Response:
        hung_up(request, error)
        return Response(status_code=499)  # nobody reads it: the client has gone

    @app.get("/", response_class=HTMLResponse, openapi_extra=describe("page"))
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=page_headers)

    @app.get("/v1/health", openapi_extra=describe("health"))
    async def health() -> JSONResponse:
        return JSONResponse(service.health(), headers=replica)

    @app.get("/v1/concepts", openapi_extra=describe("concepts"))
    async def concepts() -> dict:
        return {"concepts": service.concepts()}

    @app.post("/v1/generate", openapi_extra=describe("generate"))
    async def generate(request: Request) -> Response:
        start = time.perf_counter()
        body = await read_body(request, service.limits)  # before admission: a stalled body holds no place
        with service.admitted():
            with await parse_request(request, body, service.limits, service.pixels, images) as parsed:
                try:
                    planned = await _unless_gone(request, service.prepare, parsed.request)
                except Cancelled:
                    return Response(status_code=499)  # the client left while its concepts were refined
                except HTError as error:
                    raise parsed.scrubbed(error) from None
            produced = await _produced(request, service.batcher.submit(planned.samples))
            if produced is None:
                return Response(status_code=499)  # nginx's "client closed request": for the log, nobody reads it
            answer = await run_in_threadpool(_generated, planned, produced, parsed, start)
            return JSONResponse(answer, headers=replica)

    @app.post("/v1/intervention", openapi_extra=describe("intervention"))
    async def intervention(request: Request) -> Response:
        body = await read_body(request, service.limits)
        with service.admitted():
            with await parse_request(request, body, service.limits, service.pixels, images) as parsed:
                try:
                    data = await _unless_gone(request, _intervention_bytes, service, parsed)
                except Cancelled:
                    return Response(status_code=499)
                except HTError as error:
                    raise parsed.scrubbed(error) from None
        return Response(data, media_type="application/octet-stream", headers=replica | {
            "Content-Disposition": 'attachment; filename="intervention.safetensors"'})

    document(app)
    return app


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise HTError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_server(service: Service, host: str = DEFAULT_HOST, port: int = 8000,
               on_ready: Callable[[str], None] | None = None, log_level: str = "info",
               allowed_hosts: Sequence[str] = ()) -> None:
    """Serve `service` until interrupted; `on_ready(url)` once the port is bound. Closes `service`."""
    sock = _bind(host, port)
    app = create_app(service, allowed_hosts)
    server = uvicorn.Server(server_config(app, service.limits, log_level))
    if on_ready is not None:
        on_ready(_url(sock))
    try:
        server.run(sockets=[sock])
    finally:
        service.close()
        sock.close()


@contextmanager
def running(service: Service, host: str = DEFAULT_HOST, port: int = 0, timeout_s: float = 30.0,
            allowed_hosts: Sequence[str] = ()) -> Iterator[str]:
    """Serve `service` from a background thread for the `with` block (tests, benchmarks): yields
    its base URL (port 0: any free port). The caller closes `service`."""
    sock = _bind(host, port)
    server = uvicorn.Server(server_config(create_app(service, allowed_hosts), service.limits, "warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="ht-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise HTError(f"the server did not start within {timeout_s:g} s")
        time.sleep(0.02)
    try:
        yield _url(sock)
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
