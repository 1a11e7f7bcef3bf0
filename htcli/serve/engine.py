"""The model side of `ht serve`, as the HTTP side sees it: an `Engine` plans and generates
requests that have been read, parsed and checked field by field.

    engine = LocalEngine(load_service("tiny"))               # the model in this process (tests, Ray replicas)
    engine = ProcessEngine(dict(model="tiny"), Limits())     # the model in a process of its own (`ht serve`)
    answer = await engine.generate(SteerRequest("a lighthouse", concepts=["art deco"]))

Every call is a coroutine that honours cancellation: the routes cancel it when the client hangs
up, and the engine then drops the request's images not yet generated and stops a refine at its
next LinEAS step or capture. What the HTTP side bounds before a request reaches the engine (how
many requests are in, how many decoded pixels they hold) lives with the engine's `admission` and
`pixels`, in the process that reads the requests.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from htcli.core.runtime import cancellable
from htcli.generate.steer import Steered, SteerRequest
from htcli.models.interventions import Intervention
from htcli.serve.service import Admission, Limits, PixelBudget, Service

T = TypeVar("T")
FAILED = "the server failed on this request (its log says why)"  # a bug's answer (500): no internals to clients


@dataclass(frozen=True)
class Answer:
    """A generated request: `steered` with its images, and how each image was made."""

    steered: Steered
    batches: list[tuple[int, float, float]]  # per image: samples in its pipeline call, ms queued, ms generating


class Engine(ABC):
    """What the routes ask of the model: `generate`, `intervention`, `health`, `concepts`, each
    cancellable; `images`: whether its encoder takes reference images; `replica`: who answers."""

    limits: Limits
    images: bool
    replica: str
    admission: Admission
    pixels: PixelBudget
    on_lost: Callable[[], None] | None = None  # called if the model stops by itself (a process of its own can)
    lost: str | None = None  # why it stopped, then

    @abstractmethod
    async def generate(self, request: SteerRequest) -> Answer:
        """Plan `request` (maps predicted or cached, composed) and generate its images."""

    @abstractmethod
    async def intervention(self, request: SteerRequest) -> Intervention:
        """The composed intervention of `request`'s sources, its maps on the CPU."""

    @abstractmethod
    async def health(self) -> dict:
        """What /v1/health answers."""

    @abstractmethod
    async def concepts(self) -> list[dict]:
        """The concept library: name, category, held out or not."""

    @abstractmethod
    def close(self) -> None:
        """Stop generating; what is queued fails."""


def _until_cancelled(gone: threading.Event, work: Callable[..., T], *args: Any) -> T:
    with cancellable(gone):
        return work(*args)


async def in_thread(work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` in a worker thread; cancelling the await stops it at its next step (`Cancelled`)
    and returns once it has stopped: a refine's LinEAS steps and captures are not paid for nobody,
    and what the request holds (uploads, queue place) is not given back while it still runs."""
    gone = threading.Event()
    thread = asyncio.ensure_future(asyncio.to_thread(_until_cancelled, gone, work, *args))
    try:
        return await asyncio.shield(thread)
    except asyncio.CancelledError:
        gone.set()
        await asyncio.wait([thread])
        raise


def _intervention(service: Service, request: SteerRequest) -> Intervention:
    """The composed intervention, its maps on the CPU (as a file holds them, whatever the pipeline's device)."""
    intervention = service.intervention(request)
    maps = {layer: (omega.cpu(), beta.cpu()) for layer, (omega, beta) in intervention.maps.items()}
    return replace(intervention, maps=maps)


class LocalEngine(Engine):
    """A `Service` in this process: planning in worker threads, generation in its batcher's thread."""

    def __init__(self, service: Service) -> None:
        self.service, self.limits = service, service.limits
        self.images = service.predictor.encoder.has_images
        self.replica = service.replica
        self.admission, self.pixels = service.admission, service.pixels

    async def generate(self, request: SteerRequest) -> Answer:
        planned = await in_thread(self.service.prepare, request)
        # Cancelled while waiting: each wrapped future cancels the batcher's own, which drops its sample.
        produced = await asyncio.gather(*(asyncio.wrap_future(f) for f in self.service.batcher.submit(planned.samples)))
        steered = replace(planned.fill([p.image for p in produced]), maps=None)  # the answer needs the images only
        return Answer(steered, [(p.batch_size, p.queue_ms, p.generate_ms) for p in produced])

    async def intervention(self, request: SteerRequest) -> Intervention:
        return await in_thread(_intervention, self.service, request)

    async def health(self) -> dict:
        return self.service.health()

    async def concepts(self) -> list[dict]:
        return self.service.concepts()

    def close(self) -> None:
        self.service.close()
