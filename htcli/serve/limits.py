"""What `ht serve` bounds below the routes: connections, headers, bodies, and JSON before it is parsed.

A hostile client does not need a valid request to hurt a server: it can open connections and
send nothing, trickle its headers, send megabytes of them, declare a body and stall, or send a
small body that parses into millions of objects. Each gets a bounded answer here, a JSON error
like every other refusal (`{"error": ..., "field": ...}`), and honest clients go on being served:

- connections: at most `Limits.max_connections`, and never more than the descriptor limit
  (RLIMIT_NOFILE) leaves room for; at the cap, the oldest connection still waiting for its
  headers is closed to make room (a client that sends its request at once always gets in),
  else the new one is answered 503;
- headers: a connection must finish them within `header_timeout_s` of opening (or of its
  previous answer), else 408 and closed; more than `MAX_HEADER_BYTES` of them is 431 (h11
  stops buffering there), more than `MAX_HEADERS` fields is 431;
- bodies: read whole, within `body_timeout_s`, before the request is admitted to the queue
  (`read_body`), else 408; a client that hangs up mid-body is one log line, not a traceback;
- JSON: its separators counted as it arrives (`JsonSeparators`, a few memchr passes a chunk),
  so a body of a million keys or list items is 413 after its first ~100 KB, in milliseconds,
  before `json.loads` builds anything.

`GuardedH11` is uvicorn's h11 protocol with those checks; `server_config` gives the uvicorn
settings both `run_server` and `running` use.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import resource
from http import HTTPStatus
from typing import Any

import h11
import uvicorn
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from htcli.serve.service import FieldError, Limits

MAX_HEADER_BYTES = 16 * 1024  # request line and headers together (h11's buffer for an incomplete event)
MAX_HEADERS = 64  # header fields of one request
MAX_JSON_SEPARATORS = 10_000  # of each of , : [ { in a JSON body; a real request has a few dozen
MAX_FORM_TEXT_BYTES = 256 * 1024  # a form's text: the prompt, concepts and layers take a few KB
DESCRIPTORS_KEPT = 128  # file descriptors left for everything but client connections (models, uploads, logs)
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (uvicorn's default)
log = logging.getLogger("uvicorn.error")  # configured by uvicorn: one line, in its format


def error_bytes(status: int, message: str, field: str | None = None) -> bytes:
    """A whole HTTP/1.1 response carrying the server's JSON error, that closes the connection:
    for answers the protocol writes itself, before (or instead of) a request reaching the app."""
    body = json.dumps({"error": message, "field": field}).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n")
    return (head + ("retry-after: 1\r\n" if status == 503 else "") + "\r\n").encode() + body


def connection_cap(limits: Limits) -> int:
    """Client connections the server keeps open at once: `max_connections`, and below the descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = limits.max_connections if soft == resource.RLIM_INFINITY else min(limits.max_connections,
                                                                             soft - DESCRIPTORS_KEPT)
    return max(room, 1)


