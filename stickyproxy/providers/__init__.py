"""Where backends come from.

A provider reports the *whole* current set of backends it owns (never deltas) through
`PoolSink.publish`; the pool diffs the set. When a backend's process or container dies, the provider
says so at once through `PoolSink.lost` with a reason from `sessions.EndReason`, so the sessions
pinned to it end with that reason instead of waiting for health checks. A backend that comes back
under the same id carries a new `generation` (a PID, a container start time): sessions of an older
generation can never be served again and are ended by the pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence


@dataclass(frozen=True)
class BackendSpec:
    id: str  # stable across restarts of the same slot: "local-1", "docker-pool-3", "static-1"
    url: str  # http://host:port as a user would reach it; the TCP target unless unix_socket is set
    source: str  # "static" | "local" | "docker" | ...
    generation: str = ""  # changes when the process/container behind the id is replaced
    unix_socket: str | None = None  # connect here instead of url's host:port (isolated backends)
    meta: Mapping[str, Any] = field(default_factory=dict)  # shown in stats (container id, pid, ...)


class PoolSink(Protocol):
    def publish(self, source: str, specs: Sequence[BackendSpec]) -> None:
        """Replace every backend of `source` with `specs`."""

    def lost(self, backend_id: str, reason: str) -> None:
        """The process/container behind `backend_id` is gone: end its sessions with `reason`."""


class Provider(Protocol):
    source: str

    async def run(self, sink: PoolSink) -> None:
        """Start/watch backends, publish the set whenever it changes; runs until cancelled."""

    async def close(self) -> None:
        """Stop what this provider started (called once on shutdown, after run is cancelled)."""

    def stats(self) -> Mapping[str, Mapping[str, Any]]:
        """Extra per-backend stats keyed by backend id (restarts, memory, container, ...)."""
