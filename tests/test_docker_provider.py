"""The Docker provider's pure decisions and its event bookkeeping, without a Docker engine."""

from __future__ import annotations

import asyncio

import pytest

from stickyproxy.providers import BackendSpec
from stickyproxy.providers.docker import (
    DockerProvider,
    Observed,
    backend_url,
    choose_slots,
    config_hash,
    memory_from_stats,
    observe,
    plan,
    pull_message,
    render_command,
    serving_by_slot,
    spec_for,
)

CFG = "cfg1"


def c(cid, slot, state="running", config=CFG, started="2026-01-01T00:00:00Z", port=None):
    return Observed(id=cid, slot=slot, state=state, config=config, started_at=started,
                    name=f"stickyproxy-p-{slot}", port=port)


def kinds(actions):
    return [(a.kind, a.slot, a.container_id) for a in actions]


@pytest.mark.parametrize(
    "existing, count, expected",
    [
        pytest.param([], 3, [("create", 0, None), ("create", 1, None), ("create", 2, None)],
                     id="empty pool: create every slot"),
        pytest.param([c("a", 0), c("b", 1)], 2, [], id="full running pool: adopt, nothing to do"),
        pytest.param([c("a", 0), c("b", 1, "restarting")], 2, [],
                     id="docker is restarting one: leave it to docker"),
        pytest.param([c("a", 0), c("b", 2)], 3, [("create", 1, None)], id="a hole is filled"),
        pytest.param([c("a", 0), c("b", 1), c("z", 5)], 2, [("remove", 5, "z")],
                     id="slot beyond the pool size is removed"),
        pytest.param([c("a", 0), c("x", None)], 1, [("remove", None, "x")],
                     id="container without slot label is removed"),
        pytest.param([c("a", 0, "exited")], 1, [("start", 0, "a")], id="stopped by hand: start"),
        pytest.param([c("a", 0, "created")], 1, [("start", 0, "a")], id="created, never started"),
        pytest.param([c("a", 0, "paused")], 1, [("unpause", 0, "a")], id="paused: unpause"),
        pytest.param([c("a", 0, "dead")], 1, [("remove", 0, "a"), ("create", 0, None)],
                     id="dead: replace"),
        pytest.param([c("a", 0, "removing")], 1, [], id="being removed: wait for destroy"),
        pytest.param([c("a", 0, config="old")], 1, [("remove", 0, "a"), ("create", 0, None)],
                     id="other config (image, mem cap): replace"),
        pytest.param([c("a", 0, "exited"), c("b", 0, "running")], 1, [("remove", 0, "a")],
                     id="duplicates: keep the running one"),
        pytest.param([c("a", 0, started="2026-01-01T00:00:01Z"), c("b", 0, started="2026-01-01T00:00:02Z")],
                     1, [("remove", 0, "a")], id="duplicates both running: keep the newest"),
        pytest.param([c("a", 0, config="old"), c("b", 0, "exited")], 1,
                     [("remove", 0, "a"), ("start", 0, "b")],
                     id="duplicates: right config wins over running"),
        pytest.param([c("a", 0)], 0, [("remove", 0, "a")], id="pool of zero removes all"),
    ],
)
def test_plan(existing, count, expected):
    assert kinds(plan(existing, range(count), CFG)) == expected


@pytest.mark.parametrize(
    "existing, count, expected",
    [
        pytest.param([], 3, [0, 1, 2], id="nothing to adopt"),
        pytest.param([c("a", 4), c("b", 7)], 2, [4, 7], id="a recycled pool keeps its slot numbers"),
        pytest.param([c("a", 4), c("b", 7)], 3, [0, 4, 7], id="filled with the lowest free index"),
        pytest.param([c("a", 4), c("b", 7), c("d", 9)], 2, [4, 7], id="shrunk: lowest running kept"),
        pytest.param([c("a", 1, "exited"), c("b", 5)], 1, [5], id="running preferred over exited"),
        pytest.param([c("a", 1, config="old"), c("b", 5)], 1, [5], id="right config preferred"),
        pytest.param([c("a", 1, "exited")], 2, [0, 1], id="exited slot reused in place"),
        pytest.param([c("a", 3, "dead"), c("x", None)], 1, [0], id="dead and unlabelled ignored"),
    ],
)
def test_choose_slots(existing, count, expected):
    assert choose_slots(existing, count, CFG) == expected


def test_plan_orders_removals_then_starts_then_creates():
    existing = [c("a", 0, "exited"), c("z", 7), c("b", 2, "dead")]
    assert [a.kind for a in plan(existing, range(3), CFG)] == ["remove", "remove", "start", "create", "create"]


def test_plan_is_idempotent_once_applied():
    # After applying the plan the pool is complete: planning again does nothing.
    assert plan([c("a", 0), c("b", 1), c("d", 2)], range(3), CFG) == []


def test_serving_by_slot_only_running_in_range_with_config():
    existing = [c("a", 0), c("b", 1, "restarting"), c("x", 2, config="old"), c("y", 9),
                c("n1", 3, started="2026-01-01T00:00:01Z"), c("n2", 3, started="2026-01-01T00:00:05Z")]
    assert {s: o.id for s, o in serving_by_slot(existing, range(4), CFG).items()} == {0: "a", 3: "n2"}