class Gate:
    """The connections of one server that wait for a request's headers, oldest first, and the cap."""

    def __init__(self, limits: Limits) -> None:
        self.cap, self.header_timeout_s = connection_cap(limits), limits.header_timeout_s
        self.waiting: dict[GuardedH11, None] = {}  # insertion-ordered: the first waited longest


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a connection cap, a deadline on headers and JSON refusals
    (uvicorn's own are plain text)."""

    def __init__(self, *args: Any, gate: Gate, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate
        self._headers_due: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.gate.cap:
            if self.gate.waiting:  # make room: the oldest connection that has not sent a request
                oldest = next(iter(self.gate.waiting))
                oldest._stop_waiting()
                oldest.transport.close()
            else:
                self._refuse(503, f"the server has {self.gate.cap} connections open, its most; retry shortly")
                return
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY:  # answered before the body ended (408, 413): read no more of it
            self.transport.close()
        self._watch()

    def send_400_response(self, msg: str) -> None:
        """h11 could not parse the request: 431 when its headers outgrew the buffer, else 400."""
        buffered, _ = self.conn.trailing_data
        if len(buffered) > MAX_HEADER_BYTES:
            self._refuse(431, f"the request's headers exceed {MAX_HEADER_BYTES} bytes")
        else:
            self._refuse(400, "the request is not valid HTTP/1.1")

    def _refuse(self, status: int, message: str) -> None:
        self._stop_waiting()
        if not self.transport.is_closing():
            self.transport.write(error_bytes(status, message))
            self.transport.close()

    def _watch(self) -> None:
        """Start the headers' deadline when the connection waits for a request; stop it once one came."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self._headers_due is None:
            self._headers_due = self.loop.call_later(self.gate.header_timeout_s, self._headers_late)
            self.gate.waiting[self] = None
        elif not waiting:
            self._stop_waiting()

    def _stop_waiting(self) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None
        self.gate.waiting.pop(self, None)

    def _headers_late(self) -> None:
        self._headers_due = None
        self.gate.waiting.pop(self, None)
        if self.conn.trailing_data[0]:  # half a request: tell the client why
            self._refuse(408, f"the request's headers did not arrive within {self.gate.header_timeout_s:g} s")
        else:  # nothing sent (or idle since its last answer): just close
            self.transport.close()


class HeaderCount:
    """ASGI middleware: a request with more than `MAX_HEADERS` header fields is 431."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and len(scope["headers"]) > MAX_HEADERS:
            message = f"the request has {len(scope['headers'])} header fields; at most {MAX_HEADERS}"
            await JSONResponse({"error": message, "field": None}, status_code=431)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def server_config(app: ASGIApp, limits: Limits, log_level: str) -> uvicorn.Config:
    """uvicorn's settings for `app` under `limits`: the guarded h11 protocol, keep-alive and shutdown times."""
    protocol = functools.partial(GuardedH11, gate=Gate(limits))
    return uvicorn.Config(app, http=protocol, log_level=log_level, timeout_keep_alive=KEEP_ALIVE_S,
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_graceful_shutdown=5)


def _form_text(limit: int) -> FieldError:
    return FieldError(f"a urlencoded form takes at most {limit} bytes of text; send uploads as multipart/form-data",
                      None, 413)


async def read_body(request: Request, limits: Limits) -> bytes:
    """The whole body, within `body_timeout_s` (else 408), refused (413) as soon as it is known to
    exceed `max_body_bytes` (a urlencoded form: `MAX_FORM_TEXT_BYTES`, it holds text only) or, JSON,
    to hold too many separators (`JsonSeparators`). Read before the request is admitted: a stalled
    body holds no queue place."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    urlencoded = kind == "application/x-www-form-urlencoded"
    separators = JsonSeparators() if kind == "application/json" else None
    limit = MAX_FORM_TEXT_BYTES if urlencoded else limits.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        if urlencoded:
            raise _form_text(limit)
        raise FieldError(f"the request body is {declared[:30]} bytes; this server takes at most {limit}", None, 413)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _form_text(limit) if urlencoded else FieldError(f"the request body exceeds {limit} bytes",
                                                                          None, 413)
                if separators is not None:
                    separators.add(chunk)
                chunks.append(chunk)
    except TimeoutError:
        raise FieldError(f"the request body did not arrive within {limits.body_timeout_s:g} s "
                         f"({size} bytes came)", None, 408) from None
    return b"".join(chunks)


def hung_up(request: Request, error: ClientDisconnect) -> None:
    """One log line for a client that left mid-body (uvicorn would log the whole traceback)."""
    client = request.client
    log.info("%s hung up before sending its whole body (%s %s)", f"{client.host}:{client.port}" if client else "a client",
             request.method, request.url.path)


class JsonSeparators:
    """Running counts of a JSON body's separators, chunk by chunk as it arrives (memchr passes in
    C): FieldError 413 at the first chunk that takes one past `MAX_JSON_SEPARATORS`, so a body of
    a million keys is refused after its first ~100 KB, before `json.loads` would build millions of
    objects (memory) holding the interpreter lock (time), and before the rest is even read."""

    KINDS = {b",": "list items or fields", b":": "keys", b"[": "lists", b"{": "objects"}

    def __init__(self) -> None:
        self.counts = dict.fromkeys(self.KINDS, 0)

    def add(self, chunk: bytes) -> None:
        for separator, what in self.KINDS.items():
            self.counts[separator] += chunk.count(separator)
            if self.counts[separator] > MAX_JSON_SEPARATORS:
                raise FieldError(f"the JSON body has more than {MAX_JSON_SEPARATORS} {what} (counting "
                                 f"{separator.decode()!r}); a request needs far fewer", None, 413)
