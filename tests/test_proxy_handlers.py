"""proxy.py's handlers in process, for what sockets cannot stage: a bug of ours raising in the
middle of a handler, a backend removed, moved or restarted while a new session's request is out,
and one moved between the queue's reservation and its waiter's turn. Everything but the request
and the backend's connection is real."""

from __future__ import annotations

import asyncio
import json
import time
import types

import pytest

from stickyproxy import proxy, routes
from stickyproxy.backends import Pool
from stickyproxy.health import CheckResult
from stickyproxy.lifecycle import Lifecycle
from stickyproxy.metrics import Timing
from stickyproxy.providers import BackendSpec
from stickyproxy.queue import SessionQueue
from stickyproxy.sessions import EndReason, Session, SessionTable


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
        guard=types.SimpleNamespace(limiter=types.SimpleNamespace(take=lambda *a: 0),
                                 auth=types.SimpleNamespace(enabled=False)),
        queue=SessionQueue(pool.pick, pool.release, 10))
    for _ in range(3):
        with pytest.raises(RuntimeError):  # front.py answers 500 and logs HANDLER_FAILED
            proxy._new_session_now(new_session_request(app, payload), app)
        assert backend.pending == 0  # placement still sees an empty backend


class Answer:
    """A new-session answer from GhostDriver, as upstream.py hands it over (whole, read)."""
    status, forward, released = 200, b"Content-Type: application/json\r\n", False
    body = b'{"sessionId": "s1", "status": 0, "value": {}}'
    length = len(body)

    def ready_body(self) -> bytes:
        return self.body

    def release(self) -> None:
        self.released = True


def lifecycle(pool, sessions) -> Lifecycle:
    """The real one, no reaping nor recycling: it ends sessions (deleting them on the backend)."""
    settings = types.SimpleNamespace(
        session_idle_timeout=0, session_max_age=0, recycle_after_sessions=0, recycle_after=0,
        recycle_above_memory=0, max_recycling=1, check_timeout=1)
    return Lifecycle(pool, sessions, settings, {})


class Deletes:
    """A backend's connection pool that only answers the DELETE a session's end sends."""

    def __init__(self) -> None:
        self.calls = []

    async def request(self, method, path, headers, body, timeout):
        self.calls.append((method, path))
        return types.SimpleNamespace(status=200, read=self._empty, release=lambda: None)

    @staticmethod
    async def _empty() -> bytes:
        return b""


class Client:
    """The client's side of the request: what `_answer` sends it."""
    gone = sent = False
    method, path = "POST", "/session"

    def send(self, status, headers, body, close=False) -> None:
        self.sent = (status, json.loads(body))

    def finish(self) -> None:
        pass


def new_session_app(pool, sessions):
    """An app for a new session's answer (no queue) and the request, whose client records what
    it is sent."""
    app = types.SimpleNamespace(pool=pool, sessions=sessions, key=None, queue=None, access_log=False,
                                life=lifecycle(pool, sessions),
                                metrics=types.SimpleNamespace(observe=lambda *a: None))
    request = new_session_request(app, {"desiredCapabilities": {}})
    client = Client()
    for name in ("gone", "sent", "send", "finish", "method", "path"):
        setattr(request, name, getattr(client, name))
    request.client = client
    return app, request, proxy._new_session_request(request, request.body.whole())


async def answered(path, request, app, new, backend, generation, answer):
    """The backend's new-session answer handled as `path` ("callback": `_new_session_answered`,
    the usual way; "coroutine": `_new_session` with the attempt done): (status, body) sent."""
    if path == "callback":
        proxy._new_session_answered(request, app, new, backend, generation, 0.0, answer, None)
        return request.client.sent
    attempt = asyncio.get_running_loop().create_future()
    attempt.set_result((answer, answer.body))
    try:
        reply = await proxy._new_session(request, app, new, backend.id, attempt=attempt,
                                         sent_to=(backend, generation))
        return reply.status, json.loads(reply.body)
    except proxy.WebDriverError as err:
        return err.status, {"value": {"error": err.error, "message": err.message}}


