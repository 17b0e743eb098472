"""Session and backend lifecycle decisions (pure): when a session has expired, when a backend is
due for recycling, and whether another may start draining now. Time is a parameter.

The server's lifecycle loop takes a snapshot, asks these functions, then does the I/O (deleting
sessions on backends, starting replacements, retiring drained backends). Recycling replaces the
cron job that restarted every PhantomJS every 20 minutes and killed live sessions: a backend due
for it stops taking new sessions, its replacement starts first, and it is stopped only once its
live sessions have finished (or reached their idle timeout).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

from .sessions import EndReason, Session

log = logging.getLogger("stickyproxy")


def expiry(session: Session, now: float, idle_timeout: float,
           max_age: float) -> tuple[EndReason, str] | None:
    """Why `session` must end now, or None. 0 turns a limit off."""
    if max_age and now - session.created >= max_age:
        return EndReason.MAX_AGE, f"older than {fmt(max_age)}"
    if idle_timeout and not session.busy and now - session.last_used >= idle_timeout:
        return EndReason.IDLE, f"no command for {fmt(idle_timeout)}"
    return None


def next_look(session: Session, now: float, idle_timeout: float, max_age: float) -> float:
    """The earliest time `session`, not expired at `now`, can expire. A session busy at `now`
    is idle from an answer still to come, so not before now + idle_timeout. Its last use only
    moves later, so this is never late; it is early when the session is used meanwhile."""
    times = []
    if max_age:
        times.append(session.created + max_age)
    if idle_timeout:
        times.append((now if session.busy else session.last_used) + idle_timeout)
    return min(times)


class Reaper:
    """Which sessions have expired, without looking at every session on every tick: a scan of
    all of them took 11 ms per 100,000 sessions, once a second, and stalled every request behind
    it. Session ids wait in buckets of `tick` seconds (a timing wheel) for the earliest time they
    can expire (`next_look`); a session due but used meanwhile goes back for its new earliest
    time. So each live session is looked at about once per idle timeout however busy it is, and
    reaped at most one bucket later than the scan would have (so at most two of the loop's
    ticks). The ids of ended sessions (and an id pinned twice) are dropped when their bucket
    comes, or sooner when they outnumber the live sessions (`_compact`)."""

    def __init__(self, idle_timeout: float, max_age: float, tick: float) -> None:
        self.idle_timeout, self.max_age, self.tick = idle_timeout, max_age, tick
        self.on = bool(idle_timeout or max_age)
        self._buckets: dict[int, list[str]] = {}
        self._order: list[int] = []  # a heap of the buckets' numbers: no scan of the keys
        self._taken: int | None = None  # the last bucket handed out
        self._size = 0  # ids in all buckets
        self.looked_total = 0  # sessions looked at (each costs an expiry check)

    def __len__(self) -> int:
        return self._size

    def watch(self, session: Session, now: float) -> None:
        if self.on:
            self._add(session.id, next_look(session, now, self.idle_timeout, self.max_age))

    def _add(self, sid: str, at: float) -> None:
        bucket = math.ceil(at / self.tick)  # a bucket is taken only once all of it is due
        if self._taken is not None and bucket <= self._taken:
            bucket = self._taken + 1  # (float rounding; and never into a bucket already taken)
        ids = self._buckets.get(bucket)
        if ids is None:
            ids = self._buckets[bucket] = []
            heapq.heappush(self._order, bucket)
        ids.append(sid)
        self._size += 1

    def expired(self, live: dict[str, Session], now: float) -> list[tuple[str, EndReason, str]]:
        """The sessions of `live` to end at `now`, with why; the others due go back."""
        if not self.on:
            return []
        if self._size > 2 * len(live) + 1024:
            self._compact(live)
        last = math.floor(now / self.tick)
        order, due = self._order, []
        while order and order[0] <= last:
            due.append(self._buckets.pop(heapq.heappop(order)))
        self._taken = last if self._taken is None else max(self._taken, last)
        out = []
        # (dict.fromkeys: an id pinned twice is looked at once, and goes back once)
        for sid in dict.fromkeys(sid for ids in due for sid in ids):
            session = live.get(sid)
            if session is None:
                continue  # ended meanwhile
            self.looked_total += 1
            verdict = expiry(session, now, self.idle_timeout, self.max_age)
            if verdict:
                out.append((sid, *verdict))
            else:
                self._add(sid, next_look(session, now, self.idle_timeout, self.max_age))
        self._size -= sum(len(ids) for ids in due)
        return out

    def _compact(self, live: dict[str, Session]) -> None:
        """Drop the ids of ended sessions, and all but the earliest entry of an id: with only a
        long max age set, ended ids would otherwise wait for hours. Linear, but run only once
        the ids have doubled since the last time, so it adds a constant to each pin."""
        seen: set[str] = set()
        for bucket in sorted(self._buckets):
            kept = []
            for sid in self._buckets[bucket]:
                if sid in live and sid not in seen:
                    seen.add(sid)
                    kept.append(sid)
            if kept:
                self._buckets[bucket] = kept
            else:
                del self._buckets[bucket]
        self._order = list(self._buckets)
        heapq.heapify(self._order)
        self._size = len(seen)


@dataclass(frozen=True, slots=True)
class Wear:
    """What a backend has been through since it (re)started."""

    sessions: int  # sessions created on it
    running_for: float  # seconds
    memory: int | None  # resident bytes, when known


def recycle_reason(wear: Wear, after_sessions: int, after_seconds: float,
                   above_memory: int) -> str | None:
    """A sentence saying why this backend is due for recycling, or None."""
    if after_sessions and wear.sessions >= after_sessions:
        return f"created {wear.sessions} sessions (--recycle-after-sessions {after_sessions})"
    if after_seconds and wear.running_for >= after_seconds:
        return f"ran {fmt(wear.running_for)} (--recycle-after {fmt(after_seconds)})"
    if above_memory and wear.memory is not None and wear.memory > above_memory:
        return (f"resident memory {wear.memory >> 20} MiB above "
                f"--recycle-above-memory {above_memory >> 20} MiB")
    return None


def may_start_recycling(draining_now: int, max_recycling: int) -> bool:
    return draining_now < max_recycling


def fmt(seconds: float) -> str:
    """Durations as people write them: 90 -> "1m30s", 0.25 -> "250ms"."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((hours, "h"), (minutes, "m"), (secs, "s")) if v) or "0s"


