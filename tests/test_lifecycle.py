import asyncio
import random

import pytest

from stickyproxy.lifecycle import (Reaper, Wear, expiry, fmt, may_start_recycling, next_look,
                                   recycle_reason)
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


def _one_backend_life(source: str = "static", providers: dict | None = None, **settings):
    """A Lifecycle over a pool of one backend that is up (`<source>-1`), no sockets."""
    import types

    from stickyproxy.backends import Pool
    from stickyproxy.health import CheckResult
    from stickyproxy.lifecycle import Lifecycle
    from stickyproxy.providers import BackendSpec
    from stickyproxy.sessions import SessionTable

    sessions = SessionTable()
    pool = Pool(1, 1, sessions)
    pool.publish(source, [BackendSpec(f"{source}-1", "http://127.0.0.1:9", source)])
    backend = pool.backends[f"{source}-1"]
    pool.record_check(backend, CheckResult(True, "ok", "up"))
    settings = types.SimpleNamespace(**{
        "session_idle_timeout": 0, "session_max_age": 0, "recycle_after_sessions": 0,
        "recycle_after": 0, "recycle_above_memory": 0, "max_recycling": 1, "check_timeout": 1,
        "session_key": "", **settings})
    return pool, sessions, backend, Lifecycle(pool, sessions, settings, providers or {})


async def test_a_provider_that_fails_to_recycle_stops_neither_reaping_nor_the_loop(caplog):
    """replace() raising (a Docker API error: no real provider fails on cue) is logged and
    retried on the next tick; the idle reaper runs on."""
    import time

    class Failing:
        calls = 0

        async def replace(self, backend_id):
            Failing.calls += 1
            raise RuntimeError("the engine said no")

        async def retire(self, backend_id):
            pass

    pool, sessions, backend, life = _one_backend_life(
        "docker", {"docker": Failing()}, session_idle_timeout=0.2, recycle_after_sessions=1)
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
        # and new sessions do not queue for a replacement that is not coming
        assert backend.replace_failed and not pool.replacing()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# --- the reaper's timing wheel ---------------------------------------------------------------


def test_next_look_is_the_earliest_time_a_session_can_expire():
    s = session(created=0, last_used=100)
    assert next_look(s, 150, 300, 0) == 400
    assert next_look(s, 150, 300, 360) == 360  # its max age comes first
    assert next_look(s, 150, 0, 360) == 360
    s.busy = 1  # idle from an answer still to come: not before now + the timeout
    assert next_look(s, 150, 300, 0) == 450


def test_the_reaper_looks_only_at_sessions_due():
    reaper = Reaper(idle_timeout=10, max_age=0, tick=1)
    live = {}
    for i in range(5):
        live[f"s{i}"] = Session(f"s{i}", "b", "g", created=i, last_used=i)
        reaper.watch(live[f"s{i}"], now=i)
    assert reaper.expired(live, 9.5) == []
    assert [sid for sid, *_ in reaper.expired(live, 11.0)] == ["s0", "s1"]
    assert len(reaper) == 3  # the others were not taken out to be looked at
    live["s2"].last_used = 11.5  # used since: goes back for its new earliest time
    del live["s3"]  # ended by its client: dropped when its bucket comes
    assert [sid for sid, *_ in reaper.expired(live, 14.0)] == ["s4"]
    assert len(reaper) == 1
    assert reaper.expired(live, 21.0) == [] and len(reaper) == 1  # (not quite idle for 10 s)
    assert reaper.expired(live, 22.0) == [("s2", EndReason.IDLE, "no command for 10s")]
    assert len(reaper) == 0


def test_a_session_is_looked_at_only_when_it_may_have_expired():
    reaper = Reaper(idle_timeout=100, max_age=0, tick=1)
    live = {f"s{i}": Session(f"s{i}", "b", "g", created=0, last_used=0) for i in range(1000)}
    for s in live.values():
        reaper.watch(s, 0)
    live["s0"].busy = 1  # a command that runs for a long time
    for step in range(200):  # every half second, as the loop ticks
        assert reaper.expired(live, step / 2) == []
    assert reaper.looked_total == 0  # nothing looked at before its idle timeout
    for sid, *_ in reaper.expired(live, 100.0):
        del live[sid]
    assert list(live) == ["s0"] and reaper.looked_total == 1000
    for step in range(201, 2201):  # 1,000 s more
        assert reaper.expired(live, step / 2) == []
    # the busy one: once per idle timeout while its command runs, not once per tick
    assert 1000 + 9 <= reaper.looked_total <= 1000 + 11


def test_ended_and_repinned_ids_do_not_pile_up():
    """Only a 24 h max age: an ended session's id would wait a day for its bucket."""
    reaper = Reaper(idle_timeout=0, max_age=24 * 3600, tick=1)
    live: dict[str, Session] = {}
    keep = Session("keep", "b", "g", created=0, last_used=0)
    live["keep"] = keep
    for t in range(5000):
        for i in range(3):  # three sessions a second, each quit a second later
            s = Session(f"s{t}-{i}", "b", "g", created=t, last_used=t)
            live[s.id] = s
            reaper.watch(s, t)
            live.pop(f"s{t - 1}-{i}", None)
        reaper.watch(keep, t)  # and one id pinned again and again
        assert reaper.expired(live, t) == []
        assert len(reaper) <= 2 * len(live) + 1024 + 4
    assert [sid for sid, *_ in reaper.expired(live, 24 * 3600 + 5000)] == sorted(live)
    assert len(reaper) == 0