@pytest.mark.parametrize("path", ["callback", "coroutine"])
@pytest.mark.parametrize("change", [None, "removed", "moved", "restarted"])
async def test_a_backend_removed_before_its_new_session_answer_is_pinned_gets_no_session(
        path, change):
    """The answer of a new session is pinned when it is all here: in `_new_session_answered`
    (the usual callback) or, for one read in pieces, in `_new_session` a tick later. The pool
    may drop the backend before either (its sessions all ended then), re-add its id at a new
    address, or learn that its process was replaced (the old one's sessions ended): the session
    must be refused, not pinned to a backend that is gone, counted, and the reservation given
    back (counted on the new backend meanwhile, as every reservation of its id is)."""
    sessions = SessionTable()
    pool = Pool(1, 1, sessions)
    pool.publish("static", [BackendSpec("b1", "http://127.0.0.1:9", "static", generation="1")])
    backend = pool.backends["b1"]
    pool.record_check(backend, CheckResult(True, "ok", "ok"))
    backend.upstream = Deletes()
    app, request, new = new_session_app(pool, sessions)
    life = app.life
    assert pool.pick(None) == "b1"  # the reservation the attempt holds
    answer = Answer()
    if change == "removed":
        pool.publish("static", [])
    elif change == "moved":
        pool.publish("static", [BackendSpec("b1", "http://127.0.0.1:10", "static")])
        pool.record_check(pool.backends["b1"], CheckResult(True, "ok", "ok"))
    elif change == "restarted":  # the same address, a new process behind it
        pool.publish("static", [BackendSpec("b1", "http://127.0.0.1:9", "static", generation="2")])
        pool.record_check(pool.backends["b1"], CheckResult(True, "ok", "ok"))
    status, body = await answered(path, request, app, new, backend, "1", answer)
    assert answer.released
    if change is None:
        assert status == 200 and body["sessionId"] == "s1"
        assert sessions.get("s1").backend_id == "b1"
    else:
        assert status == 500 and body["value"]["error"] == "session not created", body
        verb = "restarted" if change == "restarted" else "removed"
        assert f"b1 was {verb} while it created" in body["value"]["message"]
        assert sessions.get("s1") is None and backend.errors_total == 1
        # in the totals /stats shows, whether or not the backend is still in the pool
        assert sum(b.errors_total for b in pool) + pool.retired_errors_total == 1
    await life.flush()
    if change == "restarted":
        # It may have reached the new process (sent late, or again): deleted there, and counted.
        assert backend.upstream.calls == [("DELETE", "/session/s1")]
        assert sessions.ended_by_reason == {"backend_down": 1}
        assert "restarted while it created this session; the session was ended" in (
            body["value"]["message"])
    else:
        # Removed: not deleted, as removal deletes none of the sessions it ends.
        assert backend.upstream.calls == []
    assert all(b.pending == 0 for b in pool)  # the reservation back, wherever it counted
    assert not pool._pending_of_removed


def two_backends_one_holding_s1(holder: str, key: bytes | None):
    """b1 and b2, up, and a live session that is s1 on `holder`; with a `key`, its client's id
    is signed for another owner (alice) than the next request's."""
    sessions = SessionTable()
    pool = Pool(1, 1, sessions)
    pool.publish("static", [BackendSpec(b, f"http://127.0.0.1:{9 + i}", "static")
                            for i, b in enumerate(("b1", "b2"))])
    for b in pool:
        pool.record_check(b, CheckResult(True, "ok", "ok"))
        b.upstream = Deletes()
    held = routes.public_id(key, pool.backends[holder].spec.url, "s1", "alice") if key else "s1"
    sessions.pin(Session(held, holder, "", 0.0, 0.0, owner="alice", backend_sid="s1"))
    return sessions, pool, held


