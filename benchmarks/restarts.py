"""Part 4: restarts under load. PhantomJS leaks: the recipe answers with a cron job that restarts
every container (every 20 minutes), killing the sessions that are live at that instant;
stickyproxy recycles one backend at a time after it has served N sessions, once its live sessions
have ended. Both run the end-to-end workload (8 clients, 4 PhantomJS) for one window, with the
restarts compressed into it so each PhantomJS is restarted about twice:

  haproxy-cron         haproxy-close with the recipe's health checks over 4 PhantomJS; at 1/3
                       and 2/3 of the window every PhantomJS is stopped and started again on its
                       port (`docker-compose restart`, as the cron job does)
  stickyproxy-recycle  stickyproxy's own pool (`--local 4`), `--recycle-after-sessions N` with N =
                       5 per window second (150 for a 30 s window: each backend about every 12 s
                       at this machine's rate)
  stickyproxy-norestart  the same pool never restarted: the throughput without restarts, and the
                       memory PhantomJS keeps when nothing restarts it

Reported: sessions/s, failed sessions and why, restarts done, PhantomJS resident memory (sampled
every 0.25 s: the sum over the live processes, peak and at the window's end, and the largest single
process), and stickyproxy's
own count of ended sessions by reason. The pools run without network isolation (`--isolation
off`) so every contender runs the same PhantomJS the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import psutil

from .e2e import N_BACKENDS, wait_all_up
from .procs import REPO, Proc, Stack, fetch_json, wait_http

CONTENDERS = ("haproxy-cron", "stickyproxy-recycle", "stickyproxy-norestart")
CONCURRENCY = 8
CRON_TIMES = (1 / 3, 2 / 3)  # of the window


class Memory(threading.Thread):
    """Samples the RSS of whatever `procs()` returns until stopped: the sum's peak and last value,
    and the largest single process seen (a drained process and its replacement overlap for a
    moment, which lifts the sum but not the largest)."""

    def __init__(self, procs) -> None:
        super().__init__(daemon=True)
        self.procs, self.peak, self.last, self.largest = procs, 0, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.25):
            total = 0
            for p in self.procs():
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                self.largest = max(self.largest, rss)
            self.last = total
            self.peak = max(self.peak, total)


class Cron(threading.Thread):
    """The recipe's restart job, at fixed instants of the window: stop every PhantomJS, then start
    each again on its port, and wait until all answer /status."""

    def __init__(self, stack: Stack, phantoms: list[list], window: float) -> None:
        super().__init__(daemon=True)
        self.stack, self.phantoms, self.window = stack, phantoms, window
        self.start_at = threading.Event()  # set at WINDOW_START
        self.stop = threading.Event()
        self.restarts: list[float] = []  # seconds each whole restart took

    def run(self) -> None:
        if not self.start_at.wait(120):
            return
        t0 = time.monotonic()
        for at in CRON_TIMES:
            if self.stop.wait(max(0.0, t0 + at * self.window - time.monotonic())):
                return
            began = time.monotonic()
            for entry in self.phantoms:
                self.stack.stop(entry[0])
            for i, entry in enumerate(self.phantoms):
                entry[0] = self.stack.start_phantom(entry[1], f"phantomjs{i + 1}")
            for proc, port in self.phantoms:
                wait_http(port, "/status", 30, proc)
            self.restarts.append(round(time.monotonic() - began, 2))


def run_cell(stack: Stack, contender: str, *, page_url: str, warmup: float, window: float) -> dict:
    spec = {"concurrency": CONCURRENCY, "warmup": warmup, "duration": window, "page_url": page_url,
            "max_sessions_per_worker": int(window * 40 + 200)}
    proxy: Proc | None = None
    phantoms: list[list] = []
    cron = None
    stats_port = None
    recycle_after = int(5 * window)
    try:
        if contender == "haproxy-cron":
            phantoms = [[p, port] for p, port in stack.start_phantoms(N_BACKENDS)]
            proxy, port = stack.start_haproxy("haproxy-cron", [port for _, port in phantoms], mode="close",
                                              checks=True)
            spec["cookie"] = True
            cron = Cron(stack, phantoms, window)
            cron.start()
            live = lambda: [e[0].ps for e in phantoms]  # noqa: E731 (the current processes)
        else:
            extra = ["--local", str(N_BACKENDS), "--isolation", "off", "--phantomjs", stack.phantom_bin()]
            if contender == "stickyproxy-recycle":
                extra += ["--recycle-after-sessions", str(recycle_after)]
            proxy, port, stats_port = stack.start_stickyproxy([], extra)
            wait_all_up(stats_port, N_BACKENDS, timeout=60)
            live = lambda: _children(proxy)  # noqa: E731
        spec["targets"] = [["127.0.0.1", port, contender]]
        memory = Memory(live)
        stats0 = stats1 = None
        client = subprocess.Popen([sys.executable, "-m", "benchmarks.workload", json.dumps(spec)],
                                  cwd=str(REPO), stdout=subprocess.PIPE, text=True)
        result = None
        rss_end = None
        for line in client.stdout:
            line = line.strip()
            if line == "WINDOW_START":
                memory.start()
                if cron is not None:
                    cron.start_at.set()
                if stats_port:
                    stats0 = fetch_json(stats_port, "/stats")
            elif line == "WINDOW_END":
                rss_end = memory.last
                if stats_port:
                    stats1 = fetch_json(stats_port, "/stats")
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
        client.wait(30)
        memory.done.set()
        if result is None:
            raise RuntimeError(f"workload client failed (rc={client.returncode})")
        out = {k: result[k] for k in ("concurrency", "window_s", "sessions", "sessions_per_s", "failed",
                                      "errors", "hung_workers", "session_latency")}
        out["contender"] = contender
        out["phantom_rss_mib_peak"] = round(memory.peak / 2**20, 1)
        out["phantom_rss_mib_end"] = round((rss_end or 0) / 2**20, 1)
        out["phantom_rss_mib_largest"] = round(memory.largest / 2**20, 1)
        if cron is not None:
            cron.stop.set()
            cron.join(60)
            out["restarts"] = len(cron.restarts) * N_BACKENDS
            out["restart_s"] = cron.restarts
            out["restart_policy"] = f"all {N_BACKENDS} at {', '.join(f'{t:.2f}' for t in CRON_TIMES)} of the window"
        if stats1 is not None:
            out["restarts"] = stats1.get("recycled_total", 0) - stats0.get("recycled_total", 0)
            out["restart_policy"] = (f"--recycle-after-sessions {recycle_after}"
                                     if contender == "stickyproxy-recycle" else "none")
            out["sessions_ended"] = {k: v - stats0["sessions_ended"].get(k, 0)
                                     for k, v in stats1["sessions_ended"].items()
                                     if v - stats0["sessions_ended"].get(k, 0)}
        return out
    finally:
        if cron is not None:
            cron.stop.set()
            cron.start_at.set()
            cron.join(60)
        if proxy is not None:
            stack.stop(proxy, timeout=30)  # stickyproxy stops its own PhantomJS pool on SIGTERM
        for p, _ in phantoms:
            stack.stop(p)


def _children(proxy: Proc) -> list[psutil.Process]:
    try:
        return proxy.ps.children(recursive=True)
    except psutil.Error:
        return []


def run(stack: Stack, *, page_url: str, warmup: float, window: float, contenders=CONTENDERS,
        log=print) -> list[dict]:
    cells = []
    for name in contenders:
        try:
            r = run_cell(stack, name, page_url=page_url, warmup=warmup, window=window)
            log(f"[restarts] {name}: {r['sessions_per_s']} sessions/s, failed {r['failed']} {r['errors']}, "
                f"restarts {r.get('restarts')}, PhantomJS RSS peak {r['phantom_rss_mib_peak']} MiB")
        except Exception as e:  # a contender that cannot run is a result, not a crash
            r = {"contender": name, "error": f"{type(e).__name__}: {e}"}
            log(f"[restarts] {name}: ERROR {r['error']}")
        cells.append(r)
    return cells
