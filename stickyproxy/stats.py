"""The stats port (:8911): the snapshot of pool, sessions and providers as JSON (pure, on top),
and the aiohttp app that serves it with `/healthz` for the proxy itself and the admin API behind
`--admin-token` (below).

The JSON schema is documented in the README; `version` changes when a field changes meaning.
"""

from __future__ import annotations

import hmac
import time
from typing import Any, Mapping

from aiohttp import web

from . import dashboard
from .backends import Pool
from .sessions import EndReason, SessionTable

SCHEMA_VERSION = 1
REFUSALS = ("auth", "body_too_large", "rate", "bad_request", "connections")


def snapshot(pool: Pool, sessions: SessionTable, extra: Mapping[str, Mapping[str, Any]],
             now: float, started: float, queue=None, recycled_total: int = 0,
             monotonic_now: float = 0.0, shutting_down: bool = False,
             refused: Mapping[str, int] | None = None) -> dict[str, Any]:
    backends = []
    for b in pool:
        check = b.last_check
        row = {
            "id": b.id,
            "url": b.spec.url,
            "source": b.spec.source,
            "state": "up" if b.health.up else ("down" if b.health.state == "down" else "init"),
            "admin": b.admin,
            "drain_reason": b.drain_reason or None,
            "replacement": b.replacement or None,
            "capacity": pool.max_sessions or None,
            "dialect": b.dialect or None,
            "sessions_active": sessions.per_backend.get(b.id, 0),
            "sessions_pending": b.pending,
            "sessions_peak": sessions.peak.get(b.id, 0),
            "sessions_total": b.sessions_total,
            "sessions_ended": dict(sessions.ended_by_backend.get(b.id, {})),
            "requests_total": b.requests_total,
            "errors_total": b.errors_total,
            "connections": {"in_use": getattr(b.upstream, "in_use", 0),
                            "opened_total": getattr(b.upstream, "opened_total", 0),
                            "stale_total": getattr(b.upstream, "stale_total", 0)},
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
        "sessions_learned_total": sessions.learned_total,
        "sessions_ended": {r.value: sessions.ended_by_reason.get(r.value, 0) for r in EndReason},
        "requests_total": sum(b.requests_total for b in pool) + pool.retired_requests_total,
        "errors_total": sum(b.errors_total for b in pool) + pool.retired_errors_total,
        "recycled_total": recycled_total,
        "refused": {r: (refused or {}).get(r, 0) for r in REFUSALS},
        "shutting_down": shutting_down,
        "queue": None if queue is None else {
            "length": len(queue),
            "max_length": queue.max_length,
            "oldest_wait_seconds": round(queue.oldest_wait(monotonic_now), 3),
            "waited_total": queue.waited_total,
            "timeouts_total": queue.timeouts_total,
            "abandoned_total": queue.abandoned_total,
            "refused_total": queue.refused_total,
            "wait_seconds_total": round(queue.wait_seconds_total, 3),
            "wait_seconds_max": round(queue.wait_seconds_max, 3),
        },
    }


STATS = web.AppKey("stats_source", object)
ADMIN = web.AppKey("admin", object)  # the server: .pool, .sessions, .lifecycle, .settings
METRICS = web.AppKey("metrics", object)  # metrics.Metrics: .exposition(accept)


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS]())


async def _dashboard(request: web.Request) -> web.Response:
    return web.Response(text=dashboard.render(request.app[STATS]()), content_type="text/html",
                        headers={"Cache-Control": "no-store"})


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].exposition(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def _readyz(request: web.Request) -> web.Response:
    """Readiness for orchestrators: 200 once any backend is up and while not shutting down.
    (503 is fine here: this port is not WebDriver, Selenium never reads it.)"""
    snap = request.app[STATS]()
    ready = snap["backends_up"] > 0 and not snap["shutting_down"]
    return web.json_response({"ready": ready, "backends_up": snap["backends_up"]},
                             status=200 if ready else 503)


def _admin_error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def _admin_auth(request: web.Request, handler):
    if not request.path.startswith("/admin/"):
        return await handler(request)
    token = request.app[ADMIN].settings.admin_token
    if not token:
        return _admin_error(403, "the admin API is off: start stickyproxy with --admin-token")
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return _admin_error(401, "admin API: Authorization: Bearer <token> required",
                            **{"WWW-Authenticate": 'Bearer realm="stickyproxy-admin"'})
    return await handler(request)


async def _admin_sessions(request: web.Request) -> web.Response:
    now = time.monotonic()
    server = request.app[ADMIN]
    return web.json_response({"sessions": [
        {"id": s.id, "backend": s.backend_id, "age_seconds": round(now - s.created, 1),
         "idle_seconds": round(now - s.last_used, 1), "requests": s.requests}
        for s in server.sessions.live.values()]})


async def _admin_delete_session(request: web.Request) -> web.Response:
    sid = request.match_info["sid"]
    if not request.app[ADMIN].lifecycle.end(sid, EndReason.ADMIN, "deleted through the admin API"):
        return _admin_error(404, f"no live session {sid!r}")
    return web.json_response({"deleted": sid})


async def _admin_backend(request: web.Request) -> web.Response:
    pool = request.app[ADMIN].pool
    backend_id, action = request.match_info["backend"], request.match_info["action"]
    backend = pool.get(backend_id)
    if backend is None:
        return _admin_error(404, f"no backend {backend_id!r}")
    if action == "drain":
        pool.drain(backend_id, "admin")
    elif backend.recycling:
        return _admin_error(409, f"backend {backend_id} is being recycled")
    else:
        pool.undrain(backend_id)
    return web.json_response({"id": backend_id, "admin": backend.admin})


def make_app(source, admin=None, metrics=None) -> web.Application:
    """`source()` returns the current snapshot dict; `admin` serves the admin API; `metrics`
    (a metrics.Metrics over the same `source`) serves /metrics."""
    app = web.Application(middlewares=[_admin_auth])
    app[STATS] = source
    app[ADMIN] = admin
    app[METRICS] = metrics
    app.router.add_get("/", _dashboard)
    app.router.add_get("/stats", _stats)
    if metrics is not None:
        app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/admin/sessions", _admin_sessions)
    app.router.add_delete("/admin/sessions/{sid}", _admin_delete_session)
    app.router.add_post("/admin/backends/{backend}/{action:drain|undrain}", _admin_backend)
    return app