@pytest.mark.parametrize("path", ["callback", "coroutine"])
@pytest.mark.parametrize("key", [None, b"secret"], ids=["ids-as-given", "session-key"])
@pytest.mark.parametrize("holder,restarted", [("b2", False), ("b1", False), ("b2", True), ("b1", True)],
                         ids=["other-backend", "same-backend", "other-backend-restarted-mid-request",
                              "same-backend-restarted-mid-request"])
async def test_a_new_session_given_a_live_sessions_id(path, key, holder, restarted):
    """b1 answers a new session with id s1, which a live session has. On b2 it keeps it, and the
    new one is refused and deleted on b1 (with --session-key, the two ids differ: no clash). On
    b1 itself, b1 has lost the old one: its pin ends, and the new one is refused and deleted all
    the same, or the old client's id (signed for another owner, or not) would lead to it. Unless
    b1's process was replaced while the request was out and the new one's live session has the
    id: the answer may be the old process's, and the new one's session is left alone."""
    sessions, pool, held = two_backends_one_holding_s1(holder, key)
    backend = pool.backends["b1"]
    app, request, new = new_session_app(pool, sessions)
    app.key = key
    assert pool.pick(None, ("b2",)) == "b1"
    if restarted:  # the answer comes from b1's old process or its new one (a retry, or late)
        pool.publish("static", [BackendSpec("b1", "http://127.0.0.1:9", "static", generation="2"),
                                pool.backends["b2"].spec])
        pool.record_check(backend, CheckResult(True, "ok", "ok"))
        if holder == "b1":  # the old process's session ended with it; the new one gave s1 out
            assert sessions.get(held) is None
            sessions.pin(Session(held, "b1", "2", 0.0, 0.0, owner="alice", backend_sid="s1"))
    answer = Answer()
    status, body = await answered(path, request, app, new, backend, "", answer)
    await app.life.flush()
    message = body["value"]["message"] if status == 500 else ""
    assert answer.released
    assert pool.backends["b2"].upstream.calls == [] and all(b.pending == 0 for b in pool)
    if key and holder == "b2":  # no clash: as any new session
        if restarted:
            assert status == 500 and "restarted while it created" in message
            assert backend.upstream.calls == [("DELETE", "/session/s1")]
        else:
            assert status == 200 and body["sessionId"] not in (held, "s1")
            assert sessions.get(body["sessionId"]).backend_id == "b1"
            assert backend.upstream.calls == []
        assert sessions.get(held).backend_id == "b2"
        return
    assert status == 500 and body["value"]["error"] == "session not created", body
    assert backend.errors_total == 1
    if holder == "b2":
        assert "which a live session on backend b2 has; the new session was deleted" in message
        assert backend.upstream.calls == [("DELETE", "/session/s1")]
        assert sessions.get(held).backend_id == "b2" and sessions.per_backend == {"b2": 1}
        assert not sessions.ended_by_reason
        assert sessions.holder("b1", "s1") is None
    elif restarted:
        assert "which a live session of its new process has" in message
        assert backend.upstream.calls == []  # (a DELETE of s1 would end the new one's session)
        assert sessions.get(held).generation == "2" and sessions.per_backend == {"b1": 1}
        assert sessions.ended_by_reason == {"backend_down": 1}  # (the old process's, at restart)
    else:
        assert "which a live session of its own had: that one was lost there" in message
        assert backend.upstream.calls == [("DELETE", "/session/s1")]
        assert sessions.get(held) is None and sessions.per_backend == {}
        assert sessions.ended_by_reason == {"backend_down": 1}
        assert sessions.why_ended(held).detail.startswith("its backend gave the session's id")
        assert sessions.holder("b1", "s1") is None


class BrokenAnswer(Answer):
    """An answer whose body cannot be read: stands for a bug of ours in the callback."""

    def ready_body(self) -> bytes:
        raise RuntimeError("a bug of ours")


