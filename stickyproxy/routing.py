"""Where a new session goes, and whether a failed attempt may be tried elsewhere (pure).

A pinned request needs no decision here: it goes to its session's backend, always. Placement only
ever happens for `POST /session`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from enum import Enum
from typing import Sequence


@dataclass(frozen=True, slots=True)
class Candidate:
    id: str
    load: int  # live sessions plus new sessions on their way to it


def rendezvous(key: str, ids: Sequence[str]) -> str | None:
    """Highest-random-weight hashing: the same key picks the same backend while it is up, and
    only keys of a backend that leaves move (HAProxy's `balance hdr(Cookie)` clients rely on the
    first property). blake2b, not hash(): it must agree across restarts and replicas."""
    best, best_weight = None, b""
    for backend_id in ids:
        weight = hashlib.blake2b(f"{key}\0{backend_id}".encode(), digest_size=8).digest()
        if weight > best_weight:
            best, best_weight = backend_id, weight
    return best


def choose(candidates: Sequence[Candidate], cookie: str | None = None,
           rng: random.Random | None = None) -> str | None:
    """A backend id for a new session among `candidates` (up and taking sessions), or None.

    With a Cookie header: its consistent hash. Otherwise the fewest live sessions, ties at random
    (so equal backends share the work instead of the first one taking every burst).
    """
    if not candidates:
        return None
    if cookie:
        return rendezvous(cookie, [c.id for c in candidates])
    least = min(c.load for c in candidates)
    tied = [c.id for c in candidates if c.load == least]
    return tied[0] if len(tied) == 1 else (rng or random).choice(tied)


class LoadIndex:
    """The backends that take new sessions, by load, so that "fewest live sessions, ties at
    random" costs the same with 1,000 backends as with 4 (a scan over them took 0.5 ms per new
    session at 1,000: benchmarks/routing_cost.py). The pool keeps it current (`set` when a
    backend's load or state changes); `least` is `choose` without a cookie, over what it holds.
    """

    def __init__(self) -> None:
        self._load: dict[str, int] = {}  # backend id -> load, for backends taking sessions
        self._bucket: dict[int, list[str]] = {}  # load -> ids (a list: random.choice is O(1))
        self._at: dict[str, int] = {}  # backend id -> its place in its bucket's list

    def __len__(self) -> int:
        return len(self._load)

    def __contains__(self, backend_id: str) -> bool:
        return backend_id in self._load

    def load(self, backend_id: str) -> int | None:
        return self._load.get(backend_id)

    def set(self, backend_id: str, load: int | None) -> None:
        """`backend_id` now has `load` (None: it takes no new session)."""
        old = self._load.get(backend_id)
        if old == load:
            return
        if old is not None:
            self._take_out(backend_id, old)
        if load is not None:
            bucket = self._bucket.setdefault(load, [])
            self._at[backend_id] = len(bucket)
            bucket.append(backend_id)
            self._load[backend_id] = load

    def _take_out(self, backend_id: str, load: int) -> None:
        bucket, at = self._bucket[load], self._at.pop(backend_id)
        last = bucket.pop()
        if last != backend_id:  # the last one fills the gap: removal in O(1)
            bucket[at] = last
            self._at[last] = at
        if not bucket:
            del self._bucket[load]
        del self._load[backend_id]

    def least(self, exclude: Sequence[str] = (), cap: int = 0,
              rng: random.Random | None = None) -> str | None:
        """A backend among the least loaded (below `cap` if set), at random; None if none."""
        rng = rng or random
        for load in sorted(self._bucket):  # a few distinct loads: placement keeps them level
            if cap and load >= cap:
                return None
            bucket = self._bucket[load]
            if not exclude:
                return bucket[0] if len(bucket) == 1 else rng.choice(bucket)
            for _ in range(3):  # a retry excludes a backend or two: a few draws find another
                pick = rng.choice(bucket)
                if pick not in exclude:
                    return pick
            left = [b for b in bucket if b not in exclude]
            if left:
                return rng.choice(left)
        return None


class Attempt(Enum):
    """How far one new-session attempt got before it failed."""

    NOT_CONNECTED = "not_connected"  # connect refused/failed: the backend never saw the request
    SENT = "sent"  # the request (or part of it) may have reached the backend
    ANSWERED = "answered"  # the backend answered, with an error


def may_retry_elsewhere(attempt: Attempt) -> bool:
    """Never a silent second session: only a request that provably never reached its backend may
    be sent to another one. Anything that may have created a session there is the client's error
    to see, or that backend would keep a session nobody will ever quit."""
    return attempt is Attempt.NOT_CONNECTED
