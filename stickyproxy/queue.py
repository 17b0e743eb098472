"""The one FIFO queue of new sessions waiting for a free slot.

A free slot is handed to the head of the queue *with its backend already reserved* (the picker
counts it as pending), so a new arrival can never take the slot a waiter was woken for: first in,
first served (a retry that may use none of what is free keeps its place, and the others pass).
A waiter that gives up (timeout, or its client disconnected and its handler was cancelled)
leaves the queue at once and gives back a slot it was handed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable


class QueueFull(Exception):
    pass


@dataclass(eq=False, slots=True)
class Waiter:
    cookie: str | None
    tried: tuple[str, ...]
    future: asyncio.Future
    since: float  # when it first queued: a waiter back at the head keeps its age
    entered: float = field(default_factory=time.monotonic)  # this stay in the queue


Pick = Callable[[str | None, tuple[str, ...]], "str | None"]  # reserve a backend, or None
Release = Callable[[str], None]  # give back a reservation that was never used


class SessionQueue:
    def __init__(self, pick: Pick, release: Release, max_length: int) -> None:
        self._pick, self._release = pick, release
        self.max_length = max_length
        self._waiters: deque[Waiter] = deque()
        self.waited_total = 0
        self.timeouts_total = 0
        self.abandoned_total = 0
        self.refused_total = 0
        self.wait_seconds_total = 0.0
        self.wait_seconds_max = 0.0

    def __len__(self) -> int:
        return len(self._waiters)

    def oldest_wait(self, now: float) -> float:
        return now - self._waiters[0].since if self._waiters else 0.0

    def admit(self, cookie: str | None, tried: tuple[str, ...] = ()) -> str | None:
        """A reserved backend for a new arrival, or None if it has to queue. No barging: while
        anyone waits, newcomers queue behind them."""
        if self._waiters:
            return None
        return self._pick(cookie, tried)

    async def wait(self, cookie: str | None, tried: tuple[str, ...], timeout: float,
                   since: float | None = None) -> str:
        """Queue until a backend is reserved for us; raises QueueFull or TimeoutError. `since`
        (monotonic, when it first queued): a waiter whose turn came but whose backend could no
        longer take it waits again at the head, still one waiter as old as its first wait (no
        second count, no refusal: it was admitted already). Those served in the tick it was
        out of the queue stay served."""
        again = since is not None
        if not again and len(self._waiters) >= self.max_length:
            self.refused_total += 1
            raise QueueFull()
        waiter = Waiter(cookie, tried, asyncio.get_running_loop().create_future(),
                        since if again else time.monotonic())
        if again:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
            self.waited_total += 1
        self.dispatch()  # a slot may have freed between admit() and now
        delivered = False
        try:
            async with asyncio.timeout(timeout):
                backend_id = await waiter.future
            delivered = True
            return backend_id
        except TimeoutError:
            self.timeouts_total += 1
            raise
        except asyncio.CancelledError:
            self.abandoned_total += 1
            raise
        finally:
            self._leave(waiter, delivered)

    def _leave(self, waiter: Waiter, delivered: bool) -> None:
        now = time.monotonic()
        self.wait_seconds_total += now - waiter.entered  # (a stay before this one was added then)
        self.wait_seconds_max = max(self.wait_seconds_max, now - waiter.since)
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass
        future = waiter.future
        if not delivered and future.done() and not future.cancelled() and future.exception() is None:
            self._release(future.result())  # handed a slot, then gave up: give it back
            self.dispatch()

    def dispatch(self) -> None:
        """Hand free slots to waiters, oldest first; call whenever capacity may have freed.
        A waiter that may not use what is free (a retry, which excludes the backends it tried)
        keeps its place while those behind it are served: else the free slot idles, and the
        whole queue with it, until another one frees."""
        waiters = self._waiters
        kept = 0  # waiters at the front that may use nothing free now
        while len(waiters) > kept:
            waiter = waiters[kept]
            if waiter.future.done():
                del waiters[kept]
                continue
            backend_id = self._pick(waiter.cookie, waiter.tried)
            if backend_id is None:
                if not waiter.tried:
                    return  # nothing free for anyone
                kept += 1
                continue
            del waiters[kept]
            waiter.future.set_result(backend_id)

    def fail_all(self, exc: BaseException) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(exc)