async def test_a_bug_in_the_new_session_callback_gives_the_reservation_back():
    sessions = SessionTable()
    pool = Pool(1, 1, sessions)
    pool.publish("static", [BackendSpec("b1", "http://127.0.0.1:9", "static")])
    backend = pool.backends["b1"]
    pool.record_check(backend, CheckResult(True, "ok", "ok"))
    app = types.SimpleNamespace(pool=pool, sessions=sessions, key=None, access_log=False,
                                metrics=types.SimpleNamespace(observe=lambda *a: None))
    request = new_session_request(app, {"desiredCapabilities": {}})
    crashed = []
    request.crashed = lambda: crashed.append(True)  # front.py answers 500, logs HANDLER_FAILED
    request.method, request.path = "POST", "/session"
    new = proxy._new_session_request(request, request.body.whole())
    for _ in range(3):
        assert pool.pick(None) == "b1"
        answer = BrokenAnswer()
        proxy._new_session_answered(request, app, new, backend, "", 0.0, answer, None)
        assert answer.released and backend.pending == 0  # placement still sees an empty backend
    assert len(crashed) == 3


class Creates:
    """A backend's connection pool that answers a new session, noting the backend's load as
    the request goes out."""

    def __init__(self, pool, backend_id: str) -> None:
        self.pool, self.backend_id, self.loads = pool, backend_id, []

    async def request(self, method, path, headers, body, timeout, replay_stale=False):
        backend = self.pool.backends[self.backend_id]
        self.loads.append(self.pool.sessions.per_backend.get(backend.id, 0) + backend.pending)
        answer = Answer()
        answer.body = b'{"sessionId": "s2", "status": 0, "value": {}}'

        async def read() -> bytes:
            return answer.body
        answer.read = read
        return answer


def full_pool_and_queue():
    """One backend, b1, at its --max-sessions 1 (session "held"), and the queue wired as the
    server wires it."""
    sessions = SessionTable()
    pool = Pool(1, 1, sessions, max_sessions=1)
    queue = SessionQueue(pool.pick, pool.release, 10)
    pool.on_capacity.append(queue.dispatch)
    sessions.on_end.append(queue.dispatch)
    pool.publish("static", [BackendSpec("b1", "http://127.0.0.1:9", "static")])
    pool.record_check(pool.backends["b1"], CheckResult(True, "ok", "ok"))
    sessions.pin(Session("held", "b1", "", 0.0, 0.0))
    return sessions, pool, queue


async def queued_new_session(pool, sessions, queue, waiting=1, state=None, waits=None):
    """A new session started with every backend full: its task, once it waits in the queue
    (`waits`: a list the queue-wait histogram's observations go to)."""
    waits = [] if waits is None else waits
    app = types.SimpleNamespace(
        pool=pool, sessions=sessions, key=None, queue=queue, queue_timeout=5, timeout=5,
        access_log=False, life=lifecycle(pool, sessions),
        state=state or types.SimpleNamespace(shutting_down=False),
        metrics=types.SimpleNamespace(observe=lambda *a: None, observe_queue_wait=waits.append))
    request = new_session_request(app, {"desiredCapabilities": {}})
    new = proxy._new_session_request(request, request.body.whole())
    task = asyncio.get_running_loop().create_task(proxy._new_session(request, app, new, None))
    for _ in range(10):
        await asyncio.sleep(0)
    assert len(queue) == waiting
    return task


async def test_a_queued_new_session_whose_backend_moved_before_it_resumed_is_counted_there():
    """The queue reserves a slot for its head and wakes it; the waiter resumes a tick later.
    If the backend's id moved to a new address meanwhile, the waiter is sent to the new one:
    its reservation must count there, or the new backend takes one over --max-sessions."""
    sessions, pool, queue = full_pool_and_queue()
    task = await queued_new_session(pool, sessions, queue)
    sessions.end("held", EndReason.CLIENT_DELETE)  # a slot frees: reserved for the waiter...
    # ...and before it resumes, b1 moves (a discovery flap, a container at a new address)
    pool.publish("static", [BackendSpec("b1", "http://127.0.0.1:10", "static")])
    pool.record_check(pool.backends["b1"], CheckResult(True, "ok", "ok"))
    upstream = pool.backends["b1"].upstream = Creates(pool, "b1")
    reply = await asyncio.wait_for(task, 5)
    assert reply.status == 200 and sessions.get("s2").backend_id == "b1"
    assert upstream.loads == [1]  # its own reservation counted on the backend it went to
    assert all(b.pending == 0 for b in pool) and not pool._pending_of_removed


