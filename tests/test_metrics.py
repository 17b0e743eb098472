"""Metrics: the collector renders a literal snapshot; the exposition parses and says the same."""

import copy

from prometheus_client.parser import text_string_to_metric_families

from stickyproxy.metrics import Buckets, Metrics, Timing, families

from snapshots import HOSTILE, SNAPSHOT


def scrape(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def test_every_snapshot_figure_is_a_sample():
    s = scrape(Metrics(lambda: SNAPSHOT, process=False))
    for row in SNAPSHOT["backends"]:
        b = row["id"]
        assert value(s, "stickyproxy_sessions_created_total", backend=b) == row["sessions_total"]
        assert value(s, "stickyproxy_sessions_active", backend=b) == row["sessions_active"]
        assert value(s, "stickyproxy_requests_total", backend=b) == row["requests_total"]
        assert value(s, "stickyproxy_backend_errors_total", backend=b) == row["errors_total"]
        assert value(s, "stickyproxy_backend_up", backend=b) == (row["state"] == "up")
        assert value(s, "stickyproxy_backend_state", backend=b, state=row["state"]) == 1
    for reason, count in SNAPSHOT["sessions_ended"].items():
        assert value(s, "stickyproxy_sessions_ended_total", reason=reason) == count
    for reason, count in SNAPSHOT["refused"].items():
        assert value(s, "stickyproxy_requests_refused_total", reason=reason) == count
    assert value(s, "stickyproxy_queue_length") == 2
    assert value(s, "stickyproxy_queue_refused_total") == 3
    assert value(s, "stickyproxy_backends_up") == 2
    assert value(s, "stickyproxy_recycled_total") == 1
    assert value(s, "stickyproxy_forwarded_requests_total") == SNAPSHOT["requests_total"]
    assert value(s, "stickyproxy_forward_errors_total") == SNAPSHOT["errors_total"]
    assert value(s, "stickyproxy_backend_draining", backend="local-2") == 1
    assert value(s, "stickyproxy_backend_draining", backend="local-1") == 0
    assert value(s, "stickyproxy_backend_check_latency_seconds", backend="local-1") == 0.0023
    assert value(s, "stickyproxy_backend_info", backend="local-1", url="http://127.0.0.1:34649",
                 source="local", dialect="jsonwp") == 1


def test_memory_from_local_and_docker_keys():
    s = scrape(Metrics(lambda: SNAPSHOT, process=False))
    assert value(s, "stickyproxy_backend_memory_bytes", backend="local-1") == 46428160
    assert value(s, "stickyproxy_backend_memory_limit_bytes", backend="local-1") == 2147483648
    assert value(s, "stickyproxy_backend_memory_bytes", backend="docker-1") == 104857600
    assert value(s, "stickyproxy_backend_memory_limit_bytes", backend="docker-1") == 536870912
    assert ("stickyproxy_backend_memory_bytes", (("backend", HOSTILE),)) not in s  # static: none
    assert value(s, "stickyproxy_backend_exits_total", backend="local-1", reason="oom") == 1
    assert value(s, "stickyproxy_backend_exits_total", backend="docker-1", reason="exited") == 3
    flat = families({"backends": [{"id": "d", "memory_used_bytes": 5, "memory_limit_bytes": 9,
                                   "exits": 2}]})
    got = {(f.name, smp.labels.get("reason"), smp.value) for f in flat for smp in f.samples}
    assert {("stickyproxy_backend_memory_bytes", None, 5),
            ("stickyproxy_backend_exits", "exited", 2),
            ("stickyproxy_backend_memory_limit_bytes", None, 9)} <= got
    assert value(s, "stickyproxy_backend_oom_kills_total", backend="docker-1") == 1
    assert value(s, "stickyproxy_backend_restarts_total", backend="docker-1") == 2


def test_per_backend_ends_appear_once_the_snapshot_carries_them():
    snap = copy.deepcopy(SNAPSHOT)
    snap["backends"][0]["sessions_ended"] = {"client_delete": 12, "idle": 2}
    s = scrape(Metrics(lambda: snap, process=False))
    assert value(s, "stickyproxy_backend_sessions_ended_total", backend="local-1",
                 reason="idle") == 2


def test_each_scrape_takes_one_fresh_snapshot():
    calls = []

    def source():
        calls.append(1)
        snap = copy.deepcopy(SNAPSHOT)
        snap["backends"][0]["sessions_active"] = len(calls)
        return snap

    metrics = Metrics(source, process=False)
    assert value(scrape(metrics), "stickyproxy_sessions_active", backend="local-1") == 1
    assert value(scrape(metrics), "stickyproxy_sessions_active", backend="local-1") == 2
    assert len(calls) == 2


def test_histograms_from_the_request_path():
    metrics = Metrics(lambda: {"backends": []}, process=False)
    timing = Timing(0.0)
    timing.kind, timing.backend, timing.queued = "command", 0.030, 0.0
    metrics.observe(timing, 0.031)
    new = Timing(0.0)
    new.kind, new.backend, new.queued = "new_session", 0.5, 2.0
    metrics.observe(new, 2.502)
    metrics.observe_queue_wait(2.0)
    metrics.observe_check("ok", 0.004)
    s = scrape(metrics)
    assert value(s, "stickyproxy_request_duration_seconds_count", kind="command") == 1
    assert value(s, "stickyproxy_request_duration_seconds_sum", kind="command") == 0.031
    assert value(s, "stickyproxy_request_duration_seconds_count", kind="other") == 0
    overhead = value(s, "stickyproxy_proxy_overhead_seconds_sum", kind="new_session")
    assert abs(overhead - 0.002) < 1e-9  # total minus backend minus queue
    assert value(s, "stickyproxy_proxy_overhead_seconds_bucket", kind="command", le="0.0025") == 1
    assert value(s, "stickyproxy_queue_wait_seconds_count") == 1
    assert value(s, "stickyproxy_queue_wait_seconds_bucket", le="2.5") == 1
    assert value(s, "stickyproxy_health_check_duration_seconds_count", result="ok") == 1


async def test_timing_counts_the_backend_wait_even_when_it_fails():
    async def fails():
        raise TimeoutError

    timing = Timing(0.0)
    assert await timing.on_backend(_answer(7)) == 7
    try:
        await timing.on_backend(fails())
    except TimeoutError:
        pass
    assert timing.backend > 0


async def _answer(n):
    return n


def test_registries_are_per_instance_and_openmetrics_is_offered():
    a, b = Metrics(lambda: SNAPSHOT), Metrics(lambda: {"backends": []}, process=False)
    assert a.registry is not b.registry
    assert any(k[0].startswith("stickyproxy_process_") for k in scrape(a))
    body, content_type = a.exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


def test_an_empty_snapshot_gives_no_backend_samples():
    assert all(not f.samples for f in families({"backends": []}))


def test_buckets_count_a_value_on_a_bound_in_that_bucket_and_render_cumulatively():
    buckets = Buckets((0.001, 0.01, 0.1))
    for v in (0.0005, 0.001, 0.05, 7.0):
        buckets.observe(v)
    assert buckets.cumulative() == [("0.001", 2), ("0.01", 2), ("0.1", 3), ("+Inf", 4)]
    assert abs(buckets.sum - 7.0515) < 1e-9
