import pytest

from stickyproxy.lifecycle import Wear, expiry, fmt, may_start_recycling, recycle_reason
from stickyproxy.sessions import EndReason, Session


def session(created=0.0, last_used=0.0):
    return Session("s", "b", "g", created, last_used)


@pytest.mark.parametrize("now, idle, max_age, expected", [
    (10, 300, 0, None),
    (300, 300, 0, EndReason.IDLE),
    (299.9, 300, 0, None),
    (100, 0, 0, None),  # both off
    (100, 300, 60, EndReason.MAX_AGE),  # busy but too old
    (1000, 0, 0, None),
])
def test_expiry(now, idle, max_age, expected):
    verdict = expiry(session(0, 0), now, idle, max_age)
    assert (verdict[0] if verdict else None) is expected


def test_expiry_says_how_long():
    assert expiry(session(), 300, 300, 0) == (EndReason.IDLE, "no command for 5m")


def test_a_recently_used_session_is_not_idle():
    assert expiry(session(created=0, last_used=250), 300, 60 * 10, 0) is None


def test_a_session_with_a_command_in_flight_is_not_idle_but_still_ages():
    running = session(created=0, last_used=0)
    running.busy = 1  # a command started at 0 and still running (a slow page load)
    assert expiry(running, 1000, 300, 0) is None
    assert expiry(running, 1000, 300, 900)[0] is EndReason.MAX_AGE
    running.busy = 0
    assert expiry(running, 1000, 300, 0)[0] is EndReason.IDLE


@pytest.mark.parametrize("wear, args, expected", [
    (Wear(5, 10, None), (5, 0, 0), "created 5 sessions"),
    (Wear(4, 10, None), (5, 0, 0), None),
    (Wear(0, 1200, None), (0, 1200, 0), "ran 20m"),
    (Wear(0, 10, 600 << 20), (0, 0, 512 << 20), "resident memory 600 MiB"),
    (Wear(0, 10, None), (0, 0, 512 << 20), None),  # unknown memory is no reason
    (Wear(100, 10 ** 6, 10 ** 12), (0, 0, 0), None),  # all off
])
def test_recycle_reason(wear, args, expected):
    reason = recycle_reason(wear, *args)
    assert (reason is None) if expected is None else reason.startswith(expected)


def test_recycling_is_bounded():
    assert may_start_recycling(0, 1) and not may_start_recycling(1, 1)


@pytest.mark.parametrize("seconds, text", [(0.25, "250ms"), (5, "5s"), (90, "1m30s"), (3600, "1h"), (0, "0ms")])
def test_fmt(seconds, text):
    assert fmt(seconds) == text


async def test_a_provider_that_fails_to_recycle_stops_neither_reaping_nor_the_loop(caplog):
    """replace() raising (a Docker API error: no real provider fails on cue) is logged and
    retried on the next tick; the idle reaper runs on."""
    import asyncio
    import time
    import types

    from stickyproxy.backends import Pool
    from stickyproxy.health import CheckResult
    from stickyproxy.lifecycle import Lifecycle
    from stickyproxy.providers import BackendSpec
    from stickyproxy.sessions import SessionTable

    class Failing:
        calls = 0

        async def replace(self, backend_id):
            Failing.calls += 1
            raise RuntimeError("the engine said no")

        async def retire(self, backend_id):
            pass

    sessions = SessionTable()
    pool = Pool(1, 1, sessions)
    pool.publish("docker", [BackendSpec("docker-1", "http://127.0.0.1:9", "docker")])
    backend = pool.backends["docker-1"]
    pool.record_check(backend, CheckResult(True, "ok", "up"))
    settings = types.SimpleNamespace(
        session_idle_timeout=0.2, session_max_age=0, recycle_after_sessions=1, recycle_after=0,
        recycle_above_memory=0, max_recycling=1, check_timeout=1)
    life = Lifecycle(pool, sessions, settings, {"docker": Failing()})
    pool.drain("docker-1", "recycling: test", recycling=True)
    now = time.monotonic()  # idle 0.2 s from now: after the first failed recycle
    sessions.pin(Session("idle", "docker-1", backend.spec.generation, now, now))
    backend.upstream = None  # (nothing to DELETE on: the pin is what is checked)
    task = asyncio.get_running_loop().create_task(life.run())
    try:
        for _ in range(100):
            if Failing.calls >= 2 and "idle" not in sessions.live:
                break
            await asyncio.sleep(0.05)
        assert Failing.calls >= 2 and not task.done()  # retried, and the loop lives
        assert "idle" not in sessions.live  # reaped meanwhile
        assert "RECYCLE_FAILED backend=docker-1" in caplog.text
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
