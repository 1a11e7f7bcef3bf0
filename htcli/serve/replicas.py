"""`ht serve` beyond one process: the same FastAPI app as a Ray Serve application, one replica
per GPU, each with its own pipeline, hypernetwork, map cache and batcher.

    ht serve --model pixart --replicas 4              # a local Ray instance, 4 replicas (one GPU each on CUDA)
    serve run htcli.serve.replicas:build model=pixart replicas=4     # the same app under Ray's own CLI

Ray's HTTP proxy takes the requests and hands each to `HtFront`, a light deployment (no model)
that reads the body (within the same limits as `ht serve`: `htcli.serve.limits.read_body`) and
passes the request to a replica. A replica is an `HtReplica` actor that loads a `Service`
(`load_service`) and answers through `create_app`, so a request gets the same checks, the same
`steer()` and the same images as from a single `ht serve` process, and the replica that answered
names itself in the `X-HT-Replica` header and in /v1/health. Batching happens within a replica.

A replica that dies mid-request loses nothing: the front sends the request once more, to
another replica (generation is deterministic: the same images), and if that fails too answers
a JSON 503 with Retry-After (Ray's proxy would answer a plain-text 500). Needs the ray extra:
pip install -e ".[ray]".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from htcli.errors import HTError
from htcli.serve.app import create_app
from htcli.serve.limits import read_body
from htcli.serve.service import FieldError, Limits, load_service

APP_NAME = "ht-serve"


@dataclass(frozen=True)
class ReplicaOptions:
    """What each replica loads, and how it answers: `load_service`'s arguments and the Host names."""

    model: str | None = None
    hyper: str | None = None
    model_path: str | None = None
    device: str | None = None
    limits: dict = field(default_factory=dict)  # Limits fields
    allowed_hosts: tuple[str, ...] = ()


@serve.deployment(name="ht-serve")
class HtReplica:
    """One replica: a `Service` of its own behind `create_app`, answering whole requests from the front."""

    def __init__(self, options: ReplicaOptions) -> None:
        hyper = Path(options.hyper) if options.hyper else None
        self.service = load_service(options.model, hyper, options.model_path, options.device, Limits(**options.limits))
        context = serve.get_replica_context()
        self.service.replica = f"{context.replica_id.unique_id}@{self.service.replica}"
        self.app = create_app(self.service, options.allowed_hosts)

    async def answer(self, scope: dict, body: bytes) -> tuple[int, list, bytes]:
        """(status, headers, body) of the request `scope` with `body`, run through the app here. The
        front holds the client: when it leaves, Ray cancels this call, and the app its images."""
        sent: list[dict] = [{"type": "http.request", "body": body, "more_body": False}]
        started: dict = {}
        chunks: list[bytes] = []

        async def receive() -> dict:
            if sent:
                return sent.pop()
            await asyncio.Event().wait()  # no disconnect comes through here: cancellation does
            raise AssertionError("unreachable")

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                started.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope | {"asgi": {"version": "3.0"}, "state": {}}, receive, send)
        return started["status"], started.get("headers", []), b"".join(chunks)

    def __del__(self) -> None:
        self.service.close()


_SCOPE_KEYS = ("type", "http_version", "method", "scheme", "path", "raw_path", "query_string", "root_path", "headers",
               "client", "server")


@serve.deployment(name="ht-front")
@serve.ingress()
class HtFront:
    """What Ray's proxy hands requests to: reads each body, asks a replica, and asks another once
    when the first dies; a JSON 503 with Retry-After when both do."""

    def __init__(self, replicas: Any, limits: dict) -> None:
        self.replicas, self.limits = replicas, Limits(**limits)

    def __serve_build_asgi_app__(self) -> Any:
        async def app(scope: dict, receive: Any, send: Any) -> None:  # a function: uvicorn takes it for ASGI 3
            await self._asgi(scope, receive, send)

        return app

    async def _asgi(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":  # nothing to start or stop
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        try:
            body = await read_body(Request(scope, receive), self.limits)
        except FieldError as error:
            await JSONResponse({"error": str(error), "field": None}, error.status)(scope, receive, send)
            return
        except ClientDisconnect:
            return
        portable = {key: scope[key] for key in _SCOPE_KEYS if key in scope}
        for attempt in range(2):
            try:
                status, headers, content = await self.replicas.answer.remote(portable, body)
                break
            except (RayActorError, ActorUnavailableError):  # the replica died or is unreachable
                if attempt:
                    message = "the replica answering this request stopped, and so did the retry; retry shortly"
                    await JSONResponse({"error": message, "field": None}, 503, {"Retry-After": "1"})(scope, receive, send)
                    return
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})


