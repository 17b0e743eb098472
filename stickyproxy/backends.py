"""A backend's record (where it is, its health, admin state and counters) and the pool of them.

Providers publish whole sets per source; the pool diffs them: new ids are added (not up until
their first good check), vanished ids are removed and their sessions ended, and an id whose
generation changed (its process was replaced) loses the sessions of the old generation, which
can never be served again. Listeners (the server's health-check tasks) hear of additions and
removals; the pool itself does no I/O.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from .health import DOWN, Health, CheckResult
from .providers import BackendSpec
from .routes import route_of
from .routing import Candidate, LoadIndex, choose
from .sessions import EndReason, SessionTable, reason_for_loss

log = logging.getLogger("stickyproxy")

READY, DRAIN = "ready", "drain"
REPLACEMENT_GRACE = 60.0  # seconds a recycled backend's replacement has to come up


@dataclass(eq=False, slots=True)
class Backend:
    spec: BackendSpec
    health: Health
    upstream: object = None  # upstream.Upstream, attached by the server (I/O lives there)
    # What every command reads, side by side (with many backends, each is a cold cache line):
    # `serving` mirrors "not down, not removed" (Pool keeps it), so a command need not read
    # the Health object too.
    serving: bool = True
    requests_total: int = 0
    served_by: bytes = b""  # the header line naming it on each answer (built once, not per answer)
    admin: str = READY
    last_check: CheckResult | None = None
    dialect: str = ""  # learned from checks and new-session answers: "jsonwp" | "w3c"
    pending: int = 0  # new sessions on their way to it
    sessions_total: int = 0
    errors_total: int = 0
    added: float = field(default_factory=time.time)
    lost_total: int = 0
    last_lost: str = ""
    drain_reason: str = ""  # why admin is DRAIN: "admin" or a recycling sentence
    recycling: bool = False
    replacement: str = ""  # id of the backend started to take its place
    replace_failed: bool = False  # starting its replacement failed on the last try
    replace_started: float = 0.0  # when its replacement was started (monotonic)
    started: float = field(default_factory=time.monotonic)  # this generation's start
    generation_sessions: int = 0  # sessions created since `started`

    def __post_init__(self) -> None:
        self.served_by = b"X-Stickyproxy-Backend: %b\r\n" % self.spec.id.encode()

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def takes_new_sessions(self) -> bool:
        return self.health.up and self.admin == READY


Listener = Callable[[Backend], None]


class Pool:
    def __init__(self, rise: int, fall: int, sessions: SessionTable, max_sessions: int = 0) -> None:
        self.rise, self.fall = rise, fall
        self.max_sessions = max_sessions
        self.sessions = sessions
        self.backends: dict[str, Backend] = {}
        self.by_route: dict[str, str] = {}  # routes.route_of(url) -> backend id
        self._by_source: dict[str, set[str]] = {}
        self.on_added: list[Listener] = []
        self.on_removed: list[Listener] = []
        self.on_capacity: list[Callable[[], None]] = []  # a slot may have freed: wake the queue
        self._index = LoadIndex()  # who takes new sessions, by load: kept by _sync
        # Reservations held on backends since removed, by id, until they are released or the
        # id is added again (a new address), which then counts them (`_add`).
        self._pending_of_removed: dict[str, int] = {}
        # what removed backends had counted (and errors counted on them after): the totals in
        # /stats only grow, whatever leaves the pool
        self.retired_requests_total = self.retired_errors_total = 0
        sessions.on_count.append(self._sync_id)

    def get(self, backend_id: str) -> Backend | None:
        return self.backends.get(backend_id)

    def __iter__(self):
        return iter(self.backends.values())

    # PoolSink
    def publish(self, source: str, specs: Sequence[BackendSpec]) -> None:
        wanted = {s.id: s for s in specs}
        old_ids = self._by_source.get(source, set())
        for backend_id in old_ids - wanted.keys():
            self._remove(backend_id, "removed from its source")
        for spec in wanted.values():
            current = self.backends.get(spec.id)
            if current is None:
                self._add(spec)
            elif current.spec != spec:
                if current.spec.generation != spec.generation:
                    self.sessions.end_backend(spec.id, EndReason.BACKEND_DOWN,
                                              "backend process was replaced",
                                              keep_generation=spec.generation)
                    current.started, current.generation_sessions = time.monotonic(), 0
                if (current.spec.url, current.spec.unix_socket) != (spec.url, spec.unix_socket):
                    self._remove(spec.id, "moved to a new address")
                    self._add(spec)
                else:
                    current.spec = spec
        for spec in wanted.values():  # a discovered address that went away drains, and back
            backend = self.backends.get(spec.id)
            if backend is None:
                continue
            if spec.meta.get("gone") and backend.admin == READY:
                self.drain(spec.id, f"gone from {spec.source}")
            elif not spec.meta.get("gone") and backend.drain_reason.startswith("gone from"):
                self.undrain(spec.id)
        self._by_source[source] = set(wanted)

    def count_request(self, backend: Backend) -> None:
        """The same for a request sent where the backend may have left the pool since the
        command began (the usual command is counted where the pool has just been asked)."""
        backend.requests_total += 1
        if self.backends.get(backend.id) is not backend:
            self.retired_requests_total += 1

    def count_error(self, backend: Backend) -> None:
        """A request `backend` failed; counted in the totals even once it has left the pool
        (an answer in flight at its removal, a session it created meanwhile)."""
        backend.errors_total += 1
        if self.backends.get(backend.id) is not backend:
            self.retired_errors_total += 1

    def lost(self, backend_id: str, reason: str) -> None:
        backend = self.backends.get(backend_id)
        if backend is None:
            return
        backend.lost_total += 1
        backend.last_lost = reason
        forced = backend.health.force_down()
        backend.serving = False
        self._sync(backend)
        if forced:
            log.warning('BACKEND_DOWN backend=%s check=lost reason="%s"', backend_id, reason)
        backend.last_check = CheckResult(False, "lost", f"backend {reason}", time.time())
        self.sessions.end_backend(backend_id, reason_for_loss(reason), f"backend {reason}")

    # health
    def record_check(self, backend: Backend, result: CheckResult) -> str | None:
        """Keep a check's result; returns the backend's new state when it changed."""
        backend.last_check = result
        if result.dialect:
            backend.dialect = result.dialect
        changed = backend.health.observe(result.ok)
        backend.serving = backend.health.state != DOWN
        self._sync(backend)
        if changed == DOWN:
            log.warning('BACKEND_DOWN backend=%s check=%s reason="%s"', backend.id, result.code,
                        result.reason)
        elif changed:
            log.info("BACKEND_UP backend=%s url=%s", backend.id, backend.spec.url)
            self.capacity_changed()
        return changed

    def capacity_changed(self) -> None:
        for listener in self.on_capacity:
            listener()

    # placement
    def candidates(self, exclude: Iterable[str] = ()) -> list[Candidate]:
        """Backends that take new sessions and have a free slot, with their load."""
        per, cap = self.sessions.per_backend, self.max_sessions
        found = []
        for b in self.backends.values():
            if b.takes_new_sessions and b.id not in exclude:
                load = per.get(b.id, 0) + b.pending
                if not cap or load < cap:
                    found.append(Candidate(b.id, load))
        return found

    def pick(self, cookie: str | None, tried: tuple[str, ...] = ()) -> str | None:
        """Choose a backend for a new session and reserve its slot (pending) until `release`."""
        if cookie:  # the hash needs every candidate
            backend_id = choose(self.candidates(exclude=tried), cookie)
        else:
            backend_id = self._index.least(tried, self.max_sessions)
            if backend_id is not None and self._index.load(backend_id) != self._load(backend_id):
                # Changed behind the pool's back (never by its own methods): rebuilt, and
                # this once chosen by a scan, so a stale index cannot misplace a session.
                log.warning("PLACEMENT_INDEX_REBUILT backend=%s", backend_id)
                for backend in self.backends.values():
                    self._sync(backend)
                backend_id = choose(self.candidates(exclude=tried))
        if backend_id is not None:
            backend = self.backends[backend_id]
            backend.pending += 1
            self._sync(backend)
        return backend_id

    def release(self, backend_id: str) -> None:
        stale = self._pending_of_removed.get(backend_id)
        if stale:  # its id is out of the pool: the count kept for it until it comes back
            if stale == 1:
                del self._pending_of_removed[backend_id]
            else:
                self._pending_of_removed[backend_id] = stale - 1
        else:
            backend = self.backends.get(backend_id)
            if backend is not None:
                backend.pending -= 1
                self._sync(backend)
        self.capacity_changed()

    def _load(self, backend_id: str) -> int | None:
        """What the index should hold for a backend: its load, or None if it takes none."""
        backend = self.backends.get(backend_id)
        if backend is None or not backend.takes_new_sessions:
            return None
        return self.sessions.per_backend.get(backend_id, 0) + backend.pending

    def _sync(self, backend: Backend) -> None:
        self._index.set(backend.id, self._load(backend.id))

    def _sync_id(self, backend_id: str) -> None:
        if backend_id in self.backends:
            self._index.set(backend_id, self._load(backend_id))

    def could_take(self, tried: Iterable[str] = ()) -> bool:
        """Is any backend taking new sessions, full or not? (If not, queueing is pointless.)"""
        tried = set(tried)
        return any(b.takes_new_sessions and b.id not in tried for b in self.backends.values())

    def replacing(self, tried: Iterable[str] = ()) -> bool:
        """Is a recycled backend's replacement on its way, so a new session may wait for it?
        Not started yet (it starts on the lifecycle's next tick), or started within
        REPLACEMENT_GRACE and not up yet; not when its start failed last time, nor when it
        refused this very request."""
        now = time.monotonic()
        for b in self.backends.values():
            if not b.recycling or b.replace_failed:
                continue
            if not b.replacement:
                return True
            if now - b.replace_started > REPLACEMENT_GRACE:
                continue  # (started, never came up: nothing to wait for)
            replacement = self.backends.get(b.replacement)
            if replacement is None:
                return True  # (a local one joins the pool once its port accepts connections)
            if not replacement.health.up and replacement.id not in tried:
                return True
        return False

    @property
    def any_up(self) -> bool:
        return any(b.health.up for b in self.backends.values())

    # admin state
    def drain(self, backend_id: str, reason: str, recycling: bool = False) -> Backend | None:
        backend = self.backends.get(backend_id)
        if backend is not None and backend.admin != DRAIN:
            backend.admin, backend.drain_reason, backend.recycling = DRAIN, reason, recycling
            self._sync(backend)
            log.info('BACKEND_DRAINING backend=%s reason="%s"', backend_id, reason)
        return backend

    def undrain(self, backend_id: str) -> Backend | None:
        backend = self.backends.get(backend_id)
        if backend is not None and backend.admin == DRAIN and not backend.recycling:
            backend.admin, backend.drain_reason = READY, ""
            self._sync(backend)
            log.info("BACKEND_READY backend=%s", backend_id)
            self.capacity_changed()
        return backend

    def _add(self, spec: BackendSpec) -> None:
        backend = Backend(spec, Health(self.rise, self.fall))
        # Reservations its id still has out from before a removal (a move, a flap) count on
        # it, since they are released by id. One may be a queued waiter's, handed over before
        # the move and sent here after it: uncounted, it would take this backend one session
        # over --max-sessions. The others only hold a slot until their attempt ends.
        backend.pending = self._pending_of_removed.pop(spec.id, 0)
        self.backends[spec.id] = backend
        self._sync(backend)
        self.by_route[route_of(spec.url)] = spec.id
        log.info("BACKEND_ADDED backend=%s url=%s source=%s", spec.id, spec.url, spec.source)
        for listener in self.on_added:
            listener(backend)

    def _remove(self, backend_id: str, why: str) -> None:
        backend = self.backends.pop(backend_id, None)
        if backend is None:
            return
        backend.serving = False
        self.retired_requests_total += backend.requests_total
        self.retired_errors_total += backend.errors_total
        if backend.pending:
            self._pending_of_removed[backend_id] = (
                self._pending_of_removed.get(backend_id, 0) + backend.pending)
        self._index.set(backend_id, None)
        if self.by_route.get(route_of(backend.spec.url)) == backend_id:
            del self.by_route[route_of(backend.spec.url)]
        self.sessions.end_backend(backend_id, EndReason.BACKEND_DOWN, f"backend {why}")
        log.info('BACKEND_REMOVED backend=%s reason="%s"', backend_id, why)
        for listener in self.on_removed:
            listener(backend)
