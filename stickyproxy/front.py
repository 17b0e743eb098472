"""The WebDriver port's HTTP/1.1 server: one asyncio Protocol per client connection, parsed by
httptools, each answer written as one buffer.

Why not aiohttp's server here (it still serves the stats port): against a fast backend, its
request and response machinery was about a third of stickyproxy's CPU per command
(benchmarks/profile.py), and on two shared cores every microsecond is taken from the browsers.
This module knows HTTP, not WebDriver: it hands each request to the handler, which answers with
`Request.send` in one of three ways: at once (it returns None); later from a callback (it
returns `LATER`, then calls `Request.finish`); or in a coroutine (it returns an awaitable, run as
a task of its own). The callback way is what a proxied command takes (a usual new session and
a bridged W3C command too): no task wakes up for it, which spared 17% of the proxy's own CPU
per command (benchmarks/hotpath.py). What it guarantees to that handler:

- requests of a connection are served one at a time, in order (pipelined ones wait their turn);
- a body arrives whole (`read`, or `Body.whole` once all here), within `max_body`; one that
  breaks off or stalls for `idle_timeout` raises BadRequest, a client gone mid-body ClientGone;
- a client that disconnects cancels its coroutine (a queued new session leaves the queue at once),
  at its first await at the earliest, so its own clean-up runs; a request taken LATER runs to
  its end (`Request.gone` says the client left), its answer is dropped, and a coroutine it is
  handed to afterwards (`Request.run`) is cancelled the same way;
- bytes that are not HTTP, or a request line or header over `max_header_size`, are answered by
  `on_bad_request`'s error and the connection is closed;
- idle keep-alive connections close after `idle_timeout`; connections over `max_connections`
  get `on_too_many`'s answer before anything is read;
- a connection closed while its client may still be sending (a body refused before it was read,
  bytes after a bad request) closes lingering, as nginx's do, so the client reads its answer
  instead of a reset.
"""

from __future__ import annotations

import asyncio
import http
import logging
import socket
from collections import deque
from functools import partial
from typing import AsyncIterator, Awaitable, Callable, Iterable

import httptools

from .outbox import Outbox
from .upstream import (HOP_BY_HOP, USUAL_CONNECTION_OPTIONS, listed_in_connection,
                       without_headers)

log = logging.getLogger("stickyproxy")

_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_MAX_PIPELINED = 16  # parsed requests waiting behind the one being served
_WHOLE = 64 << 10  # a body up to this size is received before its handler starts
_LINGER_QUIET = 2.0  # a lingering close ends after this long without a byte from the client
_LINGER_MAX = 30.0  # and after this long in all (nginx: lingering_timeout 5 s, lingering_time 30 s)
_MOST_LINGERING = 256  # beyond this many at once, a connection closes at once (as it used to)
Header = tuple[bytes, bytes]
_METHODS = {m.encode(): m for m in ("GET", "POST", "DELETE", "PUT", "HEAD", "OPTIONS", "PATCH")}


LATER = object()  # a handler's "answered from a callback, which calls Request.finish"


def _keep_alive(headers: Iterable[Header] | bytes) -> Iterable[Header] | bytes:
    """`headers` plus the Connection: keep-alive an HTTP/1.0 client needs to keep its
    connection (without it, it waits for the close)."""
    if isinstance(headers, (bytes, bytearray)):
        return headers + b"Connection: keep-alive\r\n"
    return [*headers, (b"Connection", b"keep-alive")]


# Answers that have no body, nor a length or chunking to frame one (RFC 9110 6.4.1).
_BODILESS = frozenset((*range(100, 200), 204, 304))


class BadRequest(Exception):
    """The bytes on the connection are not a request we will parse."""


class BodyTooLarge(Exception):
    """A body without a declared length grew past the limit while it arrived."""


class UploadsFull(BodyTooLarge):
    """Bodies being received, all connections together, would pass the port's `max_held`."""


class ClientGone(ConnectionResetError):
    """The client closed its connection before its request's body had all arrived."""


