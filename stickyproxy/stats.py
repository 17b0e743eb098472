"""The stats port (:8911): the snapshot of pool, sessions and providers as JSON (pure, on top),
and the aiohttp app that serves it with `/healthz` for the proxy itself (below).

The JSON schema is documented in the README; `version` changes when a field changes meaning.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Mapping

from aiohttp import web

from .backends import Pool
from .sessions import EndReason, SessionTable

SCHEMA_VERSION = 1


def snapshot(pool: Pool, sessions: SessionTable, extra: Mapping[str, Mapping[str, Any]],
             now: float, started: float) -> dict[str, Any]:
    backends = []
    for b in pool:
        check = b.last_check
        row = {
            "id": b.id,
            "url": b.spec.url,
            "source": b.spec.source,
            "state": "up" if b.health.up else ("down" if b.health.state == "down" else "init"),
            "admin": b.admin,
            "dialect": b.dialect or None,
            "sessions_active": sessions.per_backend.get(b.id, 0),
            "sessions_total": b.sessions_total,
            "requests_total": b.requests_total,
            "errors_total": b.errors_total,
            "connections": {"in_use": getattr(b.upstream, "in_use", 0),
                            "opened_total": getattr(b.upstream, "opened_total", 0)},
            "last_check": None if check is None else {
                "ok": check.ok, "result": check.code, "reason": check.reason,
                "at": round(check.at, 3), "latency_ms": round(check.latency * 1000, 1)},
            "lost_total": b.lost_total,
            "last_lost": b.last_lost or None,
            "age_seconds": round(now - b.added, 1),
        }
        row.update(extra.get(b.id, {}))
        backends.append(row)
    return {
        "version": SCHEMA_VERSION,
        "uptime_seconds": round(now - started, 1),
        "backends": backends,
        "backends_up": sum(1 for b in pool if b.health.up),
        "sessions_active": len(sessions),
        "sessions_total": sessions.created_total,
        "sessions_ended": {r.value: sessions.ended_by_reason.get(r.value, 0) for r in EndReason},
        "requests_total": sum(b.requests_total for b in pool),
        "errors_total": sum(b.errors_total for b in pool),
    }


STATS = web.AppKey("stats_source", object)


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS]())


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def make_app(source) -> web.Application:
    """`source()` returns the current snapshot dict."""
    app = web.Application()
    app[STATS] = source
    app.router.add_get("/stats", _stats)
    app.router.add_get("/healthz", _healthz)
    return app
