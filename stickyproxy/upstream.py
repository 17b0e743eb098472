"""Connections to one backend: a small HTTP/1.1 client built for WebDriver servers.

Why not a general client: GhostDriver (PhantomJS) writes each response header line in its own TCP
segment with Nagle on, so on a reused connection the second segment waits for our delayed ACK:
about 40 ms on *every* command. Re-arming TCP_QUICKACK after every read makes the kernel ACK at
once and removes the stall (measured here: 0.25 ms per /status reused, 0.5 ms with a fresh
connection per request, 44 ms plain keep-alive). GhostDriver also serves only about 10
connections at once and never closes idle ones, so connections per backend are bounded here
and owned by one pool (HAProxy's keep-alive mode stalled for seconds at 16 clients without that).

A new session may only be placed elsewhere when its backend provably never saw the request.
It goes over a fresh connection (a refused connect is that proof) unless a connection to the
backend was answered within the last `WARM` seconds; then it reuses that one, which spares a
connect and GhostDriver an accept per session (0.24 ms of the proxy's CPU per session, 12%,
measured end to end). A reused connection can break before any byte of the answer: the backend
died (and any session it began died with it) or closed the idle connection as the request came
(and did not serve it). Such a request (`replay_stale`) is sent once more over a fresh
connection to the same backend, whose refused connect is again the proof the placement needs.

Two ways to send a request (always whole, with its length): `request`, a coroutine (for what
goes on in one: a new session's retry, a heavy bridge plan, a DELETE of ours), and `submit`,
which calls back with the answer and spares the usual command and new session a task wake-up.
Answers may stream (`Response.chunks`).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import deque
from functools import partial
from typing import AsyncIterator, Iterable
from urllib.parse import urlsplit

import httptools

from .outbox import Outbox

# Hop-by-hop headers (RFC 9110 7.6.1) plus the ones this client sets itself.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"host",
    b"content-length", b"expect",
})

USUAL_CONNECTION_OPTIONS = frozenset({b"keep-alive", b"close", b""})


def listed_in_connection(value: bytes) -> frozenset[bytes]:
    """The header names a Connection header makes hop-by-hop (RFC 9110 7.6.1), beyond the
    usual keep-alive and close: they are for this hop only, never passed on."""
    return frozenset(t.strip().lower() for t in value.split(b",")) - USUAL_CONNECTION_OPTIONS


def without_headers(lines: bytes, names: frozenset[bytes]) -> bytes:
    """Header lines (`Name: value\r\n` each) minus those whose name is in `names`."""
    return b"".join(line + b"\r\n" for line in lines.split(b"\r\n")[:-1]
                    if line.split(b":", 1)[0].strip().lower() not in names)


_HIGH_WATER = 1 << 20  # pause reading a backend that sends faster than the client takes
WARM = 2.0  # seconds since its last answer for a connection to carry a `replay_stale` request
WHOLE = 1 << 20  # an answer with a Content-Length up to this is awaited whole, not its head


class NotConnected(ConnectionError):
    """The connection could not be opened: the request never left this process."""


class UpstreamError(ConnectionError):
    """The connection failed after the request may have been sent."""


class _Reader:
    """An answer's parser, lent to one connection from the first byte of an answer to its end.

    Why not one per connection: with many backends, each command's connection is cold in the
    CPU's caches, and a parser of its own is a dozen more cold cache lines per answer (llhttp's
    state and settings, httptools' object and its bound callbacks: 1.0 of the 3.1 us a request
    grew from 4 to 1,000 backends, by perf). Lent from a free list, the parser in use is the one
    just used. llhttp starts each keep-alive answer afresh, so a parser goes back only after a
    whole keep-alive answer that nothing followed; any other is dropped with its connection."""

    __slots__ = ("parser", "conn", "listed")

    def __init__(self) -> None:
        self.conn: _Connection | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.listed: frozenset[bytes] | None = None  # names the answer's Connection header lists

    # httptools callbacks, acting on the connection it reads for
    def on_message_begin(self) -> None:
        conn = self.conn
        if not conn._awaited:
            # Bytes nobody asked for (on an idle connection, or after the answer): the stream
            # can no longer be trusted, nor can this parser (feed_data raises, both are dropped).
            raise UpstreamError("backend sent bytes that answer no request")
        conn._awaited = False

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower not in HOP_BY_HOP:
            self.conn.forward += b"%b: %b\r\n" % (name, value)
        elif lower == b"content-length":
            self.conn.length = int(value)  # httptools has checked it is digits
        elif lower == b"transfer-encoding":
            # Chunked only when that is its last coding; else the body runs to the close.
            self.conn.chunked = value.rstrip().lower().endswith(b"chunked")
        elif (lower == b"connection" and value.lower() not in USUAL_CONNECTION_OPTIONS
              and (listed := listed_in_connection(value))):
            self.listed = listed if self.listed is None else self.listed | listed

    def on_headers_complete(self) -> None:
        conn = self.conn
        if self.listed is not None:
            conn.forward, self.listed = without_headers(conn.forward, self.listed), None
        conn.status = self.parser.get_status_code()
        if conn.status < 200:
            return  # interim (100 Continue, 103 Early Hints): on_message_complete skips it
        if conn.length is not None and conn.length <= WHOLE:
            # Answered whole once its body is here: GhostDriver sends its head and body in
            # separate segments, and waking the waiting handler for each cost a task step more
            # per command (on_message_complete wakes it).
            return
        conn._answered()

    def on_body(self, body: bytes) -> None:
        if not body:
            return  # an empty piece is no end: next_chunk's b"" means the end
        conn = self.conn
        if conn._buffered:
            conn._chunks.append(body)
        else:  # nothing held: the usual whole body, kept without touching the deque
            conn._first = body
        conn._buffered += len(body)
        if conn._buffered > _HIGH_WATER and not conn._paused:
            conn._paused = True
            conn.transport.pause_reading()
        if conn._waiter is not None:
            conn._wake()

    def on_message_complete(self) -> None:
        if self.listed is not None:
            self.listed = None  # (named by a trailer: nothing of the next answer this reader reads)
        conn = self.conn
        if conn.status < 200:
            # An interim answer, which a client must read past (RFC 9110 15.2) though it asked
            # for none: the real one follows on the same connection.
            conn.status, conn.forward, conn.length, conn.chunked = 0, b"", None, False
            conn._awaited = True
            return
        conn.keep_alive = self.parser.should_keep_alive()  # (llhttp forgets it after this call)
        conn._done = True
        conn._ready = True
        if conn._head is not None:
            conn._answered()
        if conn._waiter is not None:
            conn._wake()


_readers: list[_Reader] = []  # the free ones, the last used on top
_MOST_READERS = 256  # kept free at most: as many as answers are ever read at once, in practice


class _Connection(asyncio.Protocol):
    __slots__ = ("transport", "_reader", "status", "forward", "length", "chunked", "keep_alive",
                 "_head", "_first", "_chunks", "_buffered", "_done", "_waiter", "_exc",
                 "_quickack", "_sock", "_paused", "lost", "_loop", "received", "idle_since",
                 "_callback", "_ready", "_pool", "_replay", "_awaited")

    def __init__(self) -> None:
        # Kept once: on 3.11 every get_running_loop() costs a getpid() syscall.
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._quickack = False
        self._sock = None
        self._reader: _Reader | None = None  # while an answer is being read
        self._chunks: deque[bytes] = deque()  # the body's pieces after `_first`, while held
        self._buffered = 0
        self.idle_since = 0.0  # loop time it went back to the pool
        self._pool: Upstream | None = None  # set by the pool that sends on it
        self._reset()
        self._awaited = False  # until a request is sent: any byte before is an error

    def _reset(self) -> None:
        self.status = 0
        self.forward = b""  # the end-to-end header lines, as a proxy passes them on
        self.length: int | None = None  # Content-Length, if the answer has one
        self.chunked = False
        self.keep_alive = False
        self._head: asyncio.Future | None = None
        self._first: bytes | None = None  # the oldest piece of the body held
        if self._buffered:  # (the deque, another cold object, only when it may hold any)
            self._chunks.clear()
            self._buffered = 0
        self._done = False
        self._waiter: asyncio.Future | None = None
        self._exc: BaseException | None = None
        self._paused = False
        self.received = False  # a byte of this answer has arrived
        # Upstream.submit's way instead of the _head future: called with the answer's head
        # (or its failure), once the parser is done with the data (never inside its callbacks).
        self._callback = None
        self._ready = False  # the head is here, for the callback
        # submit's `replay_stale` on a reused connection: (data, timeout, connect_timeout), to
        # send again over a fresh connection if this one breaks before any byte of the answer
        self._replay: tuple[bytes, float, float] | None = None
        self._awaited = True  # an answer's first byte is due

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # A real socket object on a duplicate of the descriptor: setsockopt through
            # uvloop's pseudo-socket builds a socket object per call (two syscalls more for
            # every QUICKACK, counted with strace).
            self._sock = socket.socket(sock.family, socket.SOCK_STREAM, 0,
                                       fileno=os.dup(sock.fileno()))
            self._quickack = hasattr(socket, "TCP_QUICKACK")

    def data_received(self, data: bytes) -> None:
        self.received = True
        reader = self._reader
        if reader is None:
            reader = self._reader = _readers.pop() if _readers else _Reader()
            reader.conn = self
        try:
            reader.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._drop_reader()  # its parser is spent
            self.transport.close()
            if not self._done:
                why = exc.__context__  # (a callback's own error, as httptools wraps it)
                self._fail(why if isinstance(why, UpstreamError) else UpstreamError(
                    "backend switched protocols, which no request asked for"
                    if isinstance(exc, httptools.HttpParserUpgrade)
                    else f"backend sent a malformed HTTP response: {exc}"))
                return
            # bytes after a whole answer: the answer stands, the connection is not reused
        else:
            if self._done and self.keep_alive:
                # A whole answer, and the parser is back at an answer's start: lent again.
                self._reader = reader.conn = None
                if len(_readers) < _MOST_READERS:
                    _readers.append(reader)
        if self._ready and self._callback is not None:
            self._ready = False
            self._pool._delivered(self, None)
        elif self._quickack and not self._done:
            # More of this answer is due: ACK what came at once, or a Nagle-bound sender
            # (GhostDriver) waits for our delayed ACK. A complete answer needs no syscall.
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                self._quickack = False

    def _drop_reader(self) -> None:
        if self._reader is not None:
            self._reader.conn = None  # (a reader mid-answer is never lent again)
            self._reader = None

    def eof_received(self) -> bool:
        # httptools has no end-of-input call: a body with neither a length nor chunking ends
        # here; any other answer still unfinished is cut short (connection_lost says so). The
        # head is here once its status is: `submit`'s answers have no _head future to ask.
        if self.status and not self._done and self._close_delimited():
            self.keep_alive = False
            self._done = True
            self._wake()
        return False

    def _close_delimited(self) -> bool:
        return self.length is None and not self.chunked

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._drop_reader()
        if self._sock is not None:
            self._sock.close()  # the duplicate descriptor
            self._sock, self._quickack = None, False
        if not self._done:
            self._fail(UpstreamError(f"backend closed the connection mid-response"
                                     f"{': ' + str(exc) if exc else ''}"))

    def pause_writing(self) -> None:  # request bodies are written whole or awaited per chunk
        pass

    def resume_writing(self) -> None:
        pass

    def _answered(self) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_result(None)
        self._ready = True

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._exc = exc
        if self._head is not None and not self._head.done():
            self._head.set_exception(exc)
        elif self._callback is not None:
            self._pool._delivered(self, exc)
        self._wake()

    def _expire(self) -> None:
        """The answer's deadline passed before its head arrived."""
        if self._head is not None and not self._head.done():
            self._head.set_exception(TimeoutError())
        elif self._callback is not None:
            self._pool._delivered(self, TimeoutError())

    # the client side
    def start(self, data: bytes) -> None:
        """Send a whole request (head and body) in one write."""
        self._head = self._loop.create_future()
        self.transport.write(data)

    async def read_head(self, timeout: float) -> None:
        # A bare timer on the future: asyncio.timeout's context manager cost ~4% of the proxy's
        # CPU per command (benchmarks/profile.py overhead).
        timer = self._loop.call_later(timeout, _expire, self._head)
        try:
            await self._head
        finally:
            timer.cancel()

    async def next_chunk(self, timeout: float | None = None) -> bytes:
        """The next piece of the body, b"" at its end; TimeoutError if none comes within
        `timeout` seconds (the head's deadline is over: a backend that stalls mid-body would
        hold the client and a backend slot for good)."""
        while True:
            if self._buffered:
                chunk = self._first
                if chunk is None:
                    chunk = self._chunks.popleft()
                else:
                    self._first = None
                self._buffered -= len(chunk)
                if self._paused and self._buffered < _HIGH_WATER // 2:
                    self._paused = False
                    self.transport.resume_reading()
                return chunk
            if self._done:
                return b""
            if self._exc is not None:
                raise self._exc
            self._waiter = waiter = self._loop.create_future()
            timer = (self._loop.call_later(timeout, _expire, waiter, TimeoutError(
                f"no byte of the answer's body for {timeout:g}s")) if timeout else None)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()

    async def read_body(self, timeout: float | None = None) -> bytes:
        parts = []
        while chunk := await self.next_chunk(timeout):
            parts.append(chunk)
        return b"".join(parts)