async def test_a_new_session_failing_after_its_client_left_is_counted_and_logged(caplog):
    sessions = SessionTable()
    pool = Pool(1, 1, sessions)
    pool.publish("static", [BackendSpec("b1", "http://127.0.0.1:9", "static")])
    backend = pool.backends["b1"]
    app = types.SimpleNamespace(pool=pool, sessions=sessions)
    attempt = asyncio.get_running_loop().create_future()
    attempt.set_exception(TimeoutError())
    proxy._orphaned(app, backend, "", attempt, "")
    assert backend.errors_total == 1
    assert ('SESSION_NOT_CREATED backend=b1 reason="no answer in time; its client had left"'
            in caplog.text)


async def test_an_orphan_of_a_backend_removed_meanwhile_is_counted_and_left_on_it(caplog):
    """As `_pin` does for a client still there: removal ended the backend's sessions and
    deletes none, and a live session of a backend re-added under its id is not touched."""
    sessions, pool, held = two_backends_one_holding_s1("b1", None)
    gone = pool.backends["b1"]
    pool.publish("static", [BackendSpec("b1", "http://127.0.0.1:10", "static"),
                            pool.backends["b2"].spec])  # b1 moved: a new Backend under its id
    sessions.pin(Session("s1", "b1", "", 0.0, 0.0))  # and its own s1, live
    life = lifecycle(pool, sessions)
    app = types.SimpleNamespace(pool=pool, sessions=sessions, life=life)
    proxy._orphan(app, gone, "", Answer(), Answer.body, "")  # the old b1's answer: s1
    await life.flush()
    assert gone.errors_total == 1 and gone.upstream.calls == []
    assert sessions.get("s1").backend_id == "b1" and "left on it" in caplog.text
    assert pool.backends["b1"].errors_total == 0


def test_an_old_signed_id_whose_backend_gave_its_id_to_a_live_session_is_not_learned():
    """Under --session-key, any replica routes a signed id it never saw. An old client's id names
    s1 on b1; b1 lost that session and gave s1 to Alice's new one, pinned here. Learned, the
    old id would drive Alice's browser: it is refused, and hers stays the only pin."""
    key = b"secret"
    sessions, pool, alices = two_backends_one_holding_s1("b1", key)
    app = types.SimpleNamespace(pool=pool, sessions=sessions, key=key)
    old = routes.public_id(key, pool.backends["b1"].spec.url, "s1", "")
    assert old != alices
    request = types.SimpleNamespace(principal="", app=app, timing=Timing(0.0))
    with pytest.raises(proxy.WebDriverError, match="another live session here has this"):
        proxy._session_command(request, app, old, None, "/title")
    assert sessions.per_backend == {"b1": 1} and sessions.holder("b1", "s1").id == alices
    # an id of b2's, which no live session has there, is learned as before
    other = routes.public_id(key, pool.backends["b2"].spec.url, "s1", "")
    assert proxy._learn(request, app, other).backend_id == "b2"


@pytest.mark.parametrize("key", [None, b"secret"], ids=["ids-as-given", "session-key"])
@pytest.mark.parametrize("holder", ["b2", "b1"])
async def test_an_orphan_given_a_live_sessions_id_is_deleted_and_never_pinned(holder, key):
    """Its client left, and b1 gave it the id of a live session: deleted on b1, counted there.
    Another backend's session keeps its pin; b1's own (lost) ends."""
    sessions, pool, held = two_backends_one_holding_s1(holder, key)
    backend = pool.backends["b1"]
    life = lifecycle(pool, sessions)
    app = types.SimpleNamespace(pool=pool, sessions=sessions, life=life)
    proxy._orphan(app, backend, "", Answer(), Answer.body, "")  # (its answer: session s1)
    await life.flush()
    if key and holder == "b2":  # ids that differ: an orphan like any other
        assert sessions.ended_by_reason == {"client_delete": 1}
    else:
        assert backend.errors_total == 1
        assert sessions.ended_by_reason == ({} if holder == "b2" else {"backend_down": 1})
    assert backend.upstream.calls == [("DELETE", "/session/s1")]
    assert sessions.per_backend == ({"b2": 1} if holder == "b2" else {})
    assert pool.backends["b2"].upstream.calls == []