class Body:
    """A request body as it arrives from the connection."""

    __slots__ = ("_parts", "_size", "done", "_waiter", "_error", "_conn", "_limit", "_held")

    def __init__(self, conn: "Connection", limit: int) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self.done = False
        self._waiter: asyncio.Future | None = None
        self._error: BaseException | None = None
        self._conn, self._limit = conn, limit
        self._held = 0  # of the port's `held`: what _parts holds

    def feed(self, data: bytes) -> None:
        # Bodies are read whole (a backend is sent a length): the limit bounds what is held,
        # per body and (stalled uploads of many connections) for the port as a whole.
        self._size += len(data)
        if self._size > self._limit:
            self._error = BodyTooLarge()
            self._release()
        elif self._error is None:
            port = self._conn.port
            if port.held + len(data) > port.max_held:
                self._error = UploadsFull()
                self._release()
            else:
                self._parts.append(data)
                self._held += len(data)
                port.held += len(data)
        self._wake()

    def _release(self) -> None:
        self._parts = []
        if self._held:
            self._conn.port.held -= self._held
            self._held = 0

    def __del__(self) -> None:
        # (a body nobody read: its request refused before, or its handler failed)
        if self._held:
            self._conn.port.held -= self._held

    def finish(self) -> None:
        self.done = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self.done:
            self._error = exc
            self._release()
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        conn = self._conn
        self._waiter = conn.loop.create_future()  # (get_running_loop: a getpid on 3.11)
        # A client that stops sending mid-body would hold its handler (and whatever that
        # holds) for good: the idle timer skips a busy connection.
        stalled = conn.loop.call_later(conn.port.idle_timeout, self.fail, BadRequest(
            f"the request body stalled: nothing for {conn.port.idle_timeout:g} s"))
        try:
            await self._waiter
        finally:
            stalled.cancel()
            self._waiter = None

    def whole(self) -> bytes | None:
        """The whole body if it has all arrived (within the limit), else None: `read` without
        a coroutine."""
        if not self.done or self._error is not None:
            return None
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._release()  # (the handler has it now, on its way to a backend)
        return data

    async def read(self) -> bytes:
        """The whole body (raises BodyTooLarge past the limit, ClientGone if the client left
        before sending it all, BadRequest if it broke off or stalled)."""
        while not self.done and self._error is None:
            await self._wait()
        if self._error is not None:
            raise self._error
        return self.whole()

