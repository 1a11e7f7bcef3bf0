"""`ht serve` beyond one process: the same FastAPI app as a Ray Serve application, one replica
per GPU, each with its own pipeline, hypernetwork, map cache and batcher.

    ht serve --model pixart --replicas 4              # a local Ray instance, 4 replicas (one GPU each on CUDA)
    serve run htcli.serve.replicas:build model=pixart replicas=4     # the same app under Ray's own CLI

Ray's HTTP proxy takes the requests and hands each to a replica; a replica is an `HtReplica`
actor that loads a `Service` (`load_service`) and answers through `create_app`, so a request
gets the same checks, the same `steer()` and the same images as from a single `ht serve`
process, and the replica that answered names itself in the `X-HT-Replica` header and in
/v1/health. Batching happens within a replica. Needs the ray extra: pip install -e ".[ray]".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from htcli.errors import HTError
from htcli.serve.app import create_app
from htcli.serve.service import Limits, load_service

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
@serve.ingress()
class HtReplica:
    """One replica: a `Service` of its own behind `create_app`."""

    def __init__(self, options: ReplicaOptions) -> None:
        hyper = Path(options.hyper) if options.hyper else None
        self.service = load_service(options.model, hyper, options.model_path, options.device, Limits(**options.limits))
        context = serve.get_replica_context()
        self.service.replica = f"{context.replica_id.unique_id}@{self.service.replica}"
        self.allowed_hosts = options.allowed_hosts

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.service, self.allowed_hosts)

    def __del__(self) -> None:
        self.service.close()


def check_replicas(replicas: int) -> int:
    if replicas < 1:
        raise HTError(f"replicas= must be at least 1, got {replicas}")
    return replicas


def application(options: ReplicaOptions, replicas: int, gpus_per_replica: float) -> Any:
    """The Ray Serve application: `replicas` copies of `HtReplica`, each given `gpus_per_replica` GPUs."""
    actor = {"num_gpus": gpus_per_replica, "num_cpus": 1}
    # Ray queues what a replica will not take; a replica takes twice its --max-queue, so that its own
    # admission answers 429 when it is full, as a single `ht serve` does.
    ongoing = 2 * options.limits.get("max_queue", Limits().max_queue)
    return HtReplica.options(num_replicas=replicas, ray_actor_options=actor, max_ongoing_requests=ongoing).bind(options)


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
    if started_ray:
        ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(options, replicas, gpus), name=APP_NAME, route_prefix="/")
        if on_ready is not None:
            on_ready(f"http://{host}:{port}")
        while not stop():
            time.sleep(0.5)
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()


def replica_options(model: str | None, hyper: Path | None, model_path: str | None, device: str | None, limits: Limits,
                    allowed_hosts: Sequence[str]) -> ReplicaOptions:
    return ReplicaOptions(model, str(hyper) if hyper else None, model_path, device, asdict(limits), tuple(allowed_hosts))