async def test_a_client_leaving_mid_attempt_keeps_the_slot_until_the_attempt_ends():
    """The attempt runs on (shielded) when its client leaves: the backend may create the session.
    Until it answers, the slot stays taken, or the queue could fill it: one over the cap."""
    sessions = SessionTable()
    pool = Pool(1, 1, sessions, max_sessions=1)
    pool.publish("static", [BackendSpec("b1", "http://127.0.0.1:9", "static")])
    backend = pool.backends["b1"]
    pool.record_check(backend, CheckResult(True, "ok", "ok"))
    backend.upstream = Deletes()
    life = lifecycle(pool, sessions)
    app = types.SimpleNamespace(pool=pool, sessions=sessions, key=None, life=life, queue=None)
    request = new_session_request(app, {"desiredCapabilities": {}})
    new = proxy._new_session_request(request, request.body.whole())
    assert pool.pick(None) == "b1"
    attempt = asyncio.get_running_loop().create_future()  # sent, not answered yet
    task = asyncio.get_running_loop().create_task(proxy._new_session(
        request, app, new, "b1", attempt=attempt, sent_to=(backend, "")))
    await asyncio.sleep(0)
    task.cancel()  # the client left
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backend.pending == 1 and pool.pick(None) is None  # still taken: nothing placed
    answer = Answer()
    attempt.set_result((answer, answer.body))  # the backend created it after all
    await asyncio.sleep(0)
    assert backend.pending == 0 and answer.released
    assert sessions.ended_by_reason == {"client_delete": 1}  # pinned, ended and deleted
    await life.flush()
    assert backend.upstream.calls == [("DELETE", "/session/s1")]


async def test_a_queued_new_session_whose_backend_was_drained_before_its_turn_goes_elsewhere():
    """The queue reserves b1 for its head; before the waiter runs, b1 is drained (an admin, or
    recycling) and b2 frees a slot. The waiter goes to b2: a drained backend takes no new
    session, whoever reserved it."""
    sessions = SessionTable()
    pool = Pool(1, 1, sessions, max_sessions=1)
    queue = SessionQueue(pool.pick, pool.release, 10)
    pool.on_capacity.append(queue.dispatch)
    sessions.on_end.append(queue.dispatch)
    pool.publish("static", [BackendSpec(b, f"http://127.0.0.1:{9 + i}", "static")
                            for i, b in enumerate(("b1", "b2"))])
    for b in ("b1", "b2"):
        pool.record_check(pool.backends[b], CheckResult(True, "ok", "ok"))
        sessions.pin(Session(f"held-{b}", b, "", 0.0, 0.0))  # both full
        pool.backends[b].upstream = Creates(pool, b)
    task = await queued_new_session(pool, sessions, queue)
    sessions.end("held-b1", EndReason.CLIENT_DELETE)  # reserved for the waiter...
    pool.drain("b1", "admin")  # ...drained before it runs...
    sessions.end("held-b2", EndReason.CLIENT_DELETE)  # ...and room on b2
    reply = await asyncio.wait_for(task, 5)
    assert reply.status == 200 and sessions.get("s2").backend_id == "b2"
    assert pool.backends["b1"].upstream.loads == [] and pool.backends["b2"].upstream.loads == [1]
    assert all(b.pending == 0 for b in pool)


