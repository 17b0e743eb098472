"""proxy.py's handlers in process, for what sockets cannot stage: a bug of ours raising in the
middle of a handler. Everything but the request and the backend's connection is real."""

from __future__ import annotations

import json
import types

import pytest

from stickyproxy import proxy
from stickyproxy.backends import Pool
from stickyproxy.health import CheckResult
from stickyproxy.metrics import Timing
from stickyproxy.providers import BackendSpec
from stickyproxy.queue import SessionQueue
from stickyproxy.sessions import SessionTable


class Broken:
    """A backend connection pool whose submit hits a bug of ours."""

    def submit(self, *args, **kwargs) -> None:
        raise RuntimeError("a bug of ours")


def new_session_request(app, payload: dict):
    raw = json.dumps(payload).encode()
    return types.SimpleNamespace(
        app=app, body=types.SimpleNamespace(whole=lambda: raw), remote="127.0.0.1", headers={},
        raw_headers=[(b"Content-Type", b"application/json")], forward=b"", target="/session",
        timing=Timing(0.0), principal="")


@pytest.mark.parametrize("payload", [
    {"desiredCapabilities": {}},
    {"capabilities": {"alwaysMatch": {"browserName": "chrome"}}},
], ids=["jsonwp", "w3c"])
async def test_a_bug_after_placement_gives_the_reservation_back(payload):
    sessions = SessionTable()
    pool = Pool(1, 1, sessions)
    pool.publish("static", [BackendSpec("b1", "http://127.0.0.1:9", "static",
                                        meta={"chrome_args": ("--headless=new",)})])
    backend = pool.backends["b1"]
    pool.record_check(backend, CheckResult(True, "ok", "ok"))
    backend.upstream = Broken()
    app = types.SimpleNamespace(
        state=types.SimpleNamespace(shutting_down=False), pool=pool, timeout=5,
        guard=types.SimpleNamespace(limiter=types.SimpleNamespace(take=lambda *a: 0)),
        queue=SessionQueue(pool.pick, pool.release, 10))
    for _ in range(3):
        with pytest.raises(RuntimeError):  # front.py answers 500 and logs HANDLER_FAILED
            proxy._new_session_now(new_session_request(app, payload), app)
        assert backend.pending == 0  # placement still sees an empty backend