_NEVER = float("inf")
_SLACK = 0.001  # a timer may fire up to a millisecond early (the loop's clock resolution)


def _expire(future: asyncio.Future, exc: BaseException | None = None) -> None:
    if not future.done():
        future.set_exception(exc or TimeoutError())


class Slots:
    """A counting semaphore whose uncontended acquire is one decrement (asyncio.Semaphore's
    was ~3% of the proxy's CPU per command). Waiters are served in order; a released slot is
    handed straight to the next one, so a newcomer cannot overtake it, and `free` stays 0 while
    anyone waits: a free slot is proof that nobody does."""

    __slots__ = ("free", "_waiters", "_loop")

    def __init__(self, count: int) -> None:
        self.free = count
        self._waiters: deque[asyncio.Future] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None  # kept: get_running_loop is a getpid

    def enqueue(self, take) -> None:
        """Wait in line without a coroutine: `take()` is called when a slot is handed over."""
        if self.free > 0:
            self.free -= 1
            take()
        else:
            self._waiters.append(take)

    async def acquire(self) -> None:
        if self.free > 0:
            self.free -= 1
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot just as we were cancelled: pass it on
            raise

    def release(self) -> None:
        # With a slot free nobody waits: the usual case, many backends or not, leaves the
        # queue (another object, cold by then) untouched.
        while not self.free and self._waiters:
            waiter = self._waiters.popleft()
            if not isinstance(waiter, asyncio.Future):
                waiter()  # an enqueued callback: the slot is taken at once
                return
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


