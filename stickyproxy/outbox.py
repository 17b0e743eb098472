"""Writes to sockets gathered over one turn of the event loop: the first goes out at once, the
others at the end of the turn, each connection's in order.

Why: the kernel wakes a peer (the backend's server, a client) for a write that reaches it while
it sleeps, and waking is the dearest part of a write here. A fast peer (nginx, or a client's
event loop) handles one request in less time than stickyproxy takes to handle the next, so
between two of our writes it went back to sleep and was woken for every one. Gathered, the
writes of a turn reach their peers within microseconds of each other, while they are still
awake from the first. One request at a time waits for nothing: the first write of a turn is
not held back. Nor is much data: past `MOST_HELD` bytes what is held goes out at once, so a
transport's high-water mark still pauses its writer (a client pipelining requests and reading
no answer stops being served, as before).
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("stickyproxy")

MOST_HELD = 64 << 10  # bytes held at most (a transport's default high-water mark)


class Outbox:
    __slots__ = ("_held", "_size", "_turn", "_loop")

    def __init__(self) -> None:
        self._held: list[tuple[asyncio.WriteTransport, bytes]] = []
        self._size = 0  # bytes held
        self._turn = False  # a write went out in this turn: the next ones wait for its end
        self._loop: asyncio.AbstractEventLoop | None = None  # kept: get_running_loop is a getpid

    def write(self, transport: asyncio.WriteTransport, data: bytes) -> None:
        if self._turn:
            self._held.append((transport, data))
            self._size += len(data)
            if self._size > MOST_HELD:
                self.flush()
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        loop.call_soon(self._end_of_turn)
        self._turn = True  # (once the turn's end is sure to come)
        transport.write(data)

    def flush(self) -> None:
        """Write what is held now (before a connection is closed, so its last bytes go first)."""
        held = self._held
        if not held:
            return
        self._held, self._size = [], 0
        for transport, data in held:
            if not transport.is_closing():
                try:
                    transport.write(data)
                except (RuntimeError, OSError) as exc:  # (its own failure; the others go on)
                    log.warning('WRITE_FAILED reason="%s"', exc)

    def _end_of_turn(self) -> None:
        self._turn = False
        self.flush()