# --- the loop (I/O) -------------------------------------------------------------------------


class Lifecycle:
    """Ends sessions on their backends, reaps expired ones, recycles worn backends and drains
    the whole proxy on shutdown. `providers` maps a backend source to its provider; a provider
    that can recycle has `replace(backend_id) -> new id` and `retire(backend_id)`."""

    def __init__(self, pool, sessions, settings, providers: dict[str, Any],
                 memory: Callable[[str], int | None] = lambda backend_id: None) -> None:
        self.pool, self.sessions, self.settings = pool, sessions, settings
        self.providers = providers
        self.memory = memory
        self.recycled_total = 0
        self._deletes: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        # min() over a tuple: with both limits off (0) there is nothing but the 1 s default
        self._tick = max(0.05, min((1.0, *(t / 4 for t in (settings.session_idle_timeout,
                                                           settings.session_max_age) if t))))
        self.reaper = Reaper(settings.session_idle_timeout, settings.session_max_age, self._tick)
        for session in sessions.live.values():
            self.reaper.watch(session, time.monotonic())
        sessions.on_pin.append(lambda session: self.reaper.watch(session, time.monotonic()))

    # ending sessions
    def end(self, sid: str, reason: EndReason, detail: str = "") -> bool:
        """Drop the pin and delete the session on its backend (in the background, tracked)."""
        session = self.sessions.end(sid, reason, detail)
        if session is None:
            return False
        backend = self.pool.get(session.backend_id)
        if backend is not None:
            self.delete(backend, session.backend_sid)
        return True

    def delete(self, backend, backend_sid: str) -> None:
        """Delete a session on its backend (by the backend's own id), in the background, tracked."""
        if backend.upstream is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._delete(backend, backend_sid), name=f"delete-{backend_sid}")
        self._deletes.add(task)
        task.add_done_callback(self._deletes.discard)

    async def _delete(self, backend, sid: str) -> None:
        timeout = self.settings.check_timeout
        try:
            answer = await backend.upstream.request("DELETE", f"/session/{sid}", (), None,
                                                    timeout=timeout)
            try:  # (a long or broken answer must not keep the connection's slot, nor hang)
                async with asyncio.timeout(timeout):
                    await answer.read()
            finally:
                answer.release()
            log.info("SESSION_DELETED session=%s backend=%s status=%d", sid, backend.id, answer.status)
        except (OSError, TimeoutError) as exc:
            log.warning('SESSION_DELETE_FAILED session=%s backend=%s reason="%s"', sid, backend.id,
                        exc or "timeout")

    async def flush(self) -> None:
        """Wait for the deletes under way."""
        while self._deletes:
            await asyncio.gather(*list(self._deletes), return_exceptions=True)

    # the loop
    async def run(self) -> None:
        while True:
            self.reap(time.monotonic())
            await self.recycle(time.monotonic())
            try:
                # asyncio.timeout, not wait_for: on 3.11 a cancel landing in the same tick as
                # the event is lost by wait_for, and shutdown would hang on this task.
                async with asyncio.timeout(self._tick):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    def reap(self, now: float) -> None:
        try:
            for sid, reason, detail in self.reaper.expired(self.sessions.live, now):
                self.end(sid, reason, detail)
        except Exception:  # (a bug of ours: recycling, and reaping on the next tick, go on)
            log.exception("REAP_FAILED")

    def _recycler(self, backend):
        provider = self.providers.get(backend.spec.source)
        return provider if provider is not None and hasattr(provider, "replace") else None

    @property
    def recycling_on(self) -> bool:
        s = self.settings
        return bool(s.recycle_after_sessions or s.recycle_after or s.recycle_above_memory)

    def consider(self, backend, now: float) -> None:
        """Drain `backend` for recycling if it is worn out. Called on every new session too, so
        `--recycle-after-sessions N` means N, not N plus what arrived before the next tick."""
        s = self.settings
        if (not self.recycling_on or backend.admin != "ready" or not backend.health.up
                or not self._recycler(backend)):
            return
        wear = Wear(backend.generation_sessions, now - backend.started, self.memory(backend.id))
        reason = recycle_reason(wear, s.recycle_after_sessions, s.recycle_after,
                                s.recycle_above_memory)
        if reason and may_start_recycling(sum(1 for b in self.pool if b.recycling),
                                          s.max_recycling):
            self.pool.drain(backend.id, f"recycling: {reason}", recycling=True)
            self._wake.set()

    async def recycle(self, now: float) -> None:
        for backend in list(self.pool):
            try:
                await self._recycle_one(backend, now)
            except Exception:  # (a provider's error, e.g. the Docker API's: the next tick retries)
                # Not out of run(): reaping and every other backend's recycling must go on.
                log.exception("RECYCLE_FAILED backend=%s", backend.id)

    async def _recycle_one(self, backend, now: float) -> None:
        if backend.spec.meta.get("gone"):
            await self._retire_gone(backend)
        elif backend.recycling and not backend.replacement:
            # Keep capacity: its replacement starts now, while it still serves its sessions.
            try:
                backend.replacement = await self._recycler(backend).replace(backend.id)
                backend.replace_started = time.monotonic()
            except Exception:
                backend.replace_failed = True  # (new sessions do not queue for it meanwhile)
                raise  # (logged by recycle(); the next tick tries again)
            backend.replace_failed = False
        elif backend.recycling:
            await self._maybe_retire(backend)
        else:
            self.consider(backend, now)

    async def _retire_gone(self, backend) -> None:
        """A discovered backend whose address went away: forget it once it is empty."""
        if self.sessions.per_backend.get(backend.id, 0) or backend.pending:
            return
        provider = self.providers.get(backend.spec.source)
        if provider is not None and hasattr(provider, "retire"):
            log.info('BACKEND_RETIRED backend=%s reason="%s"', backend.id, backend.drain_reason)
            await provider.retire(backend.id)

    async def _maybe_retire(self, backend) -> None:
        if self.sessions.per_backend.get(backend.id, 0) or backend.pending:
            return  # its live sessions finish first (or reach their idle timeout)
        replacement = self.pool.get(backend.replacement) if backend.replacement else None
        if backend.replacement and (replacement is None or not replacement.health.up):
            return  # capacity first: stop it only once its replacement takes sessions
        log.info("BACKEND_RECYCLED backend=%s replacement=%s", backend.id, backend.replacement or "-")
        self.recycled_total += 1
        await self._recycler(backend).retire(backend.id)

    # shutdown
    async def drain_all(self, timeout: float, hurry: asyncio.Event) -> None:
        """Let live sessions (and new ones still being created) finish for up to `timeout`,
        then delete what remains; with --session-key the other replicas serve it on, so it is
        only forgotten here."""
        began = time.monotonic()
        while ((len(self.sessions) or any(b.pending for b in self.pool))
               and time.monotonic() < began + timeout and not hurry.is_set()):
            await asyncio.sleep(0.1)
        why = (f"still open at a second signal, {fmt(time.monotonic() - began)} after the first"
               if hurry.is_set() else f"still open {fmt(timeout)} after SIGTERM")
        replicas = bool(getattr(self.settings, "session_key", ""))
        for sid in list(self.sessions.live):
            if replicas:  # (deleting it would end it for the client behind another replica)
                self.sessions.end(sid, EndReason.SHUTDOWN,
                                  f"{why}; left running for the other replicas (--session-key)")
            else:
                self.end(sid, EndReason.SHUTDOWN, why)
        await self.flush()
