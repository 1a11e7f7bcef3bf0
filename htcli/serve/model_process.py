"""The model in a process of its own, so that reading requests never holds up generating images.

`ht serve` reads, parses and checks requests in one process (uvicorn, at a lower CPU priority:
`htcli.serve.app.FRONT_NICENESS`) and plans and generates them in another, which loads the pipeline and runs a
`LocalEngine`. In one process the two would share one interpreter lock: a client sending refused
bodies back to back kept the event loop and the parsing threads holding it, and every torch
operation of the pipeline waited for it in turn (on 2 cores, generation ran 3x slower under the
hostile mix of `python -m bench.serve`). This is the split vLLM makes between its API server
and its engine core.

The two talk over a pipe that only they hold: the front sends checked `SteerRequest`s (the
prompt, numbers, decoded reference images and the paths of uploads it saved) and receives the
engine's answers, both pickled by `multiprocessing`; nothing a client sends is unpickled, and
nothing the engine receives has not been parsed by the front first. A request whose client
hangs up is cancelled in the engine as in one process. If the model process stops, the requests
waiting for it are answered 503 (JSON, Retry-After) and `on_lost` is called (`ht serve` then
exits, naming the exit code); if the front stops, the model process sees its pipe close and exits.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import pickle
import queue
import signal
import threading
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from htcli.errors import HTError
from htcli.generate.steer import SteerRequest
from htcli.models.interventions import Intervention
from htcli.serve.app import DEFAULT_HOST, listen, run_server
from htcli.serve.engine import FAILED, Answer, Engine, LocalEngine
from htcli.serve.service import Admission, FieldError, Limits, PixelBudget

METHODS = ("generate", "intervention", "health", "concepts")  # what the front may ask (besides cancel and close)
CANCEL_WAIT_S = 30.0  # how long a cancelled request waits for the model process to have stopped it
Refusal = tuple[int, str, "str | None"]  # (HTTP status, message, field)


def _refusal(error: Exception) -> Refusal:
    if isinstance(error, HTError):
        return getattr(error, "status", 400), str(error), getattr(error, "field", None)
    traceback.print_exception(error)  # a bug: the log has it whole
    return 500, FAILED, None


def _pickled(message: tuple) -> bytes:
    """Plain pickle: torch's sharing of tensors through file descriptors (what `Connection.send`
    would use) would tie each message to its sender staying alive, and cost a descriptor a tensor."""
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


class ProcessEngine(Engine):
    """An `Engine` whose `Service` runs in a child process, loaded with `load_service(**load, limits=limits)`;
    `loaded`: its /v1/health when it was ready. Start it from a script's `if __name__ == "__main__":`
    block (the child imports the script again)."""

    def __init__(self, load: dict, limits: Limits) -> None:
        self.limits = limits
        self.admission, self.pixels = Admission(limits.max_queue), PixelBudget(limits.max_held_pixels)
        context = multiprocessing.get_context("spawn")  # no forked copy of this process's threads and locks
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_main, args=(child, load | {"limits": limits}), name="ht-serve-model")
        self.process.start()
        child.close()
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._lock = threading.Lock()  # `_stopped` and `_pending` change together
        self._keys = itertools.count(1)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closing, self._stopped = False, None
        try:
            ready = self._ready()
        except BaseException:
            self.process.kill()
            self.process.join(5)
            self._conn.close()
            raise
        self.images, self.replica, self.loaded = ready["images"], ready["replica"], ready["health"]
        self._reader = threading.Thread(target=self._read, name="ht-serve-answers", daemon=True)
        self._sender = threading.Thread(target=self._send, name="ht-serve-requests", daemon=True)
        self._reader.start()
        self._sender.start()

    def _ready(self) -> dict:
        """The model process's first word: what it loaded, or why it could not."""
        try:
            while not self._conn.poll(0.5):
                if not self.process.is_alive():
                    break
            ok, value = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            self.process.join(5)
            raise HTError(f"the model process stopped while loading (exit code {self.process.exitcode})") from None
        if not ok:
            raise HTError(value[1])
        return value

    async def _call(self, method: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        key, future = next(self._keys), loop.create_future()
        with self._lock:
            if self._stopped:
                raise FieldError(f"{self._stopped}; retry shortly", None, 503)
            self._pending[key] = (loop, future)
        self._outbox.put((key, method, args))  # pickled and sent by the sender thread, in order
        try:
            return await future
        except asyncio.CancelledError:
            # Ask the model process to stop, and wait until it has: the request's uploads, queue
            # place and pixels are given back only then.
            self._outbox.put((key, "cancel", ()))
            try:
                await asyncio.wait_for(future, CANCEL_WAIT_S)
            except BaseException:  # its acknowledgement (499), a failure, or no word in time
                pass
            raise
        finally:
            with self._lock:
                self._pending.pop(key, None)

    def _settle(self, key: int, ok: bool, value: Any) -> None:
        """Settle request `key`'s future, if it still waits, on its own loop."""
        with self._lock:
            entry = self._pending.get(key)
        if entry is not None:
            entry[0].call_soon_threadsafe(_settle, entry[1], ok, value)

    def _send(self) -> None:
        while True:
            message = self._outbox.get()
            try:
                data = _pickled(message)
            except Exception as error:  # a request that cannot be pickled fails alone
                self._settle(message[0], False, _refusal(error))
                continue
            try:
                self._conn.send_bytes(data)
            except (OSError, ValueError):  # the pipe broke: the reader fails what waits
                return
            if message[1] == "close":
                return

    def _read(self) -> None:
        try:
            while True:
                self._settle(*pickle.loads(self._conn.recv_bytes()))
        except (EOFError, OSError):  # the model process closed the pipe: it stopped
            pass
        except Exception as error:  # an answer that cannot be read: a bug; stop rather than hang
            traceback.print_exception(error)
            self.process.kill()
        with self._lock:
            self._stopped = "the server is shutting down" if self._closing else "the model process stopped"
            waiting = list(self._pending.values())
        for loop, future in waiting:
            loop.call_soon_threadsafe(_settle, future, False, (503, f"{self._stopped} before answering; retry shortly", None))
        if not self._closing:
            self.process.join(5)
            self.lost = f"the model process stopped (exit code {self.process.exitcode})"
            if self.on_lost is not None:
                self.on_lost()

    async def generate(self, request: SteerRequest) -> Answer:
        return await self._call("generate", request)

    async def intervention(self, request: SteerRequest) -> Intervention:
        return await self._call("intervention", request)

    async def health(self) -> dict:
        health = await self._call("health")
        return health | {"in_flight": self.admission.count, "decoding_pixels": self.pixels.used}

    async def concepts(self) -> list[dict]:
        return await self._call("concepts")

    def close(self, timeout_s: float = 30.0) -> None:
        """Ask the model process to stop (it cancels what it runs and exits); kill it if it does not."""
        with self._lock:
            self._closing = True
            self._stopped = self._stopped or "the server is shutting down"
        self._outbox.put((0, "close", ()))
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._sender.join(5)
        self._reader.join(5)
        self._conn.close()


def serve(load: dict, limits: Limits, host: str = DEFAULT_HOST, port: int = 8000, allowed_hosts: Sequence[str] = (),
          on_loading: Callable[[], None] | None = None, on_ready: Callable[[str, dict], None] | None = None) -> None:
    """`ht serve`: take the port (first: no model loads for a port that cannot be had), load the
    model in a process of its own (`on_loading()` before), then serve until interrupted
    (`on_ready(url, health)` once ready); HTError if the model process stops by itself."""
    sock = listen(host, port)
    if on_loading is not None:
        on_loading()
    try:
        engine = ProcessEngine(load, limits)
    except BaseException:
        sock.close()
        raise
    run_server(engine, sock, on_ready=on_ready and (lambda url: on_ready(url, engine.loaded)),
               allowed_hosts=allowed_hosts)


def _settle(future: asyncio.Future, ok: bool, value: Any) -> None:
    if future.done():  # settled already (a cancel, then the model's 503)
        return
    if ok:
        future.set_result(value)
    else:
        status, message, field = value
        future.set_exception(FieldError(message, field, status))


def _main(conn: Connection, load: dict) -> None:
    """The model process: load the service, say so, then answer until the front says close or goes."""
    # Ctrl-C and a service manager's SIGTERM reach the whole process group: the front finishes
    # its requests (they need this process) and then stops it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from htcli.serve.service import load_service

    try:
        engine = LocalEngine(load_service(**load))
    except Exception as error:
        conn.send_bytes(_pickled((False, _refusal(error))))
        return
    conn.send_bytes(_pickled((True, {"images": engine.images, "replica": engine.replica, "health": engine.service.health()})))
    try:
        asyncio.run(_answer(conn, engine))
    finally:
        engine.close()


async def _answer(conn: Connection, engine: Engine) -> None:
    """Run each request the front sends as a task, cancel it when the front says so, send its answer."""
    loop = asyncio.get_running_loop()
    tasks: dict[int, asyncio.Task] = {}
    closed = loop.create_future()
    sending = threading.Lock()

    def send(message: tuple) -> None:
        try:
            data = _pickled(message)
        except Exception as error:  # an answer that cannot be pickled: the request fails, not the server
            data = _pickled((message[0], False, _refusal(error)))
        with sending:
            conn.send_bytes(data)

    async def run(key: int, method: str, args: tuple) -> None:
        try:
            reply = (key, True, await getattr(engine, method)(*args))
        except asyncio.CancelledError:
            reply = (key, False, (499, "cancelled: the client left", None))  # the front waits for this word
        except Exception as error:
            reply = (key, False, _refusal(error))
        finally:
            tasks.pop(key, None)
        try:
            await asyncio.to_thread(send, reply)  # pickling images takes a while: off this loop
        except (OSError, ValueError):  # the front has gone
            pass

    def dispatch(message: tuple) -> None:
        key, method, args = message
        if method == "close" and not closed.done():
            closed.set_result(None)
        elif method == "cancel":
            if (task := tasks.get(key)) is not None:
                task.cancel()
        elif method in METHODS:
            tasks[key] = loop.create_task(run(key, method, args))

    def read() -> None:
        try:
            while True:
                loop.call_soon_threadsafe(dispatch, pickle.loads(conn.recv_bytes()))
        except (EOFError, OSError):  # the front has gone
            pass
        except Exception as error:  # a request that cannot be read: a bug; the front sees this process stop
            traceback.print_exception(error)
        loop.call_soon_threadsafe(lambda: closed.done() or closed.set_result(None))

    threading.Thread(target=read, name="ht-serve-model-requests", daemon=True).start()
    await closed
    for task in tasks.values():
        task.cancel()
