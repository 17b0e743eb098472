"""A reference floor, not a product: the least a Python + uvloop sticky forwarder can spend per
request on this machine, to tell "Python is too slow" apart from "our code does too much".

Raw asyncio protocols and httptools on both sides, one dict lookup for the pinned session, pooled
keep-alive upstream connections (at most 8 per backend), the answer relayed as one write;
TCP_QUICKACK re-armed only while an answer is incomplete (GhostDriver's split header lines).
Round-robin placement; no health checks, queue, timeouts, stats or logs. The overhead part runs it as an extra row (`python-floor`).

    python -m benchmarks.floor_proxy --backend http://127.0.0.1:PORT [...]   # prints READY ...
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import os
import re
import signal
import socket
import sys
from urllib.parse import urlsplit

import httptools
import uvloop

_SID = re.compile(rb'"sessionId"\s*:\s*"([^"]+)"')
_PINNED = re.compile(rb"^(?:/wd/hub)?/session/([^/?]+)")
_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"host", b"content-length"}
LIMIT = 8


class Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future | None = None
        self.head: list[bytes] = []
        self.body: list[bytes] = []
        self.complete = False
        self.sock = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        s = transport.get_extra_info("socket")
        self.sock = socket.socket(s.family, socket.SOCK_STREAM, 0, fileno=os.dup(s.fileno()))

    def connection_lost(self, exc) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("backend closed"))

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        if not self.complete and self.sock is not None:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in _HOP:
            self.head.append(b"%b: %b\r\n" % (name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it after this callback
        self.done.set_result(self.parser.get_status_code())


class Backend:
    def __init__(self, url: str, label: str) -> None:
        self.served_by = b"X-Served-By: %b\r\n" % label.encode()  # lets the harness count placement
        u = urlsplit(url)
        self.host, self.port, self.netloc = u.hostname, u.port, u.netloc.encode()
        self.idle: list[Upstream] = []
        self.busy = 0  # at most LIMIT connections: GhostDriver serves about 10 at once
        self.waiters: collections.deque = collections.deque()

    async def request(self, loop, method: bytes, target: bytes, headers: bytes, body: bytes):
        if self.busy >= LIMIT:
            w = loop.create_future()
            self.waiters.append(w)
            await w  # the slot is handed over by the finishing request
        else:
            self.busy += 1
        try:
            return await self._request(loop, method, target, headers, body)
        finally:
            if self.waiters:
                self.waiters.popleft().set_result(None)
            else:
                self.busy -= 1

    async def _request(self, loop, method: bytes, target: bytes, headers: bytes, body: bytes):
        up = None
        while self.idle:
            c = self.idle.pop()
            if not c.transport.is_closing():
                up = c
                break
        if up is None:
            _, up = await loop.create_connection(Upstream, self.host, self.port)
        up.head, up.body, up.complete = [], [], False
        up.done = loop.create_future()
        up.transport.write(b"%b %b HTTP/1.1\r\nHost: %b\r\n%bContent-Length: %d\r\n\r\n%b"
                           % (method, target, self.netloc, headers, len(body), body))
        status = await up.done
        head, payload = b"".join(up.head) + self.served_by, b"".join(up.body)
        if up.keep_alive:
            self.idle.append(up)
        else:
            up.transport.close()
        return status, head, payload


class Client(asyncio.Protocol):
    backends: list[Backend] = []
    pins: dict[bytes, Backend] = {}
    rr = itertools.count()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.url, self.headers, self.body = b"", [], []

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in _HOP:
            self.headers.append(b"%b: %b\r\n" % (name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        url, headers, body = self.url, b"".join(self.headers), b"".join(self.body)
        self.url, self.headers, self.body = b"", [], []
        self.loop.create_task(self.forward(method, url, headers, body, self.parser.should_keep_alive()))
        # (should_keep_alive is read inside on_message_complete, before llhttp resets it)

    async def forward(self, method, url, headers, body, keep_alive) -> None:
        m = _PINNED.match(url)
        if m:
            backend = self.pins.get(m.group(1))
            if backend is None:
                return self.reply(404, b"", b'{"status":6,"value":{"message":"no such session"}}', keep_alive)
        else:
            backend = self.backends[next(self.rr) % len(self.backends)]
        try:
            status, head, payload = await backend.request(self.loop, method, url, headers, body)
        except OSError:
            return self.reply(502, b"", b'{"status":13,"value":{"message":"backend failed"}}', keep_alive)
        if not m and method == b"POST":
            sm = _SID.search(payload)
            if sm:
                self.pins[sm.group(1)] = backend
        elif m and method == b"DELETE" and url.rstrip(b"/") == m.group(0):
            self.pins.pop(m.group(1), None)
        self.reply(status, head, payload, keep_alive)

    def reply(self, status: int, head: bytes, payload: bytes, keep_alive: bool) -> None:
        self.transport.write(b"HTTP/1.1 %d X\r\n%bContent-Length: %d\r\n%b\r\n%b" % (
            status, head, len(payload), b"" if keep_alive else b"Connection: close\r\n", payload))
        if not keep_alive:
            self.transport.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--backend", action="append", required=True)
    a = ap.parse_args()
    Client.backends = [Backend(u, f"b{i}") for i, u in enumerate(a.backend, 1)]
    host, port = a.listen.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Client, host, int(port))
    print(f"READY listen={host}:{server.sockets[0].getsockname()[1]}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    uvloop.run(main())
