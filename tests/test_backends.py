"""backends.Pool without sockets: its placement index stays what a scan of the pool would find,
each backend's `serving` what its health and membership say, and every reservation of its id
counted on it (released by id, even after a move re-added its id), whatever happens to sessions,
checks, drains and membership."""

from __future__ import annotations

import collections
import random
import time

from stickyproxy import stats
from stickyproxy.backends import Pool
from stickyproxy.health import DOWN, CheckResult
from stickyproxy.providers import BackendSpec
from stickyproxy.sessions import EndReason, Session, SessionTable

OK, BAD = CheckResult(True, "ok", "up"), CheckResult(False, "refused", "connection refused")


def _pool(n: int, max_sessions: int = 0) -> Pool:
    pool = Pool(rise=1, fall=1, sessions=SessionTable(), max_sessions=max_sessions)
    pool.publish("static", [BackendSpec(f"static-{i}", f"http://127.0.0.1:{9000 + i}", "static")
                            for i in range(n)])
    for backend in pool:
        pool.record_check(backend, OK)
    return pool


def _scan(pool: Pool) -> dict[str, int]:
    """What the index must hold: the load of every backend taking new sessions."""
    return {b.id: pool.sessions.per_backend.get(b.id, 0) + b.pending
            for b in pool if b.takes_new_sessions}


def test_placement_spreads_new_sessions_evenly():
    pool = _pool(4)
    now = time.monotonic()
    for i in range(40):
        backend_id = pool.pick(None)
        pool.sessions.pin(Session(f"s{i}", backend_id, "", now, now))
        pool.release(backend_id)
    assert set(pool.sessions.per_backend.values()) == {10}


def test_the_index_matches_a_scan_whatever_the_pool_goes_through():
    rng = random.Random(11)
    pool = _pool(6, max_sessions=4)
    now, live, pending, n = time.monotonic(), [], [], 0
    seen = set(pool)  # every Backend object the pool has held
    for step in range(4000):
        op = rng.random()
        if op < 0.35:
            tried = tuple(rng.sample(sorted(pool.backends), rng.randrange(2)))
            candidates = {c.id: c.load for c in pool.candidates(exclude=tried)}
            picked = pool.pick(None, tried)
            if candidates:
                assert candidates[picked] == min(candidates.values()), step
                pending.append((picked, pool.backends[picked]))
            else:
                assert picked is None, step
        elif op < 0.55 and pending:
            backend_id, reserved_on = pending.pop(rng.randrange(len(pending)))
            if rng.random() < 0.7 and pool.backends.get(backend_id) is reserved_on:  # created
                n += 1
                pool.sessions.pin(Session(f"s{n}", backend_id, "", now, now))
                live.append(f"s{n}")
            pool.release(backend_id)
        elif op < 0.75 and live:
            pool.sessions.end(live.pop(rng.randrange(len(live))), EndReason.CLIENT_DELETE)
        elif op < 0.85:
            backend = rng.choice(list(pool))
            pool.record_check(backend, OK if rng.random() < 0.6 else BAD)
        elif op < 0.93:
            backend_id = rng.choice(sorted(pool.backends))
            if rng.random() < 0.5:
                pool.drain(backend_id, "admin")
            else:
                pool.undrain(backend_id)
        elif op < 0.96:
            pool.lost(rng.choice(sorted(pool.backends)), "exited")
            live = [s for s in live if pool.sessions.get(s)]
        else:  # a backend leaves, comes back, or moves (removed and re-added under its id)
            ids = rng.sample(range(8), 6)
            pool.publish("static", [BackendSpec(f"static-{i}", f"http://127.0.0.1:{9000 + i + 100 * rng.randrange(2)}",
                                                "static") for i in ids])
            live = [s for s in live if pool.sessions.get(s)]
            # A reservation outlives its backend: its holder releases it by id all the same.
        assert pool._index._load == _scan(pool), step
        # Reservations are released by id, so one made before a move may free the slot of one
        # made after it first; each id's count stays exact, and a backend never counts fewer
        # than it holds (placement may be cautious for a moment, never over the cap).
        held = collections.Counter(backend_id for backend_id, _ in pending)
        stale = pool._pending_of_removed
        for backend_id in held.keys() | stale.keys() | pool.backends.keys():
            b = pool.backends.get(backend_id)
            assert (b.pending if b else 0) + stale.get(backend_id, 0) == held[backend_id], step
            if b is not None:
                # every reservation of its id counts on it, whichever object it was made on
                assert b.pending == held[backend_id] and backend_id not in stale, (step, b.id)
        seen.update(pool)
        members = set(pool)
        for b in seen:  # the mirror a command reads instead of the Health object
            assert b.serving == (b in members and b.health.state != DOWN), (step, b.id)


def test_the_totals_only_grow_whatever_leaves_the_pool():
    """/stats adds the retired counts to the live backends': a backend removed (or moved, which
    removes and adds its id) takes its own counts with it, and an answer in flight at its
    removal still fails on it."""
    pool = _pool(2)
    a, b = pool.backends["static-0"], pool.backends["static-1"]
    a.requests_total, b.requests_total = 5, 7
    pool.count_error(a)
    pool.count_error(b)

    def totals():
        snap = stats.snapshot(pool, pool.sessions, {}, 0.0, 0)
        return snap["requests_total"], snap["errors_total"]

    assert totals() == (12, 2)
    pool.publish("static", [b.spec])  # static-0 removed
    assert totals() == (12, 2)
    pool.count_error(a)  # its answer in flight failed after
    pool.count_request(a)  # a bridged command's next call went out after
    assert totals() == (13, 3)
    pool.publish("static", [BackendSpec("static-1", "http://127.0.0.1:9999", "static")])  # moved
    pool.count_error(pool.backends["static-1"])
    assert totals() == (13, 4) and a.errors_total == 2


def test_a_new_session_may_wait_only_for_a_replacement_on_its_way():
    """Pool.replacing: whether a new session that finds no backend taking sessions queues
    (a recycled backend's replacement is coming) or fails at once."""
    pool = _pool(1)
    assert not pool.replacing()  # nothing recycling: fail at once
    pool.drain("static-0", "recycling: created 1 sessions", recycling=True)
    assert not pool.could_take() and pool.replacing()  # its replacement starts next tick
    old = pool.get("static-0")
    old.replace_failed = True  # ...but starting it failed: nothing is coming
    assert not pool.replacing()
    old.replace_failed, old.replacement, old.replace_started = False, "static-9", time.monotonic()
    assert pool.replacing()  # started, not in the pool yet (a local one joins once listening)
    pool.publish("static", [old.spec, BackendSpec("static-9", "http://127.0.0.1:9009", "static")])
    assert pool.replacing() and not pool.replacing(tried=["static-9"])  # not up yet / refused it
    pool.record_check(pool.get("static-9"), OK)
    assert pool.could_take() and not pool.replacing()  # up: placed there, no wait needed


def test_a_replacement_that_never_comes_up_is_not_waited_for():
    pool = _pool(1)
    pool.drain("static-0", "recycling: created 1 sessions", recycling=True)
    old = pool.get("static-0")
    old.replacement, old.replace_started = "static-9", time.monotonic()
    assert pool.replacing()
    old.replace_started -= 61  # started over a minute ago, still not in the pool
    assert not pool.replacing()
