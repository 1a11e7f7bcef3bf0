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
takes a place in the queue. The routes ask an `Engine` (`htcli.serve.engine`) for the images:
a `Service` in this process, or, in `ht serve`, the model in a process of its own
(`htcli.serve.model_process`) while these threads run at a lower CPU priority. A client that
disconnects while its request is planned or its images wait cancels it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from htcli import __version__
from htcli.errors import HTError
from htcli.generate.steer import Steered
from htcli.models.interventions import Intervention
from htcli.serve.engine import FAILED, Answer, Engine, LocalEngine
from htcli.serve.guard import Guard, page_policy
from htcli.serve.limits import HeaderCount, hung_up, read_body, server_config
from htcli.serve.parse import Parsed, parse_request
from htcli.serve.schema import describe, document
from htcli.serve.service import FieldError, Service

DEFAULT_HOST = "127.0.0.1"
FRONT_NICENESS = 10  # `ht serve`'s HTTP side runs this far below the model's CPU priority (Linux nice)

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


def _generated(answer: Answer, parsed: Parsed, start: float) -> dict:
    """The JSON answer of /v1/generate."""
    steered, images = answer.steered, []
    for item, (batch_size, queue_ms, generate_ms) in zip(steered.images, answer.batches):
        metadata = item.metadata | {"sources": parsed.renamed(item.metadata["sources"])}
        images.append({"png": _png(item.image, metadata), "label": item.label, "metadata": metadata,
                       "batch_size": batch_size, "queue_ms": queue_ms, "generate_ms": generate_ms})
    timings = {"maps_ms": steered.intervention_ms, "queue_ms": max(b[1] for b in answer.batches),
               "generate_ms": max(b[2] for b in answer.batches), "total_ms": (time.perf_counter() - start) * 1e3}
    return {"images": images, "columns": steered.columns, "notes": steered.notes,
            "sources": _sources(steered), "timings": timings}


async def _until_disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read already: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, work: Awaitable[T]) -> T | None:
    """The result of `work`, or None when the client disconnects first: then `work` is cancelled,
    and the engine drops the request's images not yet generated and stops its refine."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the request itself was cancelled (Ray Serve, when its client left)
        task.cancel()
        gone.cancel()
        raise
    gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait([task])  # until the engine has stopped it: what the request holds is given back after
    return None


def _intervention_bytes(intervention: Intervention, parsed: Parsed) -> bytes:
    """The composed intervention, its sources named as the client named them, as an intervention file's bytes."""
    intervention.info["sources"] = parsed.renamed(intervention.info.get("sources", []))
    with tempfile.TemporaryDirectory(prefix="ht-serve-") as folder:
        path = Path(folder) / "intervention.safetensors"
        intervention.save(path)
        return path.read_bytes()