class Request:
    """One parsed request: what the handler reads, and `send` to answer it."""

    __slots__ = ("method", "target", "raw_headers", "forward", "content_length", "chunked",
                 "keep_alive", "body", "remote", "app", "sent", "timing", "principal", "_conn",
                 "_headers", "_http10")

    def __init__(self, conn: "Connection", method: str, target: str, raw_headers: list[Header],
                 forward: bytes, content_length: int | None, chunked: bool, keep_alive: bool,
                 http10: bool, body: Body | None) -> None:
        self._conn = conn
        self.method, self.target, self.raw_headers = method, target, raw_headers
        self.forward = forward  # the end-to-end header lines, joined, for a proxy to pass on
        self.content_length, self.chunked = content_length, chunked
        self.keep_alive, self._http10, self.body = keep_alive, http10, body
        self.remote = conn.remote
        self.app = conn.port.app  # the handler's shared state
        self.sent = False
        self.timing = None  # the handler's clock (metrics.Timing)
        self.principal = ""  # who sent it, when auth is on
        self._headers: dict[str, str] | None = None

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def headers(self) -> dict[str, str]:
        """Header values by lower-case name (repeated ones joined as HTTP allows)."""
        if self._headers is None:
            found: dict[str, str] = {}
            for name, value in self.raw_headers:
                key, text = name.decode("latin-1").lower(), value.decode("latin-1")
                found[key] = f"{found[key]}{'; ' if key == 'cookie' else ', '}{text}" \
                    if key in found else text
            self._headers = found
        return self._headers

    @property
    def body_exists(self) -> bool:
        return self.body is not None

    @property
    def gone(self) -> bool:
        """The client has left (its connection is closed): an answer would be dropped."""
        transport = self._conn.transport
        return transport is None or transport.is_closing()

    async def read(self) -> bytes:
        return await self.body.read() if self.body is not None else b""


    def abort(self) -> None:
        """End the connection now: an answer already under way cannot be finished."""
        self._conn.write(b"", True)

    def finish(self) -> None:
        """The answer of a request its handler took `LATER` is out: serve the next one."""
        self._conn.finished(self)

    def run(self, step: Awaitable[None]) -> None:
        """Go on with a request taken `LATER` in a coroutine (a long answer to stream): it is
        finished when `step` returns, and cancelled if the client leaves."""
        self._conn.run(self, step)

    def crashed(self) -> None:
        """A bug of ours while answering from a callback: the client still gets a WebDriver
        error if nothing was sent, and the connection ends (its state is unknown)."""
        self._conn.crashed(self)

    def send(self, status: int, headers: Iterable[Header] | bytes, body: bytes = b"", *,
             close: bool = False) -> None:
        """Answer with a whole body: status line, headers and body in one write."""
        self.sent = True
        close = close or not self.keep_alive
        if self._http10 and not close:
            headers = _keep_alive(headers)
        self._conn.answer(status, headers, body if self.method != "HEAD" else b"", close,
                          len(body))

    async def stream(self, status: int, headers: Iterable[Header] | bytes,
                     chunks: AsyncIterator[bytes],
                     length: int | None = None) -> None:
        """Answer with a body written as `chunks` yields it, at the client's pace. Without a
        `length` it is sent chunked (or close-delimited to an HTTP/1.0 client)."""
        self.sent = True
        conn = self._conn
        bodiless = status in _BODILESS
        close = not self.keep_alive or (length is None and self._http10 and not bodiless)
        head = conn.head(status, _keep_alive(headers) if self._http10 and not close else headers,
                         close)
        if bodiless:
            # No body and no framing, whatever came (RFC 9110 6.4.1): a client reads none, so a
            # chunked terminator would be read as the start of the next answer.
            async for _ in chunks:
                pass
            conn.write(head + b"\r\n", close)
            return
        framed = length is None and not self._http10
        if length is not None:
            head += b"Content-Length: %d\r\n" % length
        elif framed:
            head += b"Transfer-Encoding: chunked\r\n"
        # (written at once, not gathered: the client's pace, seen at drain(), rules a stream)
        conn.write(head + b"\r\n", False, now=True)
        async for chunk in chunks:
            if chunk:
                conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if framed else chunk, False,
                           now=True)
                await conn.drain()
        conn.write(b"0\r\n\r\n" if framed else b"", close)


Handler = Callable[[Request], "Awaitable[None] | object | None"]  # None, LATER or a coroutine


