"""Prometheus exposition for the stats port's `GET /metrics` (issue 8).

Two kinds of figures, one registry per server (no module globals):
- Counters and gauges are *built at scrape time* from the same snapshot dict that `/stats` serves
  (`SnapshotCollector`), so `/metrics` and `/stats` cannot disagree: one snapshot, two renderings.
- Latencies are real histograms fed from the request path: one `observe()` per request and
  nothing else there (`Metrics.observe`); the check loop feeds the health-check histogram.

The snapshot keys are the README's stats schema; a key a backend does not carry (a static backend
has no memory, a Docker one has `memory_used_bytes` instead of `memory.rss_bytes`) yields no sample.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, InfoMetricFamily)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

# The `kind` label of the request histograms: a new session (placement, maybe a queue wait, a
# browser start), a command of a live session, or anything else stickyproxy answers itself.
KINDS = ("new_session", "command", "other")

_REQUEST_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120,
                    300)
_OVERHEAD_BUCKETS = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1)
_QUEUE_BUCKETS = (.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_CHECK_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 20, 60)


# --- from a snapshot (pure: no clock, no I/O) ----------------------------------------------------

def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def memory_of(row: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """(bytes used, bytes allowed) of a backend row, whichever provider filled it in: local
    processes report `memory: {rss_bytes, limit_bytes}`, Docker containers `memory: {used_bytes,
    limit_bytes}` (flat `memory_used_bytes` / `memory_limit_bytes` are read too)."""
    memory = row.get("memory")
    if isinstance(memory, Mapping):
        used = memory.get("rss_bytes", memory.get("used_bytes"))
        return _number(used), _number(memory.get("limit_bytes"))
    return _number(row.get("memory_used_bytes")), _number(row.get("memory_limit_bytes"))


def families(snap: Mapping[str, Any]) -> list[Metric]:
    """Every snapshot-derived metric family of one snapshot."""
    def gauge(name: str, doc: str, labels: Iterable[str] = ("backend",)) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=list(labels))

    def counter(name: str, doc: str, labels: Iterable[str] = ("backend",)) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, labels=list(labels))

    info = InfoMetricFamily("stickyproxy_backend", "A backend's address and where it came from",
                            labels=["backend"])
    up = gauge("stickyproxy_backend_up", "1 when the backend's health checks say up")
    state = gauge("stickyproxy_backend_state", "The backend's health state (1 for the current one)",
                  ("backend", "state"))
    draining = gauge("stickyproxy_backend_draining",
                     "1 when the backend takes no new sessions (admin drain or recycling)")
    created = counter("stickyproxy_sessions_created",
                      "Sessions created on the backend")
    active = gauge("stickyproxy_sessions_active", "Live sessions pinned to the backend")
    peak = gauge("stickyproxy_sessions_peak", "Most live sessions the backend held at once")
    capacity = gauge("stickyproxy_backend_capacity", "Live sessions allowed (--max-sessions)")
    ended_by_backend = counter("stickyproxy_backend_sessions_ended",
                               "Sessions of the backend that ended, by reason",
                               ("backend", "reason"))
    requests = counter("stickyproxy_requests", "Requests forwarded to the backend")
    errors = counter("stickyproxy_backend_errors",
                     "Requests to the backend that failed in transport")
    conns = gauge("stickyproxy_backend_connections_in_use", "Connections to the backend in use")
    opened = counter("stickyproxy_backend_connections_opened", "Connections opened to the backend")
    stale = counter("stickyproxy_backend_connections_stale",
                    "New sessions sent again over a fresh connection after a reused one broke "
                    "before any answer")
    check_ok = gauge("stickyproxy_backend_check_ok", "1 when the last health check passed")
    check_latency = gauge("stickyproxy_backend_check_latency_seconds",
                          "Latency of the last health check")
    lost = counter("stickyproxy_backend_lost", "Times the backend's process was seen to die")
    restarts = counter("stickyproxy_backend_restarts", "Times the provider restarted the backend")
    exits = counter("stickyproxy_backend_exits", "Exits of the backend's process, by reason",
                    ("backend", "reason"))
    oom = counter("stickyproxy_backend_oom_kills", "Times the backend was killed for memory")
    memory = gauge("stickyproxy_backend_memory_bytes", "Memory the backend uses (resident)")
    limit = gauge("stickyproxy_backend_memory_limit_bytes", "The backend's memory cap")
    age = gauge("stickyproxy_backend_age_seconds", "Time since the backend was added")

    for row in snap.get("backends") or ():
        bid = str(row.get("id", ""))
        labels = [bid]
        info.add_metric(labels, {"url": str(row.get("url") or ""),
                                 "source": str(row.get("source") or ""),
                                 "dialect": str(row.get("dialect") or "")})
        up.add_metric(labels, 1.0 if row.get("state") == "up" else 0.0)
        state.add_metric([bid, str(row.get("state", ""))], 1.0)
        draining.add_metric(labels, 0.0 if row.get("admin", "ready") == "ready" else 1.0)
        for family, key in ((created, "sessions_total"), (active, "sessions_active"),
                            (peak, "sessions_peak"), (capacity, "capacity"),
                            (requests, "requests_total"), (errors, "errors_total"),
                            (lost, "lost_total"), (restarts, "restarts"),
                            (oom, "oom_kills"), (age, "age_seconds")):
            value = _number(row.get(key))
            if value is not None:
                family.add_metric(labels, value)
        for reason, count in (row.get("sessions_ended") or {}).items():
            ended_by_backend.add_metric([bid, str(reason)], float(count))
        connections = row.get("connections") or {}
        if _number(connections.get("in_use")) is not None:
            conns.add_metric(labels, float(connections["in_use"]))
        if _number(connections.get("opened_total")) is not None:
            opened.add_metric(labels, float(connections["opened_total"]))
        if _number(connections.get("stale_total")) is not None:
            stale.add_metric(labels, float(connections["stale_total"]))
        check = row.get("last_check")
        if isinstance(check, Mapping):
            check_ok.add_metric(labels, 1.0 if check.get("ok") else 0.0)
            if _number(check.get("latency_ms")) is not None:
                check_latency.add_metric(labels, check["latency_ms"] / 1000)
        row_exits = row.get("exits")
        if isinstance(row_exits, Mapping):  # local: by reason
            for reason, count in row_exits.items():
                exits.add_metric([bid, str(reason)], float(count))
        elif _number(row_exits) is not None:  # Docker: one count
            exits.add_metric([bid, "exited"], float(row_exits))
        used, cap = memory_of(row)
        if used is not None:
            memory.add_metric(labels, used)
        if cap is not None:
            limit.add_metric(labels, cap)

    out: list[Metric] = [info, up, state, draining, created, active, peak, capacity,
                         ended_by_backend, requests, errors, conns, opened, stale, check_ok,
                         check_latency, lost, restarts, exits, oom, memory, limit, age]

    ended = counter("stickyproxy_sessions_ended", "Sessions ended, by reason (the SESSION_ENDED "
                    "log line's reason)", ("reason",))
    for reason, count in (snap.get("sessions_ended") or {}).items():
        ended.add_metric([str(reason)], float(count))
    out.append(ended)
    refused = counter("stickyproxy_requests_refused", "Requests refused before any backend saw "
                      "them (auth, limits, bad input), by reason", ("reason",))
    for reason, count in (snap.get("refused") or {}).items():
        refused.add_metric([str(reason)], float(count))
    out.append(refused)
    for name, key, doc, kind in (
            ("stickyproxy_backends_up", "backends_up", "Backends whose checks say up", "gauge"),
            ("stickyproxy_recycled", "recycled_total", "Backends recycled", "counter"),
            # (the sums over the per-backend series lose what a removed or moved backend counted)
            ("stickyproxy_forwarded_requests", "requests_total", "Requests forwarded to any "
             "backend, removed ones included", "counter"),
            ("stickyproxy_forward_errors", "errors_total", "Requests to any backend that failed "
             "in transport, removed ones included", "counter"),
            ("stickyproxy_sessions_learned", "sessions_learned_total", "Sessions created through "
             "another replica, pinned here by their signed id", "counter"),
            ("stickyproxy_shutting_down", "shutting_down", "1 while draining for shutdown",
             "gauge"),
            ("stickyproxy_uptime_seconds", "uptime_seconds", "Time since start", "gauge")):
        value = _number(snap.get(key))
        if value is not None:
            make = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            out.append(make(name, doc, value=value))

    queue = snap.get("queue")
    if isinstance(queue, Mapping):
        for name, key, doc, make in (
                ("stickyproxy_queue_length", "length", "New sessions waiting for a slot",
                 GaugeMetricFamily),
                ("stickyproxy_queue_max_length", "max_length", "Most new sessions that may wait "
                 "(--max-queue)", GaugeMetricFamily),
                ("stickyproxy_queue_oldest_wait_seconds", "oldest_wait_seconds",
                 "How long the oldest waiter has waited", GaugeMetricFamily),
                ("stickyproxy_queue_waited", "waited_total", "New sessions that had to queue",
                 CounterMetricFamily),
                ("stickyproxy_queue_timeouts", "timeouts_total",
                 "Queued new sessions that timed out (--queue-timeout)", CounterMetricFamily),
                ("stickyproxy_queue_abandoned", "abandoned_total",
                 "Queued new sessions whose client left", CounterMetricFamily),
                ("stickyproxy_queue_refused", "refused_total",
                 "New sessions refused because the queue was full", CounterMetricFamily)):
            value = _number(queue.get(key))
            if value is not None:
                out.append(make(name, doc, value=value))
    return out


class SnapshotCollector:
    """A custom collector: every scrape takes one snapshot and renders it."""

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        return families(self._snapshot())


# --- the request path ---------------------------------------------------------------------------

class Buckets:
    """One histogram child fed once per request: a bisect and two additions, no lock (the event
    loop is one thread). prometheus_client's Histogram.observe, with its mutex per value, was
    ~5% of the proxy's CPU per command (benchmarks/profile.py overhead)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: the first bound >= value
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        total, out = 0, []
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            total += count
            out.append((floatToGoString(bound), total))
        return out