class Response:
    """One backend answer; the body is read with `read()` or streamed with `chunks()`, then the
    response must be released (`release()`), which returns the connection to the pool."""

    __slots__ = ("status", "forward", "length", "_conn", "_pool", "_released")

    def __init__(self, conn: _Connection, pool: "Upstream") -> None:
        self.status = conn.status
        self.forward = conn.forward  # header lines minus hop-by-hop ones, ready to send on
        self.length = conn.length
        self._conn, self._pool, self._released = conn, pool, False

    def ready_body(self) -> bytes | None:
        """The whole body if it has all arrived already (no await needed), else None."""
        conn = self._conn
        if conn._done and conn._exc is None:
            data = conn._first
            if data is None or len(data) != conn._buffered:  # not in one piece
                data = b"".join([data or b"", *conn._chunks])
                conn._chunks.clear()
            conn._first, conn._buffered = None, 0
            if conn._paused:
                conn._paused = False
                conn.transport.resume_reading()
            return data
        return None

    async def read(self, timeout: float | None = None) -> bytes:
        """The whole body; TimeoutError if the backend sends none of it for `timeout` s."""
        return await self._conn.read_body(timeout)

    async def chunks(self, timeout: float | None = None) -> AsyncIterator[bytes]:
        while chunk := await self._conn.next_chunk(timeout):
            yield chunk

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._give_back(self._conn)


