"""proxy.py's handlers in process, for what sockets cannot stage: a bug of ours raising in the
middle of a handler, and a backend removed in the one tick between a new session's answer and its
pinning. Everything but the request and the backend's connection is real."""

from __future__ import annotations

import asyncio
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


class Answer:
    """A new-session answer from GhostDriver, as upstream.py hands it over (whole, read)."""
    status, forward, released = 200, b"Content-Type: application/json\r\n", False

    def release(self) -> None:
        self.released = True


@pytest.mark.parametrize("removed", [False, True], ids=["kept", "removed"])
async def test_a_backend_removed_before_its_new_session_answer_is_read_pins_nothing(removed):
    """The hand-over's window: an answer read in pieces finishes in `_new_session` a tick after
    the attempt, and the pool may drop its backend in between (which ends that backend's
    sessions). The session must then be refused, not pinned to a backend that is gone."""
    sessions = SessionTable()
    pool = Pool(1, 1, sessions)
    pool.publish("static", [BackendSpec("b1", "http://127.0.0.1:9", "static")])
    backend = pool.backends["b1"]
    pool.record_check(backend, CheckResult(True, "ok", "ok"))
    app = types.SimpleNamespace(pool=pool, sessions=sessions, key=None, queue=None,
                                life=types.SimpleNamespace(consider=lambda *a: None))
    request = new_session_request(app, {"desiredCapabilities": {}})
    new = proxy._new_session_request(request, request.body.whole())
    assert pool.pick(None) == "b1"  # the reservation the attempt holds
    answer = Answer()
    attempt = asyncio.get_running_loop().create_future()
    attempt.set_result((answer, b'{"sessionId": "s1", "status": 0, "value": {}}'))
    if removed:
        pool.publish("static", [])
    coro = proxy._new_session(request, app, new, "b1", attempt=attempt, sent_to=backend)
    if removed:
        with pytest.raises(proxy.WebDriverError, match="b1 was removed while it created"):
            await coro
        assert sessions.get("s1") is None and backend.errors_total == 1
    else:
        reply = await coro
        assert reply.status == 200 and sessions.get("s1").backend_id == "b1"
        assert backend.pending == 0
    assert answer.released
