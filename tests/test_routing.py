import collections
import random

import pytest

from stickyproxy.routing import (Attempt, Candidate, LoadIndex, choose, may_retry_elsewhere,
                                 rendezvous)


@pytest.mark.parametrize("loads, expected", [
    ({"a": 0}, {"a"}),
    ({"a": 3, "b": 1, "c": 2}, {"b"}),
    ({"a": 1, "b": 1, "c": 2}, {"a", "b"}),
    ({"a": 5, "b": 5}, {"a", "b"}),
])
def test_fewest_live_sessions_wins_ties_at_random(loads, expected):
    candidates = [Candidate(k, v) for k, v in loads.items()]
    picks = {choose(candidates, rng=random.Random(seed)) for seed in range(50)}
    assert picks == expected


def test_no_candidates_no_backend():
    assert choose([]) is None
    assert choose([], cookie="SESSION=x") is None


def test_placing_one_at_a_time_keeps_backends_level():
    loads = collections.Counter({f"b{i}": 0 for i in range(4)})
    rng = random.Random(1)
    for _ in range(40):
        loads[choose([Candidate(k, v) for k, v in loads.items()], rng=rng)] += 1
    assert set(loads.values()) == {10}


def test_cookie_uses_the_hash_not_the_load():
    candidates = [Candidate("a", 0), Candidate("b", 100)]
    wanted = rendezvous("SESSION=42", ["a", "b"])
    assert choose(candidates, cookie="SESSION=42") == wanted


def test_rendezvous_is_stable_and_moves_only_the_keys_of_a_leaving_backend():
    ids = [f"b{i}" for i in range(5)]
    keys = [f"SESSION={i}" for i in range(2000)]
    before = {k: rendezvous(k, ids) for k in keys}
    assert before == {k: rendezvous(k, list(reversed(ids))) for k in keys}  # order-free
    after = {k: rendezvous(k, ids[:-1]) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "b4" for k in moved)
    share = collections.Counter(before.values())
    assert min(share.values()) > 2000 / 5 * 0.8  # spread within 20% of even


def test_rendezvous_agrees_across_processes():
    # blake2b, not hash(): a restarted proxy or a replica must pick the same backend.
    assert rendezvous("SESSION=abc", ["static-1", "static-2", "static-3"]) == "static-1"


@pytest.mark.parametrize("attempt, allowed", [
    (Attempt.NOT_CONNECTED, True),
    (Attempt.SENT, False),
    (Attempt.ANSWERED, False),
])
def test_only_a_request_that_never_left_may_go_elsewhere(attempt, allowed):
    assert may_retry_elsewhere(attempt) is allowed


# --- LoadIndex: the same choice as `choose`, without a scan -----------------------------------

def test_the_index_picks_among_the_least_loaded_at_random():
    index = LoadIndex()
    for backend_id, load in {"a": 2, "b": 1, "c": 1, "d": 3}.items():
        index.set(backend_id, load)
    picks = {index.least(rng=random.Random(seed)) for seed in range(50)}
    assert picks == {"b", "c"}


def test_the_index_follows_moves_and_removals():
    index = LoadIndex()
    for backend_id in "abc":
        index.set(backend_id, 0)
    index.set("a", 1)
    index.set("b", None)  # stopped taking sessions
    assert "b" not in index and len(index) == 2
    assert index.least() == "c"
    index.set("c", 2)
    assert index.least() == "a"
    index.set("a", None)
    index.set("c", None)
    assert index.least() is None and len(index) == 0


def test_the_index_skips_excluded_and_full_backends():
    index = LoadIndex()
    for backend_id, load in {"a": 0, "b": 0, "c": 1, "d": 2}.items():
        index.set(backend_id, load)
    assert {index.least(exclude=("a", "b"), rng=random.Random(s)) for s in range(20)} == {"c"}
    assert index.least(exclude=("a", "b", "c")) == "d"
    assert index.least(exclude=("a", "b", "c"), cap=2) is None  # d is full
    assert index.least(exclude=("a", "b", "c", "d")) is None


def test_the_index_agrees_with_choose_over_random_changes():
    rng = random.Random(5)
    index, loads = LoadIndex(), {}
    for _ in range(3000):
        backend_id = f"b{rng.randrange(30)}"
        load = None if rng.random() < 0.2 else rng.randrange(6)
        index.set(backend_id, load)
        if load is None:
            loads.pop(backend_id, None)
        else:
            loads[backend_id] = load
        tried = tuple(rng.sample(sorted(loads), min(len(loads), rng.randrange(3))))
        left = {k: v for k, v in loads.items() if k not in tried}
        best = {k for k, v in left.items() if v == min(left.values())} if left else {None}
        assert index.least(exclude=tried, rng=rng) in best
        assert len(index) == len(loads)