async def test_a_waiter_whose_turn_came_to_a_backend_not_taking_waits_again_at_the_head():
    """Its only backend moved to an address not checked yet, between the queue's reservation
    and the waiter's turn: it neither goes there nor fails, nor loses its place to the waiter
    behind it; it is served first once the new address is up."""
    sessions, pool, queue = full_pool_and_queue()
    first = await queued_new_session(pool, sessions, queue)
    second = await queued_new_session(pool, sessions, queue, waiting=2)
    sessions.end("held", EndReason.CLIENT_DELETE)  # b1 reserved for the first...
    pool.publish("static", [BackendSpec("b1", "http://127.0.0.1:10", "static")])  # ...moved
    upstream = pool.backends["b1"].upstream = Creates(pool, "b1")
    for _ in range(10):
        await asyncio.sleep(0)
    assert upstream.loads == [] and len(queue) == 2 and not first.done()
    assert queue.waited_total == 2  # (not counted twice)
    pool.record_check(pool.backends["b1"], CheckResult(True, "ok", "ok"))  # up: its turn again
    reply = await asyncio.wait_for(first, 5)
    assert reply.status == 200 and upstream.loads == [1] and not second.done()
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    assert pool.backends["b1"].pending == 0


async def test_a_waiter_back_at_the_head_is_one_wait_as_old_as_its_first():
    """The stats and the histogram see one waiter that waited the whole time: not two waits,
    nor an oldest wait that starts again when it goes back to the head."""
    sessions, pool, queue = full_pool_and_queue()
    waits = []
    queued_at = time.monotonic()
    task = await queued_new_session(pool, sessions, queue, waits=waits)
    await asyncio.sleep(0.2)  # an age to lose
    sessions.end("held", EndReason.CLIENT_DELETE)  # b1 reserved for it, then moved
    pool.publish("static", [BackendSpec("b1", "http://127.0.0.1:10", "static")])
    upstream = pool.backends["b1"].upstream = Creates(pool, "b1")
    for _ in range(10):
        await asyncio.sleep(0)
    assert len(queue) == 1 and not task.done()  # back at the head
    assert queue.oldest_wait(time.monotonic()) >= 0.2
    assert waits == [] and queue.waited_total == 1
    pool.record_check(pool.backends["b1"], CheckResult(True, "ok", "ok"))
    reply = await asyncio.wait_for(task, 5)
    whole = time.monotonic() - queued_at
    assert reply.status == 200 and upstream.loads == [1]
    assert len(waits) == 1 and 0.2 <= waits[0] <= whole
    assert 0.2 <= queue.wait_seconds_max <= whole
    assert 0.2 <= queue.wait_seconds_total <= whole  # (its two stays, each once)


async def test_a_new_session_answer_whose_body_never_comes_ends_within_the_backend_timeout():
    """An orphan's attempt holds its slot until it ends: a backend that sent the head and then
    hung must not hold it for good."""
    class Hung(Answer):
        async def read(self) -> bytes:
            await asyncio.sleep(3600)

    request = types.SimpleNamespace(app=types.SimpleNamespace(timeout=0.05), timing=Timing(0.0))
    answer = Hung()
    rest = asyncio.ensure_future(proxy._rest_of(request, answer))
    for _ in range(100):  # (the timeout is 0.05 s: done long before these 5 s)
        if rest.done():
            break
        await asyncio.sleep(0.05)
    try:
        assert rest.done() and isinstance(rest.exception(), TimeoutError)
        assert answer.released
    finally:
        rest.cancel()


async def test_a_waiter_handed_a_slot_as_shutdown_begins_creates_no_session():
    sessions, pool, queue = full_pool_and_queue()
    state = types.SimpleNamespace(shutting_down=False)
    task = await queued_new_session(pool, sessions, queue, state=state)
    upstream = pool.backends["b1"].upstream = Creates(pool, "b1")
    sessions.end("held", EndReason.CLIENT_DELETE)  # b1 handed to the waiter...
    state.shutting_down = True  # ...in the tick SIGTERM arrived
    queue.fail_all(proxy.WebDriverError.session_not_created("stickyproxy is shutting down"))
    with pytest.raises(proxy.WebDriverError, match="shutting down"):
        await asyncio.wait_for(task, 5)
    assert upstream.loads == [] and pool.backends["b1"].pending == 0