class Deadlines:
    """The answers awaited, by deadline, under one timer: a timer per request (call_later +
    cancel) cost about 2 us, 5% of the proxy's CPU per command. One is shared by all of a
    server's backends, so with many backends a command touches one warm table, not its
    backend's own, cold one."""

    __slots__ = ("due", "_timer", "_at")

    def __init__(self) -> None:
        self.due: dict[_Connection, float] = {}  # the connection whose answer is awaited -> deadline
        self._timer: asyncio.TimerHandle | None = None
        self._at = _NEVER

    def watch(self, conn: _Connection, timeout: float) -> None:
        loop = conn._loop
        deadline = loop.time() + timeout
        self.due[conn] = deadline
        if deadline < self._at:
            self._arm(loop, deadline)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._at = when
        self._timer = loop.call_at(when, self._expire_due, loop)

    def _expire_due(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the answers whose deadline has passed (TimeoutError), and sleep until the next."""
        self._timer, self._at = None, _NEVER
        now = loop.time() + _SLACK
        try:
            for conn, deadline in list(self.due.items()):
                if deadline <= now:
                    conn._expire()  # its request forgets the deadline
        finally:
            # From the table as the sweep left it: an expiry's callback may have sent another
            # request (armed already, if earlier), and a failing one must not disarm the rest.
            later = min((d for d in self.due.values() if d > now), default=_NEVER)
            if later < self._at:
                self._arm(loop, later)


class Upstream(Slots):
    """The bounded set of connections to one backend. It is its own Slots (the bound on
    requests in flight) and keeps its warmest idle connection apart from the rest: with many
    backends each is a cold object, and a command touches the fewest (the hot fields first)."""

    __slots__ = ("_top", "in_use", "_deadlines", "_clock", "_outbox", "_base", "host_header",
                 "_idle", "limit", "host", "port", "base_path", "ssl", "unix_socket",
                 "opened_total", "stale_total")

    def __init__(self, url: str, limit: int, unix_socket: str | None = None,
                 deadlines: Deadlines | None = None, outbox: Outbox | None = None) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/")
        self._base = self.base_path.encode()
        self.ssl = parts.scheme == "https"
        self.unix_socket = unix_socket
        self.host_header = parts.netloc.encode()
        self.limit = limit
        Slots.__init__(self, limit)
        self._top: _Connection | None = None  # the idle connection used last (the warmest)
        self._idle: list[_Connection] = []  # the other idle ones, the oldest first
        self.in_use = 0
        self.opened_total = 0
        self.stale_total = 0  # replay_stale requests sent again after a reused connection broke
        self._clock = deadlines or Deadlines()
        self._deadlines = self._clock.due  # (its table, kept at hand: two lookups per command)
        self._outbox = outbox or Outbox()  # the requests `submit` sends: see outbox.py

    async def _open(self, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                if self.unix_socket:
                    _, conn = await loop.create_unix_connection(_Connection, self.unix_socket)
                else:
                    _, conn = await loop.create_connection(
                        _Connection, self.host, self.port, ssl=self.ssl or None)
        except (OSError, TimeoutError) as exc:
            raise NotConnected(_connect_reason(exc)) from None
        self.opened_total += 1
        return conn

    def head(self, method: str, target: str, headers: Iterable[tuple[bytes, bytes]] | bytes,
             length: int) -> bytes:
        """The request head: `headers` as (name, value) pairs (hop-by-hop ones are dropped here)
        or as header lines a server already filtered (front.Request.forward). Bodies are whole
        (front.py reads them so): every request has a length."""
        if not isinstance(headers, bytes):
            headers = b"".join(b"%b: %b\r\n" % (name, value) for name, value in headers
                               if name.lower() not in HOP_BY_HOP)
        return b"%b %b%b HTTP/1.1\r\nHost: %b\r\n%bContent-Length: %d\r\n\r\n" % (
            method.encode(), self._base, target.encode(), self.host_header, headers, length)

    async def request(self, method: str, target: str,
                      headers: Iterable[tuple[bytes, bytes]] | bytes,
                      body: bytes | None, *, timeout: float, connect_timeout: float = 10.0,
                      replay_stale: bool = False) -> Response:
        """Send one request; returns when the response head has arrived.

        Raises NotConnected when no connection could be opened (the request was not sent) and
        UpstreamError / TimeoutError after it may have been sent. With `replay_stale`, an idle
        connection is reused only if warm, and a reused one that breaks
        before any byte of the answer is replaced by a fresh one, once (see the module's doc).
        """
        head = self.head(method, target, headers, len(body) if body else 0)
        data = head + body if body else head
        if self.free > 0:  # inline: a coroutine call costs ~1 us
            self.free -= 1
        else:
            await self.acquire()
        conn = None
        try:
            conn = self._warm_connection() if replay_stale else self._idle_connection()
            reused = conn is not None
            if conn is None:
                conn = await self._open(connect_timeout)
            while True:
                conn._reset()
                self.in_use += 1
                try:
                    conn.start(data)
                    self._clock.watch(conn, timeout)
                    try:
                        await conn._head  # read_head, inlined: one coroutine less per command
                    finally:
                        del self._deadlines[conn]
                except UpstreamError:
                    self.in_use -= 1
                    conn.transport.close()
                    if not (replay_stale and reused and not conn.received):
                        raise
                    reused = False  # once: the next connection is fresh (NotConnected: refused)
                    self.stale_total += 1
                    conn = await self._open(connect_timeout)
                    continue
                except BaseException:
                    self.in_use -= 1
                    conn.transport.close()
                    raise
                return Response(conn, self)
        except BaseException:
            self.release()
            raise

    def submit(self, method: str, target: str, headers: bytes, body: bytes | None,
               timeout: float, callback, connect_timeout: float = 10.0,
               replay_stale: bool = False) -> None:
        """`request` without a coroutine, for a whole body: `callback(answer, None)` gets the
        Response once its head (and a body up to WHOLE) is here, or `callback(None, exc)` the
        failure (NotConnected, UpstreamError, TimeoutError). The callback runs outside the
        parser's callbacks; the answer must be released, as from `request`. `replay_stale`
        keeps `request`'s rule: NotConnected is still the proof that the backend never saw it."""
        head = self.head(method, target, headers, len(body) if body else 0)
        data = head + body if body else head
        if self.free > 0:
            self.free -= 1
            self._submit(data, timeout, callback, connect_timeout, replay_stale)
        else:
            self.enqueue(partial(self._submit, data, timeout, callback, connect_timeout,
                                  replay_stale))

    def _submit(self, data: bytes, timeout: float, callback, connect_timeout: float,
                replay_stale: bool = False) -> None:
        """Holding a slot: send on an idle connection, or open one (a task: the rare case)."""
        conn = self._warm_connection() if replay_stale else self._idle_connection()
        if conn is None:
            asyncio.get_running_loop().create_task(
                self._open_and_submit(data, timeout, callback, connect_timeout))
            return
        self._start(conn, data, timeout, callback)
        if replay_stale:  # reused: if it turns out stale, sent once more on a fresh one
            conn._replay = (data, timeout, connect_timeout)

    async def _open_and_submit(self, data: bytes, timeout: float, callback,
                               connect_timeout: float) -> None:
        try:
            conn = await self._open(connect_timeout)
        except NotConnected as exc:
            self.release()
            callback(None, exc)
            return
        self._start(conn, data, timeout, callback)

    def _start(self, conn: _Connection, data: bytes, timeout: float, callback) -> None:
        self.in_use += 1
        conn._reset()
        conn._pool, conn._callback = self, callback
        self._outbox.write(conn.transport, data)
        self._clock.watch(conn, timeout)

    def _warm_connection(self) -> _Connection | None:
        """An idle connection answered within the last WARM seconds, or None: none answered
        lately, so a fresh connection, whose refusal is proof."""
        top = self._top
        while top is not None and (top.lost or top.transport.is_closing()):
            idle = self._idle  # (closed while idle: the next one is what the rule is about)
            self._top = top = idle.pop() if idle else None
        if top is not None and top.idle_since < top._loop.time() - WARM:
            return None
        return self._idle_connection()

    def _idle_connection(self) -> _Connection | None:
        """The most recently used idle connection still open (LIFO: the warmest), or None."""
        while (conn := self._top) is not None:
            idle = self._idle
            self._top = idle.pop() if idle else None
            if not conn.lost and not conn.transport.is_closing():
                return conn
        return None

    def _delivered(self, conn: _Connection, exc: BaseException | None) -> None:
        callback, conn._callback = conn._callback, None
        del self._deadlines[conn]
        if exc is None:
            callback(Response(conn, self), None)
            return
        self.in_use -= 1
        conn.transport.close()
        replay = conn._replay
        if replay is not None and not conn.received and isinstance(exc, UpstreamError):
            # Stale (see the module's doc): once more, over a fresh connection, slot kept.
            self.stale_total += 1
            data, timeout, connect_timeout = replay
            conn._loop.create_task(self._open_and_submit(data, timeout, callback, connect_timeout))
            return
        self.release()
        callback(None, exc)

    async def check(self, target: str, timeout: float) -> tuple[int, bytes]:
        """One health check over its own short-lived connection, outside the command slots, so a
        backend busy with long commands is still checked (and counted in GhostDriver's ~10)."""
        async with asyncio.timeout(timeout):
            conn = await self._open(timeout)
            try:
                conn._reset()
                conn.start(b"GET %b%b HTTP/1.1\r\nHost: %b\r\nConnection: close\r\n\r\n"
                           % (self.base_path.encode(), target.encode(), self.host_header))
                await conn.read_head(timeout)
                return conn.status, await conn.read_body()
            finally:
                conn.transport.close()

    def _give_back(self, conn: _Connection) -> None:
        self.in_use -= 1
        if (conn._done and conn.keep_alive and not conn.lost  # reusable
                and not conn.transport.is_closing()):
            if conn._paused:  # a long body released unread: what follows must be read
                conn._paused = False
                conn.transport.resume_reading()
            top = self._top
            if top is None:
                conn.idle_since = conn._loop.time()
                self._top = conn
            elif len(self._idle) + 1 < self.limit:
                conn.idle_since = conn._loop.time()
                self._idle.append(top)
                self._top = conn
            else:
                conn.transport.close()
        else:
            conn.transport.close()
        self.release()

    def close(self) -> None:
        """Close the idle connections. Answers still awaited keep their deadlines: the shared
        timer stays armed while any is pending (a removed backend that hangs still times out)."""
        if self._top is not None:
            self._top.transport.close()
            self._top = None
        for conn in self._idle:
            conn.transport.close()
        self._idle.clear()


def _connect_reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "connect timed out"
    return f"connect failed: {exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)
