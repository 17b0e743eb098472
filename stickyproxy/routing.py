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