def test_a_reaper_with_both_limits_off_keeps_nothing():
    reaper = Reaper(idle_timeout=0, max_age=0, tick=1)
    s = session()
    reaper.watch(s, 0)
    assert len(reaper) == 0 and reaper.expired({"s": s}, 1e9) == []


def test_a_session_due_in_a_bucket_already_taken_is_looked_at_on_the_next_tick():
    reaper = Reaper(idle_timeout=10, max_age=0, tick=1)
    reaper.expired({}, 50)  # buckets up to 50 taken
    s = session(created=0, last_used=0)  # (e.g. learned from another replica, long idle)
    reaper.watch(s, 0)
    assert reaper.expired({"s": s}, 50.5) == []
    assert reaper.expired({"s": s}, 51.0)[0][1] is EndReason.IDLE


def test_an_id_pinned_twice_is_looked_at_once():
    reaper = Reaper(idle_timeout=10, max_age=0, tick=1)
    s = session(created=0, last_used=0)
    reaper.watch(s, 0)
    reaper.watch(s, 0)
    s.last_used = 5
    assert reaper.expired({"s": s}, 10) == [] and len(reaper) == 1


@pytest.mark.parametrize("seed", range(20))
def test_the_reaper_ends_what_a_full_scan_would_and_at_most_two_ticks_later(seed):
    """A random walk of sessions pinned, used, busy and ended by their clients, against the full
    scan it replaced: never an end the scan would not make, none later than two ticks (the
    bucket, then the loop's own tick), and nothing left behind."""
    rnd = random.Random(seed)
    idle, max_age, tick = rnd.choice([(3.0, 0.0, 0.75), (3.0, 7.0, 0.75), (0.0, 5.0, 1.0),
                                      (1.0, 0.0, 0.25)])
    reaper = Reaper(idle, max_age, tick)
    live: dict[str, Session] = {}
    due_since: dict[str, float] = {}  # when the full scan first found it expired
    now, n = 100.0 + rnd.random(), 0
    for _ in range(400):
        now += rnd.uniform(0, tick)
        for _ in range(rnd.randrange(3)):
            n += 1
            s = Session(f"s{n}", "b", "g", created=now, last_used=now)
            live[s.id] = s
            reaper.watch(s, now)
        # (the sessions the scan would have reaped are left alone: a command in the tick or
        # two the reaper may be later than the scan keeps a session alive, as it should)
        waiting = [s for s in live.values() if s.id not in due_since]
        for s in rnd.sample(waiting, min(len(waiting), rnd.randrange(4))):
            action = rnd.random()
            if action < 0.5:
                s.last_used = now
            elif action < 0.8:
                s.busy = 1 - s.busy
                s.last_used = now
            elif action < 0.9:
                reaper.watch(s, now)  # its id pinned again (learned back from another replica)
            else:
                del live[s.id]  # its client quit it
        for sid, s in live.items():
            if expiry(s, now, idle, max_age):
                due_since.setdefault(sid, now)
            else:
                assert sid not in due_since  # expiry is for good: nothing un-expires
        for sid, reason, _ in reaper.expired(live, now):
            assert expiry(live[sid], now, idle, max_age)[0] is reason
            del live[sid]
            due_since.pop(sid)
        for sid, since in due_since.items():
            assert now - since <= 2 * tick, f"{sid} due since {since}, not reaped at {now}"
    for s in live.values():  # every command answered; then all of them expire, and the
        s.busy = 0           # wheel is left empty
        s.last_used = now
    later = now + max(idle, max_age) + 2 * tick
    assert {sid for sid, *_ in reaper.expired(live, later)} == set(live)
    assert len(reaper) == 0




async def test_shutdown_waits_for_a_new_session_still_being_created():
    """A session whose creation was under way at SIGTERM used to be pinned after the sweep and
    left on its backend, never ended nor counted."""
    import time

    pool, sessions, backend, life = _one_backend_life()
    backend.upstream = None  # (nothing to DELETE on: the pins are what is checked)
    assert pool.pick(None) == "static-1"  # a new session on its way
    drained = asyncio.ensure_future(life.drain_all(5, asyncio.Event()))
    await asyncio.sleep(0.3)
    assert not drained.done()  # it waits for the answer...
    now = time.monotonic()
    sessions.pin(Session("late", "static-1", backend.spec.generation, now, now))
    pool.release("static-1")
    hurry = asyncio.Event()
    await asyncio.sleep(0.3)
    assert not drained.done()  # ...then for the session itself, as for any live one
    drained.cancel()
    await life.drain_all(0, hurry)
    assert sessions.why_ended("late").reason is EndReason.SHUTDOWN


async def test_a_replica_leaves_its_sessions_running_for_the_others():
    """With --session-key every replica serves every session: one stopping must not delete
    them on the backends (the clients behind the other replicas would lose them)."""
    import time

    pool, sessions, backend, life = _one_backend_life(session_key="k")
    deleted = []
    life.delete = lambda b, sid: deleted.append(sid)
    now = time.monotonic()
    sessions.pin(Session("shared", "static-1", backend.spec.generation, now, now))
    await life.drain_all(0, asyncio.Event())
    ended = sessions.why_ended("shared")
    assert ended.reason is EndReason.SHUTDOWN and "other replicas" in ended.detail
    assert deleted == []
    pool2, sessions2, backend2, life2 = _one_backend_life()  # without a key: deleted
    life2.delete = lambda b, sid: deleted.append(sid)
    sessions2.pin(Session("own", "static-1", backend2.spec.generation, now, now))
    await life2.drain_all(0, asyncio.Event())
    assert deleted == ["own"]