def create_app(engine: Engine | Service, allowed_hosts: Sequence[str] = ()) -> FastAPI:
    """The FastAPI application serving `engine` (a `Service` runs in this process), answering to
    loopback names and `allowed_hosts`."""
    engine = LocalEngine(engine) if isinstance(engine, Service) else engine
    limits = engine.limits
    app = FastAPI(title="ht serve", version=__version__, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.add_middleware(Guard, allowed_hosts=allowed_hosts)
    app.add_middleware(HeaderCount)
    page = Path(__file__).with_name("page.html").read_text(encoding="utf-8")
    page_headers = page_policy(page)
    replica = {"X-HT-Replica": engine.replica}

    @app.exception_handler(FieldError)
    async def refused(request: Request, error: FieldError) -> JSONResponse:
        return _error(error.status, str(error), error.field, {"Retry-After": "1"} if error.status in (429, 503) else None)

    @app.exception_handler(HTError)
    async def rejected(request: Request, error: HTError) -> JSONResponse:
        return _error(400, str(error))  # what steer() refuses about the request as a whole

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail), headers=error.headers)  # 405 keeps its Allow header

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:  # a bug: logged whole, not sent
        return _error(500, FAILED)

    @app.exception_handler(ClientDisconnect)
    async def left(request: Request, error: ClientDisconnect) -> Response:
        hung_up(request, error)
        return Response(status_code=499)  # nobody reads it: the client has gone

    @app.get("/", response_class=HTMLResponse, openapi_extra=describe("page"))
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=page_headers)

    @app.get("/v1/health", openapi_extra=describe("health"))
    async def health() -> JSONResponse:
        return JSONResponse(await engine.health(), headers=replica)

    @app.get("/v1/concepts", openapi_extra=describe("concepts"))
    async def concepts() -> dict:
        return {"concepts": await engine.concepts()}

    @contextlib.asynccontextmanager
    async def parsed_request(request: Request) -> AsyncIterator[Parsed]:
        """The request's body read (before admission: a stalled body holds no place), counted in
        and parsed; the engine's refusals name uploads as the client named them."""
        body = await read_body(request, limits)
        with engine.admission.admitted():
            with await parse_request(request, body, limits, engine.pixels, engine.images) as parsed:
                try:
                    yield parsed
                except HTError as error:
                    raise parsed.scrubbed(error) from None

    @app.post("/v1/generate", openapi_extra=describe("generate"))
    async def generate(request: Request) -> Response:
        start = time.perf_counter()
        async with parsed_request(request) as parsed:
            answer = await _unless_gone(request, engine.generate(parsed.request))
            if answer is None:
                return Response(status_code=499)  # nginx's "client closed request": for the log, nobody reads it
            data = await run_in_threadpool(_generated, answer, parsed, start)
        return JSONResponse(data, headers=replica)

    @app.post("/v1/intervention", openapi_extra=describe("intervention"))
    async def intervention(request: Request) -> Response:
        async with parsed_request(request) as parsed:
            composed = await _unless_gone(request, engine.intervention(parsed.request))
            if composed is None:
                return Response(status_code=499)
            data = await run_in_threadpool(_intervention_bytes, composed, parsed)
        return Response(data, media_type="application/octet-stream", headers=replica | {
            "Content-Disposition": 'attachment; filename="intervention.safetensors"'})

    document(app)
    return app


def listen(host: str = DEFAULT_HOST, port: int = 0) -> socket.socket:
    """A socket listening on host:port (0: any free port); HTError naming the address when it cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # from here connections wait for uvicorn: a client told the URL is never refused
    except OSError as error:
        sock.close()
        raise HTError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def lower_priority(niceness: int) -> None:
    """Lower the calling thread's CPU priority by `niceness`, and so that of the threads it starts
    (Linux: nice is per thread; elsewhere this process's). It may never be raised back."""
    if niceness:
        os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + niceness))


def run_server(engine: Engine | Service, sock: socket.socket, on_ready: Callable[[str], None] | None = None,
               log_level: str = "info", allowed_hosts: Sequence[str] = (), niceness: int = FRONT_NICENESS) -> None:
    """Serve `engine` on `sock` (from `listen`) until interrupted, or until its model process stops
    (HTError); `on_ready(url)` once it is about to serve. The HTTP side runs `niceness` below the
    model. Closes `engine` and `sock`."""
    try:
        app = create_app(engine, allowed_hosts)
        engine = app.state.engine
        server = uvicorn.Server(server_config(app, engine.limits, log_level))
        engine.on_lost = lambda: setattr(server, "should_exit", True)
        if on_ready is not None:
            on_ready(_url(sock))
        lower_priority(niceness)
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
    if engine.lost:
        raise HTError(engine.lost)


@contextmanager
def running(engine: Engine | Service, host: str = DEFAULT_HOST, port: int = 0, timeout_s: float = 30.0,
            allowed_hosts: Sequence[str] = (), niceness: int = 0) -> Iterator[str]:
    """Serve `engine` from a background thread for the `with` block (tests, benchmarks), its
    threads `niceness` below the caller's: yields its base URL (port 0: any free port). The caller
    closes `engine`."""
    sock = listen(host, port)
    app = create_app(engine, allowed_hosts)
    server = uvicorn.Server(server_config(app, app.state.engine.limits, "warning"))

    def serve() -> None:
        lower_priority(niceness)
        server.run(sockets=[sock])

    thread = threading.Thread(target=serve, name="ht-serve", daemon=True)
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
