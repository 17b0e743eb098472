"""Self-routing session ids for stateless replicas (pure; `--session-key`).

With a session key, the id a client sees carries its route: 16 hex of the backend's address
hash, one letter for how the proxy speaks to it (`p` pass-through, `b` bridged W3C to JSONWP),
16 hex of an HMAC, then the backend's own id. Any replica holding the same key (and the
same backends) routes it with no shared store, and a restarted replica routes the sessions that
were live before it stopped. The HMAC covers the route, the backend's id and who created the
session, so a forged, altered or borrowed id is refused as `invalid session id`.

Why not ask the backends (`GET /sessions`) for an unknown id instead: W3C backends need not list
sessions, the fan-out grows with the pool, and it cannot tell a replica's stale answer from a
forged id. The price here is rewriting the id in paths and bodies, which is a bytes replace of
one fixed string (no JSON parsing), and only when a key is set.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

ROUTE_HEX = 16
SIG_HEX = 16
PREFIX = ROUTE_HEX + 1 + SIG_HEX


def route_of(url: str) -> str:
    """The backend's route: a hash of its address, the same on every replica (ggr does the
    same with MD5 of host:port)."""
    return hashlib.blake2b(url.rstrip("/").encode(), digest_size=ROUTE_HEX // 2).hexdigest()


def _sign(key: bytes, route: str, mode: str, backend_sid: str, owner: str) -> str:
    message = f"{route}\0{mode}\0{backend_sid}\0{owner}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:SIG_HEX]


def public_id(key: bytes, url: str, backend_sid: str, owner: str = "", bridged: bool = False) -> str:
    route, mode = route_of(url), "b" if bridged else "p"
    return route + mode + _sign(key, route, mode, backend_sid, owner) + backend_sid


@dataclass(frozen=True, slots=True)
class Parsed:
    route: str
    backend_sid: str
    bridged: bool


def parse(key: bytes, public: str, owner: str = "") -> Parsed | None:
    """The route and backend id in `public`, or None when it is not one of ours (or not for
    this owner)."""
    if len(public) <= PREFIX:
        return None
    route, mode = public[:ROUTE_HEX], public[ROUTE_HEX]
    sig, backend_sid = public[ROUTE_HEX + 1:PREFIX], public[PREFIX:]
    if mode not in "bp" or not hmac.compare_digest(sig, _sign(key, route, mode, backend_sid, owner)):
        return None
    return Parsed(route, backend_sid, mode == "b")


class Rewriter:
    """Replace one id with another in a stream of chunks, also where it straddles two chunks."""

    __slots__ = ("old", "new", "_tail")

    def __init__(self, old: bytes, new: bytes) -> None:
        self.old, self.new, self._tail = old, new, b""

    def feed(self, chunk: bytes) -> bytes:
        data = (self._tail + chunk).replace(self.old, self.new)
        keep = len(self.old) - 1
        # Hold back what could be the start of the old id, unless it is the new id's own end.
        cut = len(data) - keep if keep > 0 else len(data)
        out, self._tail = data[:max(cut, 0)], data[max(cut, 0):]
        return out

    def close(self) -> bytes:
        out, self._tail = self._tail, b""
        return out
