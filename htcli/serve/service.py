"""One loaded model behind `ht serve`: requests checked field by field, planned by `steer()`, generated
in dynamic batches, within limits that keep the server answering.

    service = load_service("tiny", limits=Limits(max_batch=8, batch_window_ms=20))
    planned = service.prepare(SteerRequest("a lighthouse", concepts=["art deco:0.6"]))
    images = [future.result().image for future in service.batcher.submit(planned.samples)]

The pipeline, the hypernetwork and its encoder load once. Every request goes through the same
`steer()` as `ht steer` (`htcli.generate.batch.Planner`), with concept maps from a bounded cache
(`htcli.serve.cache`); its samples join the `Batcher`'s next pipeline call.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from htcli import __version__
from htcli.core.strength import DEFAULT_STRENGTH, MAX_STRENGTH
from htcli.errors import HTError
from htcli.generate.batch import Planned, Planner, generate_batch
from htcli.generate.compose import Sources, check_pattern, resolve_sources, select_layers
from htcli.generate.request_fields import METHODS
from htcli.generate.source_maps import Steerer
from htcli.generate.steer import SteerRequest, check_seeds, parse_steer_steps
from htcli.models.interventions import Intervention
from htcli.serve.batching import Batcher
from htcli.serve.cache import CachedPredictor, MapCache


class FieldError(HTError):
    """A request the server refuses: why, the request field at fault (None: the request as a
    whole) and the HTTP status of the answer."""

    def __init__(self, message: str, field: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.field, self.status = field, status


# The `ht serve` option of a limit, where it is not named like the field (max_batch: --max-batch);
# limits without an option (_NO_OPTION) are named by their field.
_OPTIONS = {"max_body_bytes": "--max-body-mb (in bytes)", "cache_bytes": "--cache-mb (in bytes)"}
_NO_OPTION = ("max_sources", "max_prompt_chars", "max_held_pixels")


@dataclass(frozen=True)
class Limits:
    """What one request, and the server as a whole, may ask for (`ht serve` has an option for most)."""

    max_batch: int = 8  # images per pipeline call
    batch_window_ms: float = 20.0  # how long a first image waits for others to batch with
    max_queue: int = 64  # requests being read, planned, queued or generated; more get 429
    max_images: int = 16  # per request: num_images x strengths
    max_body_bytes: int = 16 * 2**20
    max_image_pixels: int = 4096 * 4096  # per uploaded reference image
    max_request_pixels: int = 4096 * 4096  # all the reference images of one request together
    max_held_pixels: int = 4 * 4096 * 4096  # decoded reference images of all requests at once; more get 429
    max_strength: float = MAX_STRENGTH  # |strength| and |weight|: beyond 1 extrapolates; far beyond, images fall apart
    max_sources: int = 16  # concepts + reference images + intervention files
    max_prompt_chars: int = 1000
    cache_size: int = 256  # concepts whose predicted maps are kept
    cache_bytes: int = 256 * 2**20  # and at most this many bytes of them
    max_refine: int = 0  # LinEAS steps a request may refine its concepts with (`refine` x concepts); 0: refining is off
    max_connections: int = 1000  # client connections open at once (htcli.serve.limits; also below RLIMIT_NOFILE)
    header_timeout_s: float = 10.0  # for a connection to send its request line and headers
    body_timeout_s: float = 30.0  # for a request's whole body to arrive

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            least = 0 if name in ("batch_window_ms", "cache_size", "cache_bytes", "max_refine") else 1
            option = name if name in _NO_OPTION else _OPTIONS.get(name, "--" + name.replace("_", "-"))
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= least):
                raise HTError(f"{option} must be a number >= {least}, got {value!r}")
        if self.max_strength > MAX_STRENGTH:
            raise HTError(f"max_strength= must be at most {MAX_STRENGTH:g} (what ht steer takes), got {self.max_strength:g}")

    def check_sources(self, counts: dict[str, int]) -> None:
        """FieldError, naming the field with most, unless a request's sources ({field: count}) are within `max_sources`."""
        if sum(counts.values()) > self.max_sources:
            raise FieldError(f"{sum(counts.values())} sources (concepts, reference images, interventions); at most "
                             f"{self.max_sources}", max(counts, key=counts.get))


