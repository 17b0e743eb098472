"""The routing decisions alone, without sockets: what stickyproxy's own state costs per request
as it grows (part 3 runs this beside its wrk points).

Built from stickyproxy's real objects (SessionTable, Pool, webdriver.route), filled to the given
size, then timed in this process:
- `pinned`: what the proxy decides for `GET /session/<id>/title` before it forwards: the route,
  the session, its backend, whether that backend is up (proxy._session_command's lookups);
- `placement`: a new session's choice of backend (Pool.pick and its release).
The wrk points measure everything a request costs; these isolate the part that depends on the
state, so a growth elsewhere (kernel, cache misses over more sockets) is told apart from it.

    PYTHONPATH=<stickyproxy tree> python -m benchmarks.routing_cost SESSIONS BACKENDS  # one JSON line
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import sys
import time


def measure(n_sessions: int, n_backends: int, lookups: int = 200_000, picks: int = 2_000) -> dict:
    from stickyproxy import webdriver
    from stickyproxy.backends import Pool
    from stickyproxy.health import UP, CheckResult
    from stickyproxy.providers import BackendSpec
    from stickyproxy.sessions import Session, SessionTable

    logging.disable(logging.INFO)  # pin() logs each session: not part of the decision
    sessions = SessionTable()
    pool = Pool(2, 3, sessions)
    pool.publish("static", [BackendSpec(f"static-{i}", f"http://127.0.0.1:{10000 + i}", "static")
                            for i in range(1, n_backends + 1)])
    ids = list(pool.backends)
    for backend in pool:
        while backend.health.state != UP:
            pool.record_check(backend, CheckResult(True, "ok", "up"))
    rnd = random.Random(n_sessions * 7919 + n_backends)
    now = time.monotonic()
    sids = []
    for i in range(n_sessions):
        sid = f"{rnd.getrandbits(128):032x}"
        sessions.pin(Session(sid, ids[i % n_backends], "", now, now))
        sids.append(sid)
    targets = [f"/session/{sid}/title" for sid in rnd.sample(sids, min(len(sids), 10_000))]

    def pinned() -> float:
        get_session, get_backend, route = sessions.get, pool.get, webdriver.route
        t0 = time.perf_counter()
        for i in range(lookups):
            r = route("GET", targets[i % len(targets)])
            session = get_session(r.session_id)
            backend = get_backend(session.backend_id)
            if backend is None or not backend.health.up:
                raise AssertionError("every backend is up")
        return (time.perf_counter() - t0) / lookups * 1e9

    def placement() -> float:
        t0 = time.perf_counter()
        for _ in range(picks):
            pool.release(pool.pick(None))
        return (time.perf_counter() - t0) / picks * 1e9

    return {"sessions": n_sessions, "backends": n_backends,
            "pinned_ns": round(statistics.median(pinned() for _ in range(5))),
            "placement_ns": round(statistics.median(placement() for _ in range(5)))}


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]), int(sys.argv[2]))))