def check_replicas(replicas: int) -> int:
    if replicas < 1:
        raise HTError(f"replicas= must be at least 1, got {replicas}")
    return replicas


def application(options: ReplicaOptions, replicas: int, gpus_per_replica: float) -> Any:
    """The Ray Serve application: `HtFront` before `replicas` copies of `HtReplica`, each given
    `gpus_per_replica` GPUs."""
    actor = {"num_gpus": gpus_per_replica, "num_cpus": 1}
    # Ray queues what a replica will not take; a replica takes twice its --max-queue, so that its own
    # admission answers 429 when it is full, as a single `ht serve` does.
    ongoing = 2 * options.limits.get("max_queue", Limits().max_queue)
    workers = HtReplica.options(num_replicas=replicas, ray_actor_options=actor, max_ongoing_requests=ongoing).bind(options)
    return HtFront.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=replicas * ongoing + 16).bind(
        workers, options.limits)


def build(args: dict[str, str]) -> Any:
    """The application for Ray's `serve run htcli.serve.replicas:build model=... replicas=N [gpus=1] ...`
    (every `ReplicaOptions` field but limits and allowed_hosts, as text)."""
    known = {"model", "hyper", "model_path", "device", "replicas", "gpus"}
    unknown = set(args) - known
    if unknown:
        raise HTError(f"unknown arguments {sorted(unknown)}; build takes {sorted(known)}")
    options = ReplicaOptions(**{k: args[k] for k in ("model", "hyper", "model_path", "device") if k in args})
    return application(options, check_replicas(int(args.get("replicas", 1))), float(args.get("gpus", 0)))


def serve_replicas(options: ReplicaOptions, replicas: int, host: str = "127.0.0.1", port: int = 8000,
                   on_ready: Callable[[str], None] | None = None, address: str | None = None,
                   stop: Callable[[], bool] = lambda: False) -> None:
    """Start Ray (or join the cluster at `address`), serve `replicas` replicas on host:port until
    interrupted (or `stop()` says so), then shut the application down. One GPU per replica when
    CUDA is there and no device is forced to the CPU."""
    import ray
    import torch

    check_replicas(replicas)
    gpus = 1.0 if torch.cuda.is_available() and (options.device or "cuda").startswith("cuda") else 0.0
    started_ray = not ray.is_initialized()
    before = set(_descendants())
    if started_ray:
        ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)
    if threading.current_thread() is threading.main_thread():  # after ray.init, whose own handler aborts the process
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # unwinds through the shutdowns
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(options, replicas, gpus), name=APP_NAME, route_prefix="/")
        if on_ready is not None:
            on_ready(f"http://{host}:{port}")
        while not stop():
            time.sleep(0.5)
    finally:
        ours = set(_descendants()) - before  # Ray's processes: read before shutdown reparents them
        serve.shutdown()
        if started_ray:
            ray.shutdown()
            _stop(ours)


def _descendants() -> list[int]:
    """Ids of the processes this one started, and theirs, ... (read from /proc; none elsewhere)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    found, frontier = [], {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier}
        found += frontier
    return found


def _stop(pids: set[int], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`, the processes of `pids` still alive: Ray's dashboard
    and runtime-env agents outlive `ray.shutdown()`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if Path(f"/proc/{pid}").exists()]
            time.sleep(0.1)


def replica_options(model: str | None, hyper: Path | None, model_path: str | None, device: str | None, limits: Limits,
                    allowed_hosts: Sequence[str]) -> ReplicaOptions:
    return ReplicaOptions(model, str(hyper) if hyper else None, model_path, device, asdict(limits), tuple(allowed_hosts))
