"""The session table: which backend each live session is pinned to, and how every session ended.

Every end has one reason from the closed set `EndReason`; the same value labels the log line and
the stats counter, so the two cannot disagree. Recently ended ids are remembered (bounded) so a
client's next command learns *why* its session is gone instead of a bare "unknown session".
Time is a parameter: callers pass `now` (monotonic seconds).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterable, Iterator

log = logging.getLogger("stickyproxy")


class EndReason(str, Enum):
    CLIENT_DELETE = "client_delete"
    IDLE = "idle"
    MAX_AGE = "max_age"
    BACKEND_DOWN = "backend_down"  # its process/container exited, was removed or restarted
    BACKEND_OOM = "backend_oom"  # killed for memory: the kernel's OOM killer or our watchdog
    SHUTDOWN = "shutdown"
    ADMIN = "admin"
    SETUP_FAILED = "setup_failed"  # created, but what had to follow its creation failed


def reason_for_loss(provider_reason: str) -> EndReason:
    """A provider's word for a lost backend ("oom", "memory", "exited", "removed") -> EndReason."""
    return EndReason.BACKEND_OOM if provider_reason in ("oom", "memory") else EndReason.BACKEND_DOWN


def missing_sessions(pinned: Iterable["Session"], listed: Iterable[str]) -> list["Session"]:
    """Pinned sessions that their backend no longer lists (by the backend's own ids)."""
    listed = set(listed)
    return [s for s in pinned if s.backend_sid not in listed]


@dataclass(slots=True)
class Session:
    id: str
    backend_id: str
    generation: str
    created: float
    last_used: float
    cookie: str = ""
    bridge: Any = None  # bridge.BridgeSession: a W3C client on a JSONWP backend
    requests: int = 0
    owner: str = ""  # auth principal that created it; only the same may use it
    backend_sid: str = ""  # the backend's own id, when the client sees a signed one (routes.py)
    learned: bool = False  # created through another replica, routed here by its signed id
    busy: int = 0  # its commands in flight: it is not idle while one runs
    # backends.Backend it is pinned to, kept by its first command (one dict lookup less on
    # every command: with many backends, cold cache lines); while the backend serves
    backend: Any = None

    def __post_init__(self) -> None:
        if not self.backend_sid:
            self.backend_sid = self.id

    @property
    def rewritten(self) -> bool:
        return self.backend_sid != self.id


@dataclass(frozen=True, slots=True)
class Ended:
    backend_id: str
    reason: EndReason
    detail: str


@dataclass
class SessionTable:
    remember_ended: int = 10_000
    live: dict[str, Session] = field(default_factory=dict)
    per_backend: Counter = field(default_factory=Counter)
    peak: Counter = field(default_factory=Counter)  # most live at once, per backend
    ended_by_reason: Counter = field(default_factory=Counter)
    ended_by_backend: dict = field(default_factory=dict)  # backend id -> Counter of reasons
    created_total: int = 0
    learned_total: int = 0
    _ended: OrderedDict = field(default_factory=OrderedDict)
    # (backend id, backend's own id) -> session, for the sessions whose client sees another id
    # (signed, routes.py); the others are found in `live` by the backend's id itself
    _rewritten: dict = field(default_factory=dict)
    on_end: list = field(default_factory=list)  # callables: a slot freed
    on_count: list = field(default_factory=list)  # callables(backend_id): its live count changed
    on_pin: list = field(default_factory=list)  # callables(session): a session pinned

    def __len__(self) -> int:
        return len(self.live)

    def get(self, sid: str) -> Session | None:
        return self.live.get(sid)

    def holder(self, backend_id: str, backend_sid: str) -> Session | None:
        """The live session that is `backend_sid` on that backend, whatever id its client sees."""
        session = self.live.get(backend_sid)
        if session is not None and session.backend_id == backend_id and not session.rewritten:
            return session
        return self._rewritten.get((backend_id, backend_sid)) if self._rewritten else None

    def pin(self, session: Session) -> None:
        self.live[session.id] = session
        if session.rewritten:
            self._rewritten[(session.backend_id, session.backend_sid)] = session
        self.per_backend[session.backend_id] += 1
        if session.learned:
            self.learned_total += 1
        else:
            self.created_total += 1
        self.peak[session.backend_id] = max(self.peak[session.backend_id],
                                            self.per_backend[session.backend_id])
        self._ended.pop(session.id, None)
        for listener in self.on_count:
            listener(session.backend_id)
        for listener in self.on_pin:
            listener(session)
        log.info("SESSION_%s session=%s backend=%s", "LEARNED" if session.learned else "CREATED",
                 session.id, session.backend_id)

    def end(self, sid: str, reason: EndReason, detail: str = "") -> Session | None:
        session = self.live.pop(sid, None)
        if session is None:
            return None
        if session.rewritten and self._rewritten.get(
                (session.backend_id, session.backend_sid)) is session:
            del self._rewritten[(session.backend_id, session.backend_sid)]
        self.per_backend[session.backend_id] -= 1
        if self.per_backend[session.backend_id] <= 0:
            del self.per_backend[session.backend_id]
        for listener in self.on_count:  # before on_end: the queue it wakes places by these
            listener(session.backend_id)
        self.ended_by_reason[reason.value] += 1
        self.ended_by_backend.setdefault(session.backend_id, Counter())[reason.value] += 1
        self._ended[sid] = Ended(session.backend_id, reason, detail)
        while len(self._ended) > self.remember_ended:
            self._ended.popitem(last=False)
        log.info("SESSION_ENDED session=%s backend=%s reason=%s%s", sid, session.backend_id,
                 reason.value, f' detail="{detail}"' if detail else "")
        for listener in self.on_end:
            listener()
        return session

    def end_backend(self, backend_id: str, reason: EndReason, detail: str = "",
                    keep_generation: str | None = None) -> list[Session]:
        """End every session of a backend (all, or those not of `keep_generation`)."""
        doomed = [s.id for s in self.live.values() if s.backend_id == backend_id
                  and (keep_generation is None or s.generation != keep_generation)]
        return [s for s in (self.end(sid, reason, detail) for sid in doomed) if s]

    def why_ended(self, sid: str) -> Ended | None:
        return self._ended.get(sid)

    def of_backend(self, backend_id: str) -> Iterator[Session]:
        return (s for s in self.live.values() if s.backend_id == backend_id)
