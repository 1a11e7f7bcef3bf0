"""Dynamic batching: samples of concurrent requests, gathered for a short window, run as one pipeline call.

The first sample to arrive opens a window of `window_s`; samples arriving before it closes join
its batch, up to `max_batch` (a full batch runs at once). Samples that waited while a batch ran
find their window already closed and go into the next batch straight away, so under load batches
fill up without waiting. Only samples steering the same denoising steps share a batch. One
worker thread owns the pipeline: requests never run it themselves, and their futures resolve
to the image with how it was made (batch size, time queued, time generating).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from PIL import Image

from htcli.errors import HTError
from htcli.generate.batch import Sample


@dataclass(frozen=True)
class Produced:
    image: Image.Image
    batch_size: int  # samples in the pipeline call that made it
    queue_ms: float  # from submission to the start of that call
    generate_ms: float  # the call's wall-clock time


@dataclass
class _Job:
    sample: Sample
    future: Future
    arrived: float  # time.perf_counter() at submission


class Batcher:
    """Runs `run(samples) -> images` on batches of submitted samples, in a worker thread."""

    def __init__(self, run: Callable[[list[Sample]], list[Image.Image]], max_batch: int, window_s: float) -> None:
        if max_batch < 1 or window_s < 0:
            raise ValueError(f"max_batch must be >= 1 and window_s >= 0, got {max_batch} and {window_s}")
        self.max_batch, self.window_s = max_batch, window_s
        self.batches = self.generated = self.largest = 0  # pipeline calls, images, the largest batch so far
        self.cancelled = 0  # samples dropped because their client went away
        self._run = run
        self._jobs: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="ht-batcher", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Samples waiting for a batch (not counting the one running)."""
        return len(self._jobs)

    def submit(self, samples: Sequence[Sample]) -> list[Future]:
        """Queue `samples`; one future per sample, resolving to its `Produced`."""
        now = time.perf_counter()
        jobs = [_Job(sample, Future(), now) for sample in samples]
        with self._ready:
            if self._closed:
                raise HTError("the server is shutting down")
            self._jobs.extend(jobs)
            self._ready.notify()
        return [job.future for job in jobs]

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop after the batch that is running; samples still queued fail."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout_s)
        for job in self._jobs:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(HTError("the server shut down before generating this image"))
        self._jobs.clear()

    def _take(self) -> list[_Job] | None:
        """The next batch (None once closed): wait for a first sample, then for company until its
        window closes or the batch is full."""
        with self._ready:
            while not self._jobs and not self._closed:
                self._ready.wait()
            if self._closed:
                return None
            first = self._jobs[0]
            deadline = first.arrived + self.window_s
            while True:
                batch = [job for job in self._jobs if job.sample.steps == first.sample.steps][: self.max_batch]
                left = deadline - time.perf_counter()
                if len(batch) == self.max_batch or left <= 0 or self._closed:
                    break
                self._ready.wait(left)
            for job in batch:
                self._jobs.remove(job)
        # A client that went away cancelled its future: its sample is dropped, not generated.
        kept = [job for job in batch if job.future.set_running_or_notify_cancel()]
        self.cancelled += len(batch) - len(kept)
        return kept

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            if not batch:
                continue
            start = time.perf_counter()
            try:
                images = self._run([job.sample for job in batch])
                if len(images) != len(batch):
                    raise RuntimeError(f"{len(images)} images for a batch of {len(batch)} samples")
            except Exception as error:  # the requests get the error; the worker lives on
                for job in batch:
                    job.future.set_exception(error)
                continue
            ms = (time.perf_counter() - start) * 1e3
            self.batches += 1
            self.generated += len(batch)
            self.largest = max(self.largest, len(batch))
            for job, image in zip(batch, images):
                job.future.set_result(Produced(image, len(batch), (start - job.arrived) * 1e3, ms))