class PixelBudget:
    """Pixels of decoded reference images that all requests may hold at once: a request takes its
    share before it decodes anything, and gives it back when it is done; one that does not fit now
    is refused (429), so concurrent uploads cannot add up to more memory than this bounds."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.used = capacity, 0
        self._lock = threading.Lock()

    @contextmanager
    def held(self, pixels: int) -> Iterator[None]:
        with self._lock:
            if self.used + pixels > self.capacity:
                raise FieldError(f"the server is busy decoding other uploads ({self.used} of {self.capacity} pixels); "
                                 "retry shortly", "reference_images", 429)
            self.used += pixels
        try:
            yield
        finally:
            with self._lock:
                self.used -= pixels


class Admission:
    """Requests being read, planned, queued or generated: at most `max_queue`; more get 429."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue, self.count = max_queue, 0
        self._lock = threading.Lock()

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Count a request in for the `with` block; FieldError 429 when `max_queue` are in already."""
        with self._lock:
            if self.count >= self.max_queue:
                raise FieldError(f"the server is busy ({self.count} requests in progress); retry shortly", None, 429)
            self.count += 1
        try:
            yield
        finally:
            with self._lock:
                self.count -= 1


def _glob(pattern: str, field: str) -> str:
    """A layer pattern as a request may give it: a glob (fnmatch runs in linear time); a regex
    (`re:`) could backtrack for minutes with the planning lock held, so HTTP refuses it."""
    if pattern.startswith("re:"):
        raise FieldError(f"layer pattern {pattern[:60]!r}: regular expressions (re:) are not taken over HTTP; "
                         "write a glob such as 'transformer_blocks.[0-9].*'", field)
    try:
        return check_pattern(pattern, field)
    except HTError as error:
        raise FieldError(str(error), field) from None


class Service:
    """A `Steerer` serving requests: `prepare` checks and plans one, `batcher` generates its samples.
    The batcher's worker is the only thread that runs the pipeline: one Service per pipeline."""

    def __init__(self, steerer: Steerer, limits: Limits | None = None) -> None:
        self.steerer, self.spec, self.limits = steerer, steerer.spec, limits or Limits()
        self.cache = MapCache(self.limits.cache_size, self.limits.cache_bytes)
        self.pixels = PixelBudget(self.limits.max_held_pixels)
        self.replica = f"{socket.gethostname()}:{os.getpid()}"  # which process answered (Ray Serve runs several)
        # Loaded here, once: the hypernetwork first, whose absence is the likelier mistake, then the pipeline.
        self.predictor = CachedPredictor.wrap(steerer.predictor, self.cache)
        self.pipe = steerer.pipe
        self.library = steerer.library
        self.planner = Planner(steerer, self.predictor)
        steerer.refiner.max_cached = self.limits.cache_size  # refine targets on disk: as many concepts as maps in memory
        self._planning = threading.Lock()  # the planner's recorder and the encoder's tokenizer are single-threaded
        self._refining = threading.Lock()  # the one request refining at a time
        self.admission = Admission(self.limits.max_queue)
        self.started = time.time()
        self.batcher = Batcher(self._generate, self.limits.max_batch, self.limits.batch_window_ms / 1e3)

    def _generate(self, samples: list) -> list:
        with self.steerer.refiner.lock:  # a refine request's capture encodes prompts with this pipeline too
            return generate_batch(self.spec, self.pipe, samples)

    @property
    def in_flight(self) -> int:
        return self.admission.count

    def check(self, request: SteerRequest) -> None:
        """Refuse, naming the field, what this server will not do or what `steer()` would reject
        for one field; `steer()` checks the rest (combinations of fields) again."""
        limits = self.limits
        if self.spec.video:  # responses carry images only (docs/serve.md)
            raise FieldError(f"{self.spec.id} makes videos and this server answers with images only: use `ht steer`")
        if not request.prompt.strip():
            raise FieldError("the prompt is empty: say what to generate", "prompt")
        if len(request.prompt) > limits.max_prompt_chars:
            raise FieldError(f"the prompt has {len(request.prompt)} characters; at most {limits.max_prompt_chars}", "prompt")
        if request.method not in METHODS:
            raise FieldError(f"method must be one of {', '.join(METHODS)}, got {request.method!r}", "method")
        strengths = request.strength_values
        if not strengths or not all(math.isfinite(s) and abs(s) <= limits.max_strength for s in strengths):
            raise FieldError(f"strength takes numbers from -{limits.max_strength:g} to {limits.max_strength:g}, "
                             f"got {strengths}", "strength")
        images = request.num_images * len(strengths)
        if request.num_images < 1 or images > limits.max_images:
            raise FieldError(f"num_images x strengths must be from 1 to {limits.max_images}, got {images}", "num_images")
        try:
            check_seeds(request.seed, request.num_images)
        except HTError as error:
            raise FieldError(str(error), "seed") from None
        try:
            parse_steer_steps(request.steer_steps, len(self.spec.timesteps))
        except HTError as error:
            raise FieldError(str(error), "steer_steps") from None
        if request.refine is not None:
            if not limits.max_refine:
                raise FieldError("this server does not refine (start it with max_refine=N)", "refine")
            if not request.concepts or request.method != "hypertransport":
                raise FieldError("refine refines the maps of concepts; give one, with method hypertransport", "refine")
            if not 1 <= request.refine * len(request.concepts) <= limits.max_refine:  # the whole request's budget
                raise FieldError(f"refine x concepts must be from 1 to {limits.max_refine} LinEAS steps, got "
                                 f"{request.refine} x {len(request.concepts)}", "refine")
        self._check_sources(request)

    def _check_sources(self, request: SteerRequest) -> None:
        """The sources and layer patterns: counted, looked up, weighed, and every pattern a glob
        matched against the layers it applies to, here, outside the planning lock."""
        counts = {field: len(getattr(request, field)) for field in ("concepts", "reference_images", "interventions")}
        if not sum(counts.values()):
            raise FieldError("nothing to steer with: give concepts, reference_images or interventions", "concepts")
        self.limits.check_sources(counts)
        for pattern in request.layers:
            _glob(pattern, "layers")
        if request.reference_images and not self.predictor.encoder.has_images:
            raise FieldError(f"reference images need an image encoder; this hypernetwork uses {self.predictor.encoder.id} "
                             "(text only)", "reference_images")
        resolved = {}
        for field in ("concepts", "interventions"):
            try:
                resolved[field] = resolve_sources(self.spec, **{field: getattr(request, field)}, library=self.library) \
                    if getattr(request, field) else Sources()
            except HTError as error:
                raise FieldError(str(error), field) from None
            except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as error:
                # an uploaded file whose metadata has the right keys but not the right shapes ("layers": "5")
                raise FieldError(f"{field}: a file is not a valid intervention file (damaged metadata: "
                                 f"{type(error).__name__} {str(error)[:100]})", field) from None
            found = resolved[field]
            for pattern in found.layers:
                if pattern is not None:
                    _glob(pattern, field)
            for (_, weight), label in zip(found.concepts + [(f, w) for f, w, _ in found.files], found.labels):
                if abs(weight) > self.limits.max_strength:
                    raise FieldError(f"weight of {label!r} must be from -{self.limits.max_strength:g} to "
                                     f"{self.limits.max_strength:g}, got {weight:g}", field)
        concepts, files = resolved["concepts"], resolved["interventions"]
        every = Sources(concepts.concepts, list(request.reference_images[:1]), ["upload"] * bool(request.reference_images),
                        files.files, concepts.layers + [None] * bool(request.reference_images) + files.layers)
        predicted = [name for name, _ in self.predictor.checkpoint.config.layers]
        try:
            select_layers(every.known_layers(predicted), every.layers, request.layers, every.labels)
        except HTError as error:
            message = str(error)
            raise FieldError(message, "layers" if message.startswith("layers=") else "concepts") \
                from None

    def prepare(self, request: SteerRequest) -> Planned:
        """Check `request`, then plan it with `steer()`: maps predicted (or cached) and composed. One
        request refines at a time (its budget bounds how long): another is refused (429), not queued."""
        self.check(request)
        with self._refine_slot(request.refine is not None), self._planning:
            return self.planner.plan(request)

    @contextmanager
    def _refine_slot(self, refines: bool) -> Iterator[None]:
        if refines and not self._refining.acquire(blocking=False):
            raise FieldError("the server is refining another request's concepts; retry shortly", "refine", 429)
        try:
            yield
        finally:
            if refines:
                self._refining.release()

    def intervention(self, request: SteerRequest) -> Intervention:
        """The composed intervention of `request`'s sources (what `ht steer --export` writes)."""
        if request.method != "hypertransport":
            raise FieldError("an intervention comes from method hypertransport", "method")
        # The maps do not depend on the prompt, strength or seed: any valid ones do.
        planned = self.prepare(replace(request, prompt=request.prompt or "intervention", strengths=[1.0], num_images=1))
        return planned.steered.intervention()

    def health(self) -> dict:
        batcher = self.batcher
        return {"status": "ok", "replica": self.replica, "model": self.spec.id, "hypernetwork_sha256": self.predictor.digest,
                "encoder": self.predictor.checkpoint.encoder, "device": str(self.pipe.device), "version": __version__,
                "queue": batcher.pending, "in_flight": self.in_flight, "uptime_s": round(time.time() - self.started, 1),
                "batching": {"max_batch": batcher.max_batch, "window_ms": batcher.window_s * 1e3, "batches": batcher.batches,
                             "images": batcher.generated, "largest_batch": batcher.largest, "cancelled": batcher.cancelled},
                "cache": self.cache.stats(), "decoding_pixels": self.pixels.used, "limits": asdict(self.limits),
                "defaults": {"strength": DEFAULT_STRENGTH}}

    def concepts(self) -> list[dict]:
        """The concept library: name, category, and whether it is held out from training."""
        held_out = {c.name for c in self.library.targets("test")} if self.library.split_seed is not None else set()
        return [{"name": c.name, "category": c.category, "held_out": c.name in held_out} for c in self.library.targets()]

    def close(self) -> None:
        self.batcher.close()


def load_service(model: str | None = None, hyper: Path | None = None, model_path: str | None = None,
                 device: str | None = None, limits: Limits | None = None) -> Service:
    """Load the model's pipeline, hypernetwork and encoder once, ready to serve."""
    from htcli.models import get_model

    limits = limits or Limits()  # checked before anything loads
    return Service(Steerer(get_model(model), hyper=hyper, model_path=model_path, device=device), limits)