def test_spec_for_host_network_uses_loopback_port():
    o = Observed(id="0123456789abcdef", slot=2, state="running", config=CFG,
                 started_at="2026-01-01T00:00:00.5Z", name="stickyproxy-p-2", port=40001)
    spec = spec_for(o, pool="p", network="host", mem_limit=160 << 20, image="img:1")
    assert spec == BackendSpec(
        id="docker-p-2", url="http://127.0.0.1:40001", source="docker",
        generation="0123456789ab@2026-01-01T00:00:00.5Z",
        meta={"container_id": "0123456789ab", "container_name": "stickyproxy-p-2", "image": "img:1",
              "mem_limit": 160 << 20, "port": 40001})


def test_named_network_reaches_containers_by_name():
    assert backend_url("grid", "stickyproxy-p-0", 8910) == "http://stickyproxy-p-0:8910"
    assert backend_url("host", "stickyproxy-p-0", 41000) == "http://127.0.0.1:41000"


def test_generation_changes_with_restart():
    a = c("abc", 0, started="2026-01-01T00:00:00Z")
    b = c("abc", 0, started="2026-01-01T00:01:00Z")
    assert a.generation != b.generation


def test_render_command():
    assert render_command("phantomjs --webdriver=127.0.0.1:{port}", 4444) == \
        ["phantomjs", "--webdriver=127.0.0.1:4444"]
    assert render_command(["phantomjs", "--webdriver={port}"], 8910) == ["phantomjs", "--webdriver=8910"]


def test_config_hash_tracks_what_matters():
    base = dict(image="i:1", command=["phantomjs"], mem_limit=1, network="host", restart="always",
                init=True)
    h = config_hash(**base)
    assert h == config_hash(**base)
    for key, value in [("image", "i:2"), ("mem_limit", 2), ("network", "n"), ("restart", "no"),
                       ("command", ["x"])]:
        assert config_hash(**{**base, key: value}) != h, key
    # Containers a stickyproxy before the WARN default started (INFO) are adopted, not replaced:
    # replacing them would end every live session at once on an upgrade.
    for network, old in (("host", "phantomjs --webdriver=127.0.0.1:{port}"),
                         ("grid", "phantomjs --webdriver={port}")):
        new = DockerProvider(1, network=network).command
        assert new != old and "--webdriver-loglevel=WARN" in new
        assert config_hash(**{**base, "network": network, "command": render_command(new, 0)}) == \
            config_hash(**{**base, "network": network, "command": render_command(old, 0)})


def test_observe_reads_inspect_attributes():
    attrs = {
        "Id": "f" * 64, "Name": "/stickyproxy-p-1", "RestartCount": 3,
        "Config": {"Labels": {"stickyproxy.pool": "p", "stickyproxy.slot": "1",
                              "stickyproxy.port": "40100", "stickyproxy.config": CFG}},
        "State": {"Status": "running", "StartedAt": "2026-01-01T00:00:00Z"},
    }
    assert observe(attrs) == Observed(id="f" * 64, slot=1, state="running", config=CFG,
                                      started_at="2026-01-01T00:00:00Z", name="stickyproxy-p-1",
                                      port=40100, restart_count=3)
    attrs["Config"]["Labels"]["stickyproxy.slot"] = "x"
    assert observe(attrs).slot is None


def test_memory_from_stats_subtracts_cache():
    v1 = {"memory_stats": {"usage": 100, "limit": 1000, "stats": {"total_inactive_file": 30}}}
    v2 = {"memory_stats": {"usage": 100, "limit": 1000, "stats": {"inactive_file": 10}}}
    assert memory_from_stats(v1) == (70, 1000)
    assert memory_from_stats(v2) == (90, 1000)
    assert memory_from_stats({}) == (None, None)


def test_pull_message_names_image_and_how_to_build_or_load():
    msg = pull_message("wernight/phantomjs:latest", "connection refused")
    assert "wernight/phantomjs:latest" in msg
    assert "docker build -t wernight/phantomjs:latest deploy/phantomjs" in msg
    assert "docker load" in msg


@pytest.mark.parametrize("kwargs", [dict(count=-1), dict(count=1, restart="sometimes"),
                                    dict(count=1, pool="a b"), dict(count=1, pool="")])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        DockerProvider(**kwargs)


def test_default_image_gets_latest_tag_and_host_command_binds_loopback_and_logs_little():
    p = DockerProvider(1)
    assert p.image == "wernight/phantomjs:latest"
    assert render_command(p.command, 5) == ["phantomjs", "--webdriver=127.0.0.1:5",
                                            "--webdriver-loglevel=WARN"]
    assert render_command(DockerProvider(1, network="grid").command, 8910) == [
        "phantomjs", "--webdriver=8910", "--webdriver-loglevel=WARN"]
    assert DockerProvider(1, image="localhost:5000/pj").image == "localhost:5000/pj:latest"