class Port:
    """The listening side: the protocol factory for `loop.create_server`, and the live
    connections (for --max-connections and for closing at shutdown)."""

    def __init__(self, handler: Handler, *, app: object = None, idle_timeout: float,
                 max_header_size: int,
                 max_body: int, max_connections: int = 0, outbox: Outbox | None = None,
                 not_forwarded: frozenset[bytes] = HOP_BY_HOP,
                 on_bad_request: Callable[[str | None, str | None], tuple[int, list[Header], bytes]],
                 on_too_many: Callable[[str | None], tuple[int, list[Header], bytes]]) -> None:
        self.handler, self.app = handler, app
        self.idle_timeout, self.max_header_size = idle_timeout, max_header_size
        self.max_body, self.max_connections = max_body, max_connections
        # Request bodies held at once, all connections together: stalled uploads of --max-body
        # each must not take the host's memory (three 60 MiB ones held 180 MiB before).
        self.held, self.max_held = 0, 4 * max_body
        # a line being received past this is refused (see Connection._unparsed)
        self.head_limit = 2 * max_header_size + 256
        # Request headers kept from the backend: hop-by-hop ones, and stickyproxy's own
        # credentials when it checks them (they are for stickyproxy, not for the backends).
        self.not_forwarded = not_forwarded
        # on_bad_request(why, client): the answer to bytes we will not parse (`why`), or to a
        # handler that failed (None); on_too_many(client): to a connection over the limit.
        self.on_bad_request, self.on_too_many = on_bad_request, on_too_many
        self.connections: set[Connection] = set()
        self.lingering: set[Connection] = set()  # answered and closing: not counted above
        self.outbox = outbox or Outbox()  # answers: see outbox.py
        self.server: asyncio.base_events.Server | None = None

    def __call__(self) -> "Connection":
        return Connection(self)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self, host, port, reuse_address=True, backlog=1024)
        return self.server.sockets[0].getsockname()[:2]

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting; close idle connections now and busy ones when their answer is out
        (or after `grace` seconds)."""
        if self.server is not None:
            self.server.close()
        for conn in list(self.lingering):
            conn.transport.close()
        for conn in list(self.connections):
            conn.close_when_idle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        if self.server is not None:
            await self.server.wait_closed()


class Connection(asyncio.Protocol):
    # Slots: an instance dict shares its keys only up to 30 of them, past which every
    # attribute read here takes the slow path (CPython 3.11).
    __slots__ = ("port", "loop", "parser", "transport", "remote", "waiting", "task", "busy",
                 "_starting", "closing", "broken", "paused", "_drain", "_idle", "last_active",
                 "_refused", "lingering", "_linger_until", "_url", "_headers", "_forward",
                 "_length", "_chunked", "_expect", "_listed", "_parsing", "_not_forwarded",
                 "_unparsed", "_continue_due")

    def __init__(self, port: Port) -> None:
        self.port = port
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.waiting: deque[Request] = deque()  # parsed, behind the one being served
        self.task: asyncio.Task | None = None  # the coroutine serving the current request, if any
        self.busy = False  # a request is being answered
        self._starting = False  # in _serve: a request finished there does not start the next
        self.closing = False  # no request after the current one
        self.broken: str | None = None  # a parse error to answer once the current one is out
        self.paused = False
        self._drain: asyncio.Future | None = None
        self._idle: asyncio.TimerHandle | None = None  # the idle timer, or the lingering close's
        self.last_active = 0.0
        self._refused = False  # over --max-connections: answered before anything was read
        self.lingering = False  # answered, our side ended: reading what still comes, to drop it
        self._linger_until = 0.0
        # the request being parsed
        self._url = b""
        self._headers: list[Header] = []
        self._forward = b""
        self._length: int | None = None
        self._chunked = False
        self._expect = False
        self._listed: frozenset[bytes] | None = None  # names its Connection header lists
        self._parsing: Request | None = None
        self._not_forwarded = port.not_forwarded
        # The length of the line being received (body bytes aside: on_body resets it).
        # httptools gathers a header whole before its callback, each piece copied onto the
        # last (quadratic): a header that never ends must be refused while it grows, not once
        # it is whole. Counted per read, not per header: the hot path pays one rfind.
        self._unparsed = 0
        self._continue_due: Request | None = None  # its 100 Continue waits for earlier answers

    # --- connection ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Answers go out in one write; Nagle would hold the next one for the client's ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        port = self.port
        port.connections.add(self)
        if port.max_connections and len(port.connections) > port.max_connections:
            status, headers, body = port.on_too_many(self.remote)
            self.closing = self._refused = True  # (its request, unread, lingers)
            self.answer(status, headers, body, True)
            return
        self.last_active = self.loop.time()
        self._idle = self.loop.call_later(port.idle_timeout, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.port.connections.discard(self)
        self.port.lingering.discard(self)
        self.closing = True
        if self._idle is not None:
            self._idle.cancel()
        gone = ClientGone("the client closed the connection")
        if self._parsing is not None and self._parsing.body is not None:
            self._parsing.body.fail(gone)
        for request in self.waiting:
            if request.body is not None:
                request.body.fail(gone)
        self.waiting.clear()
        if self.task is not None:
            # The client left: its handler stops (and leaves any queue), from its next await.
            # A step not started yet runs to its first await before: cancelled earlier, a
            # coroutine runs none of its own clean-up (a reserved slot, a backend answer held).
            self.loop.call_soon(self.task.cancel)
        if self._drain is not None:
            self._drain.cancel()  # a streaming handler waiting to write stops (it is cancelled)

    def data_received(self, data: bytes) -> None:
        if self.broken is not None or self.closing:
            # After an error or Connection: close, the rest is not parsed (a lingering close
            # drops it, and counts it as a sign of life).
            self.last_active = self.loop.time()
            return
        partial = data[-1] != 10  # (b"\n") a line goes on past this read: counted
        if partial:
            end = data.rfind(b"\n")
            self._unparsed = self._unparsed + len(data) if end < 0 else len(data) - end - 1
        elif self._unparsed:
            self._unparsed = 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.closing = True  # CONNECT (or an upgrade): answered, then the connection ends
        except httptools.HttpParserError as exc:
            # A BadRequest raised by our callbacks arrives wrapped as "User callback error".
            cause = exc.__context__ if isinstance(exc.__context__, BadRequest) else exc
            self._bad(str(cause) or type(cause).__name__)
        else:
            if partial and self._unparsed > self.port.head_limit:
                self._bad(f"a request line or header longer than {self.port.max_header_size} "
                          f"bytes (--max-header-size)")
        # Handlers start here, after the parser is done with the data, never inside its callbacks.
        if self.waiting and not self.busy:
            self._serve()

    def eof_received(self) -> bool | None:
        # A WebDriver client that closes its side has left (none half-closes to await an
        # answer): closing the transport cancels whatever it was waiting for, queue included.
        self.closing = True
        return None

    def pause_writing(self) -> None:
        self._drain = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None
        if not self.busy and self.waiting and not self._starting:
            self._serve()  # stopped while the client was not reading its answers

    async def drain(self) -> None:
        if self._drain is not None:
            await self._drain

    def pause_reading(self) -> None:
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None and not self.transport.is_closing():
            self.paused = False
            self.transport.resume_reading()

    def close_when_idle(self) -> None:
        self.closing = True
        if not self.busy and not self.waiting and self.transport is not None:
            self.port.outbox.flush()  # (an answer written in this loop turn goes first)
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _check_idle(self) -> None:
        # One timer per connection, re-armed lazily: cheaper than resetting it per request.
        idle = self.loop.time() - self.last_active
        if not self.busy and not self.waiting and idle >= self.port.idle_timeout:
            self._idle = None
            self.port.outbox.flush()
            self.transport.close()
        else:
            self._idle = self.loop.call_later(max(0.1, self.port.idle_timeout - idle),
                                              self._check_idle)

    # --- writing -------------------------------------------------------------------------------

    @staticmethod
    def head(status: int, headers: Iterable[Header] | bytes, close: bool) -> bytes:
        """Status line and headers: (name, value) pairs, or header lines already joined."""
        if not isinstance(headers, (bytes, bytearray)):
            headers = b"".join(b"%b: %b\r\n" % (name, value) for name, value in headers)
        return b"HTTP/1.1 %d %b\r\n%b%b" % (status, _REASONS.get(status, b"Unknown"), headers,
                                            b"Connection: close\r\n" if close else b"")

    def answer(self, status: int, headers: Iterable[Header] | bytes, body: bytes, close: bool,
               length: int | None = None) -> None:
        """A whole answer in one write (`length`: a HEAD answer's, whose body is not sent)."""
        if not isinstance(headers, (bytes, bytearray)):
            headers = b"".join(b"%b: %b\r\n" % (name, value) for name, value in headers)
        if status in _BODILESS:
            self.write(self.head(status, headers, close) + b"\r\n", close)
            return
        self.write(b"HTTP/1.1 %d %b\r\n%b%bContent-Length: %d\r\n\r\n%b" % (
            status, _REASONS.get(status, b"Unknown"), headers,
            b"Connection: close\r\n" if close else b"", len(body) if length is None else length,
            body), close)

    def write(self, data: bytes | bytearray, close: bool, now: bool = False) -> None:
        """Write `data`, gathered with the other writes of this loop turn (outbox.py) unless
        `now` or `close`; then end the connection if `close`."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.lingering:
            return
        if not (close or now):
            if data:
                self.port.outbox.write(transport, data)
            return
        self.port.outbox.flush()  # (what this connection has held goes first)
        if data:
            transport.write(data)
        if not close:
            return
        self.closing = True
        if self._parsing is None and self.broken is None and not self._refused:
            transport.close()
        else:
            self._linger()

    def _linger(self) -> None:
        """Close a connection whose client may still be sending (a body refused unread, bytes
        after a bad request, a request over --max-connections): closed with unread bytes, the
        kernel answers them with a reset, which can reach the client before our answer, so it
        sees "connection reset" instead of the error. As nginx's lingering close: the answer,
        then our FIN, then what still comes is read and dropped until the client closes, goes
        quiet for _LINGER_QUIET or _LINGER_MAX has passed. Nothing after the answer is parsed
        (llhttp takes no request after a Connection: close one, nor do we after a bad one or
        behind a body left unread), and the connection no longer counts against
        --max-connections (a flood of refused ones would otherwise keep out the next client)."""
        transport, port = self.transport, self.port
        port.connections.discard(self)
        if len(port.lingering) >= _MOST_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        port.lingering.add(self)
        self.lingering = True  # (nothing more is written)
        transport.write_eof()
        self.resume_reading()
        self.last_active = now = self.loop.time()
        self._linger_until = now + _LINGER_MAX
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self.loop.call_later(_LINGER_QUIET, self._check_linger)

    def _check_linger(self) -> None:
        now = self.loop.time()
        quiet = now - self.last_active
        if quiet >= _LINGER_QUIET or now >= self._linger_until:
            self._idle = None
            self.transport.close()
        else:
            self._idle = self.loop.call_later(
                min(_LINGER_QUIET - quiet, self._linger_until - now), self._check_linger)

    # --- parsing (httptools callbacks) ---------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        if not self._url:
            # A request starts: the idle clock restarts here, not on every byte received, or
            # a client trickling one head (or a small body) would keep its connection for good.
            self.last_active = self.loop.time()
        self._url += url
        if len(self._url) > self.port.max_header_size:
            raise BadRequest(f"request target longer than {self.port.max_header_size} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        # (Trailer fields of a chunked body come here too, after the head was taken: what they
        # leave is dropped at the message's end, never a header of the next request.)
        if len(name) + len(value) > self.port.max_header_size:
            raise BadRequest(f"header {name[:40].decode('latin-1')!r} longer than "
                             f"{self.port.max_header_size} bytes")
        if len(self._headers) >= 100:
            raise BadRequest("more than 100 headers")
        lower = name.lower()
        if lower not in self._not_forwarded:
            self._forward += b"%b: %b\r\n" % (name, value)
        elif lower == b"content-length":
            self._length = int(value)  # httptools has checked it is digits
        elif lower == b"transfer-encoding":
            self._chunked = True
        elif lower == b"expect" and value.lower() == b"100-continue":
            self._expect = True
        elif (lower == b"connection" and value.lower() not in USUAL_CONNECTION_OPTIONS
              and (listed := listed_in_connection(value))):
            # (for this hop only: dropped once the head is whole; several Connection headers add up)
            self._listed = listed if self._listed is None else self._listed | listed
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._listed is not None:
            self._forward, self._listed = without_headers(self._forward, self._listed), None
        parser = self.parser
        has_body = self._chunked or bool(self._length)
        body = Body(self, self.port.max_body) if has_body else None
        method = parser.get_method()
        request = Request(self, _METHODS.get(method) or method.decode("latin-1"),
                          self._url.decode("latin-1"), self._headers, self._forward, self._length,
                          self._chunked, parser.should_keep_alive(),
                          parser.get_http_version() == "1.0", body)
        expect = self._expect
        # Ready for the next message here, not in on_message_begin: one callback less each.
        self._url, self._headers, self._forward = b"", [], b""
        self._length, self._chunked, self._expect = None, False, False
        self._parsing = request if has_body else None
        if expect and has_body and (request.content_length or 0) <= self.port.max_body:
            # (over the limit it is refused: 100 Continue would invite the upload first)
            if self.busy or self.waiting:
                self._continue_due = request  # (sent once the answers before it are out)
            else:
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n", False)
        if has_body and not request.chunked and request.content_length <= _WHOLE:
            return  # served once its body is here (on_message_complete), whole
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        self.waiting.append(request)
        if len(self.waiting) > _MAX_PIPELINED:
            self.pause_reading()

    def on_body(self, data: bytes) -> None:
        self._unparsed = 0
        self._parsing.body.feed(data)

    def on_message_complete(self) -> None:
        request = self._parsing
        if request is not None:
            self._parsing = None
            if request.chunked:  # its trailers, if any: nothing of the next request
                self._url, self._headers, self._forward = b"", [], b""
                self._length, self._chunked, self._expect, self._listed = None, False, False, None
            request.body.finish()
            if not request.chunked and request.content_length <= _WHOLE:
                self._enqueue(request)

    def _bad(self, why: str) -> None:
        self.broken = why
        if self._parsing is not None and self._parsing.body is not None:
            # Its handler may be reading it already: it ends there too (answered, then closed).
            self._parsing.body.fail(BadRequest(why))
        if not self.busy and not self.waiting:
            self._answer_bad()

    def _answer_bad(self) -> None:
        status, headers, body = self.port.on_bad_request(self.broken or "unreadable", self.remote)
        self.answer(status, headers, body, True)

    # --- serving -------------------------------------------------------------------------------

    def _serve(self) -> None:
        """Start the waiting requests, one at a time: each one's handler runs until it answers,
        takes it LATER or hands it to a coroutine; only an answer given at once lets the next
        one start here (a loop, not a recursion through `finished`)."""
        self._starting = True
        try:
            # Not while the client reads none of its answers (writing paused): pipelined requests
            # answered at once would pile up in the write buffer; reading pauses behind them.
            while (self.waiting and not self.busy and self._drain is None
                   and not self.transport.is_closing()):
                request = self.waiting.popleft()
                if self.paused:
                    self.resume_reading()
                self.busy = True
                try:
                    step = self.port.handler(request)
                except Exception:
                    self.crashed(request)
                    return
                if step is None:
                    self.finished(request)
                elif step is not LATER:
                    self.run(request, step)
        finally:
            self._starting = False
        if (not self.busy and not self.waiting and self.broken is not None
                and not self.transport.is_closing()):
            self._answer_bad()

    def finished(self, request: Request) -> None:
        """`request` is answered: end the connection if it must, else serve the next one."""
        self.busy = False
        if (self.closing or not request.keep_alive
                or (request.body is not None and not request.body.done)):
            # (an answer sent before its request's body was all read leaves the start of
            # the next request unknown: that connection ends too)
            self.write(b"", True)
            return
        self.last_active = self.loop.time()
        due = self._continue_due
        if due is not None and (not self.waiting or self.waiting[0] is due):
            self._continue_due = None  # the answers before it are out: its turn
            if not due.body.done:
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n", False)
        if not self._starting:
            if self.waiting:
                self._serve()
            elif self.broken is not None:
                self._answer_bad()

    def run(self, request: Request, step: Awaitable[None]) -> None:
        # The step itself is the task (no wrapper coroutine): a client that leaves before it
        # starts cancels it cleanly, without a coroutine left never awaited.
        self.task = task = asyncio.ensure_future(step, loop=self.loop)
        task.add_done_callback(partial(self._ran, request))
        if self.transport is None or self.transport.is_closing():
            # The client left before its answer was handed here: stopped as connection_lost
            # would have stopped it (after its first step, so its clean-up runs).
            self.loop.call_soon(task.cancel)

    def _ran(self, request: Request, task: asyncio.Task) -> None:
        if self.task is task:
            self.task = None
        if task.cancelled():
            return  # the client left (connection_lost): nothing more to serve
        exc = task.exception()
        if exc is not None:
            self.crashed(request, exc)
        else:
            self.finished(request)

    def crashed(self, request: Request, exc: BaseException | None = None) -> None:
        """A bug of ours (`exc`, or the exception being handled) while answering `request`."""
        log.error("HANDLER_FAILED method=%s target=%s", request.method, request.target[:200],
                  exc_info=exc or True)
        if not request.sent:
            status, headers, body = self.port.on_bad_request(None, self.remote)
            request.sent = True
            self.answer(status, headers, body, True)
        else:
            self.write(b"", True)
        self.busy = False