class RequestHistograms:
    """A collector rendering `Buckets` by label at scrape time, like a labelled Histogram."""

    def __init__(self, name: str, doc: str, label: str, values: Iterable[str],
                 bounds: tuple[float, ...]) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.children = {value: Buckets(bounds) for value in values}

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=[self.label])
        for value, child in self.children.items():
            family.add_metric([value], child.cumulative(), child.sum)
        return [family]


class Timing:
    """One request's clock, kept by the proxy handler: when it started, how long it waited on
    its backend and in the queue (so the rest is stickyproxy's own overhead), and what the
    access log names (session, backend)."""

    __slots__ = ("started", "kind", "backend", "queued", "session", "backend_id", "busy")

    def __init__(self, started: float) -> None:
        self.started = started
        self.kind = "other"
        self.backend = 0.0  # seconds waiting on the backend (request sent .. answer read)
        self.queued = 0.0  # seconds waiting in the new-session queue
        self.session = ""
        self.backend_id = ""
        self.busy = None  # the Session whose command this is, until it is answered

    async def on_backend(self, awaitable):
        """Await something the backend answers, counting the wait as the backend's time."""
        began = time.perf_counter()
        try:
            return await awaitable
        finally:
            self.backend += time.perf_counter() - began


class Metrics:
    """The registry of one server: the snapshot collector, the process collector, and the
    histograms the request path and the check loops feed."""

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]], process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot))
        if process:
            ProcessCollector(namespace="stickyproxy", registry=self.registry)
        r = self.registry
        self.request_seconds = RequestHistograms(
            "stickyproxy_request_duration_seconds",
            "Time from a request's arrival to its answer, by kind (new_session, command, other)",
            "kind", KINDS, _REQUEST_BUCKETS)
        self.overhead_seconds = RequestHistograms(
            "stickyproxy_proxy_overhead_seconds",
            "Time a request spent in stickyproxy itself: total minus the backend's answer and "
            "the queue wait", "kind", KINDS, _OVERHEAD_BUCKETS)
        r.register(self.request_seconds)
        r.register(self.overhead_seconds)
        self.queue_wait_seconds = Histogram(
            "stickyproxy_queue_wait_seconds", "Time a new session waited in the queue for a slot",
            buckets=_QUEUE_BUCKETS, registry=r)
        self.check_seconds = Histogram(
            "stickyproxy_health_check_duration_seconds", "Latency of health checks",
            ["result"], buckets=_CHECK_BUCKETS, registry=r)
        # Children resolved once: the hot path does no label lookup.
        self._request = self.request_seconds.children
        self._overhead = self.overhead_seconds.children

    def observe(self, timing: Timing, elapsed: float) -> None:
        """One finished request (called once per request by the proxy handler)."""
        # Buckets.observe inlined: two method calls less on every request.
        kind = timing.kind
        buckets = self._request[kind]
        buckets.counts[bisect_left(buckets.bounds, elapsed)] += 1
        buckets.sum += elapsed
        own = elapsed - timing.backend - timing.queued
        if own < 0.0:
            own = 0.0
        buckets = self._overhead[kind]
        buckets.counts[bisect_left(buckets.bounds, own)] += 1
        buckets.sum += own

    def observe_queue_wait(self, seconds: float) -> None:
        self.queue_wait_seconds.observe(seconds)

    def observe_check(self, result_code: str, seconds: float) -> None:
        self.check_seconds.labels(result_code).observe(seconds)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """(body, content type) for `GET /metrics`, in the format the scraper asked for."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