# -- events -> lost(reason), with a fake sink and no engine ---------------------------------------


class FakeSink:
    """Records what the provider tells the pool."""

    def __init__(self):
        self.published: list[list[BackendSpec]] = []
        self.losses: list[tuple[str, str]] = []

    def publish(self, source, specs):
        assert source == "docker"
        self.published.append(list(specs))

    def lost(self, backend_id, reason):
        self.losses.append((backend_id, reason))


def make_provider(observed, grace=0.05):
    sink = FakeSink()
    p = DockerProvider(2, pool="p", removal_grace=grace)
    p.config = CFG
    p._slots = {0, 1}
    p._sink = sink
    p._dirty = asyncio.Event()
    p._observe(observed)
    return p, sink


def ev(action, cid, slot=0):
    return {"Action": action, "id": cid, "Actor": {"ID": cid, "Attributes": {"stickyproxy.slot": str(slot)}}}


def running_pool():
    return [c("a" * 12, 0, port=1), c("b" * 12, 1, port=2)]


def test_first_observation_publishes_running_set():
    async def main():
        p, sink = make_provider(running_pool())
        assert [[s.id for s in specs] for specs in sink.published] == [["docker-p-0", "docker-p-1"]]
        p._observe(running_pool())  # unchanged: not published again
        assert len(sink.published) == 1
    asyncio.run(main())


def test_oom_then_die_is_lost_oom_at_once_and_counted_once():
    async def main():
        p, sink = make_provider(running_pool())
        a = "a" * 12
        p._on_event(ev("oom", a))
        p._on_event(ev("oom", a))  # cgroup v1 may repeat it
        p._on_event(ev("die", a))
        assert sink.losses == [("docker-p-0", "oom")]
        assert p.stats()["docker-p-0"]["oom_kills"] == 1
        p._on_event(ev("start", a))
        p._observe([c(a, 0, started="2026-01-02T00:00:00Z", port=1), c("b" * 12, 1, port=2)])
        assert p.stats()["docker-p-0"]["restarts"] == 1
        assert sink.published[-1][0].generation.endswith("2026-01-02T00:00:00Z")
    asyncio.run(main())


def test_die_alone_is_exited_after_the_grace():
    async def main():
        p, sink = make_provider(running_pool())
        p._on_event(ev("die", "b" * 12, 1))
        assert sink.losses == []  # held: a destroy may follow
        await asyncio.sleep(0.15)
        assert sink.losses == [("docker-p-1", "exited")]
        assert p.stats()["docker-p-1"]["exits"]["exited"] == 1
    asyncio.run(main())


def test_die_then_destroy_is_removed():
    async def main():
        p, sink = make_provider(running_pool())
        p._on_event(ev("kill", "a" * 12))
        p._on_event(ev("die", "a" * 12))
        p._on_event(ev("destroy", "a" * 12))
        await asyncio.sleep(0.15)
        assert sink.losses == [("docker-p-0", "removed")]
        assert p.stats()["docker-p-0"]["exits"]["removed"] == 1
    asyncio.run(main())


def test_die_then_late_oom_is_oom():
    async def main():
        p, sink = make_provider(running_pool())
        p._on_event(ev("die", "a" * 12))
        p._on_event(ev("oom", "a" * 12))
        await asyncio.sleep(0.15)
        assert sink.losses == [("docker-p-0", "oom")]
    asyncio.run(main())


def test_relist_reports_losses_the_events_missed():
    async def main():
        p, sink = make_provider(running_pool())
        # Container a vanished and b restarted while the events stream was down.
        p._observe([c("b" * 12, 1, started="2026-01-03T00:00:00Z", port=2)])
        assert sorted(sink.losses) == [("docker-p-0", "removed"), ("docker-p-1", "exited")]
        # Both slots stay published (the pool holds them down); b's new generation is published.
        assert [s.id for s in sink.published[-1]] == ["docker-p-0", "docker-p-1"]
        assert sink.published[-1][1].generation.endswith("2026-01-03T00:00:00Z")
    asyncio.run(main())


def test_lost_reported_once_per_generation():
    async def main():
        p, sink = make_provider(running_pool())
        p._on_event(ev("die", "a" * 12))
        p._on_event(ev("destroy", "a" * 12))
        p._on_event(ev("destroy", "a" * 12))
        p._observe([c("b" * 12, 1, port=2)])
        assert sink.losses == [("docker-p-0", "removed")]
    asyncio.run(main())


def test_resync_loop_ends_when_cancelled_as_it_wakes():
    # asyncio.wait_for on 3.11 swallows a cancel that lands as the awaited event is set: the
    # provider's task would then never end and shutdown would hang.
    async def main():
        p = DockerProvider(1)
        p._dirty = asyncio.Event()
        passes = []

        async def reconcile():
            passes.append(1)

        p.reconcile = reconcile
        task = asyncio.create_task(p._resync_loop())
        await asyncio.sleep(0)  # now waiting for _dirty
        p._dirty.set()
        task.cancel()
        async with asyncio.timeout(2):
            await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
    asyncio.run(main())
