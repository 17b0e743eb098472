"""Part 3: scale of the state. Per-request routing cost and proxy RSS as pinned sessions grow
(10 -> 1,000 -> 100,000, 4 backends) and as backends grow (4 -> 100 -> 1,000, 1,000 sessions),
against one nginx worker that answers a unique session id per POST /session ($request_id) and
listens on up to 1,000 ports. Sessions are added incrementally to one proxy; each backend count
gets a fresh proxy (backends come from a TOML --config file). wrk at 64 connections picks at random
among a sample of up to 10,000 pinned session paths, so every point pays the same Lua cost. The machine drifts
more between minutes than the 10% flatness target, so each series keeps a reference proxy in
its first state alive and measures every point beside it, A B B A A B B A (`Reference`): the
flatness is the median ratio of the point's CPU per request to the reference's run next to it;
at the first point that is an A/A comparison, which shows the method's own noise. The absolute
figures are the best of the point's runs. Each
backend count is also measured through HAProxy (`balance uri`) over the same paths and through
the Python floor (benchmarks/floor_proxy.py): references for what touching that many backend
connections costs any proxy, and any Python proxy, here. Each point also times the
routing decisions alone, in-process on the same state size (`routing_cost.py`): the part of a
request's cost that depends on the state, apart from sockets.
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .loadgen import create_sessions, wrk_run
from .e2e import wait_all_up
from .procs import Stack, fetch_json

SAMPLE = 10_000


def _paths(ids: list[str]) -> list[str]:
    rnd = random.Random(len(ids))
    sample = ids if len(ids) <= SAMPLE else rnd.sample(ids, SAMPLE)
    return [f"/session/{s}/title" for s in sample]


_SS_SOCKET = re.compile(r"^\S+\s+\S+\s+\S+:(\d+)\s+\S+:(\d+)\s+users:.*?pid=(\d+),")
_SS_COUNT = re.compile(r"\b(segs_out|data_segs_out):(\d+)")


def upstream_segments(proxy, front_port: int) -> dict[tuple[int, int], tuple[int, int]] | None:
    """TCP segments the proxy sent on each open connection to its backends (all but the
    front's), as (all, carrying data), from the kernel's own counters (`ss -ti`; None without
    iproute2). The difference is the pure ACKs: one per request where a backend connection
    idles past the kernel's delayed-ACK window between requests (the growth with 1,000
    backends, measured)."""
    pids = {p.pid for p in proxy.procs()}
    try:
        out = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True,
                             text=True, timeout=30).stdout
    except FileNotFoundError:
        return None
    found: dict[tuple[int, int], tuple[int, int]] = {}
    key = None
    for line in out.splitlines():
        m = _SS_SOCKET.match(line)
        if m:
            local, peer, pid = map(int, m.groups())
            key = (local, peer) if pid in pids and local != front_port else None
        elif key is not None and line[:1].isspace():
            counts = dict((k, int(v)) for k, v in _SS_COUNT.findall(line))
            found[key] = (counts.get("segs_out", 0), counts.get("data_segs_out", 0))
            key = None
    return found


def _segments_delta(before: dict | None, after: dict | None) -> tuple[int, int] | None:
    """Segments sent between two snapshots, over the connections open at the second."""
    if before is None or after is None:
        return None
    segs = data = 0
    for k, (s1, d1) in after.items():
        s0, d0 = before.get(k, (0, 0))
        segs, data = segs + s1 - s0, data + d1 - d0
    return segs, data


def _wrk(stack: Stack, proxy, port: int, paths: list[str], duration: float) -> dict:
    """One wrk run at 64 connections, with the proxy's CPU per request (and its kernel share)."""
    seg0 = upstream_segments(proxy, port)
    cpu0, sys0 = proxy.cpu(), proxy.cpu(system_only=True)
    r = wrk_run(stack.tmp, f"http://127.0.0.1:{port}/", connections=64, duration=duration, paths=paths)
    cpu1, sys1 = proxy.cpu(), proxy.cpu(system_only=True)
    sent = _segments_delta(seg0, upstream_segments(proxy, port))
    n = max(1, r["requests"])
    r["cpu_us_per_request"] = round((cpu1 - cpu0) * 1e6 / n, 2)
    # The kernel's share apart: a growth with the backend count can be socket work that any
    # proxy pays (more upstream connections), not the proxy's own code.
    r["sys_us_per_request"] = round((sys1 - sys0) * 1e6 / n, 2)
    # and what the kernel sent to the backends per request: requests and pure ACKs
    r["upstream_segs_per_request"] = round(sent[0] / n, 3) if sent else None
    r["upstream_acks_per_request"] = round((sent[0] - sent[1]) / n, 3) if sent else None
    return r


def _warm(stack: Stack, port: int, paths: list[str]) -> None:
    wrk_run(stack.tmp, f"http://127.0.0.1:{port}/", connections=16, duration=1, paths=paths[:1000])


def _summary(proxy, runs: list[dict]) -> dict:
    best = min(runs, key=lambda r: r["cpu_us_per_request"])
    return {"rps": max(r["rps"] for r in runs), "p50_us": best["p50_us"], "p99_us": best["p99_us"],
            "errors": sum(r["errors"] for r in runs), "cpu_us_per_request": best["cpu_us_per_request"],
            "sys_us_per_request": best["sys_us_per_request"],
            "user_us_per_request": round(best["cpu_us_per_request"] - best["sys_us_per_request"], 2),
            "upstream_segs_per_request": best["upstream_segs_per_request"],
            "upstream_acks_per_request": best["upstream_acks_per_request"],
            "runs": [{"rps": r["rps"], "cpu_us_per_request": r["cpu_us_per_request"],
                      "upstream_acks_per_request": r["upstream_acks_per_request"]} for r in runs],
            "rss_mib": round(proxy.rss() / 2**20, 1)}


def _measure(stack: Stack, proxy, port: int, ids: list[str], duration: float, repeat: int = 2) -> dict:
    """Best of `repeat` wrk runs (the least disturbed by other work on the machine)."""
    paths = _paths(ids)
    _warm(stack, port, paths)
    return _summary(proxy, [_wrk(stack, proxy, port, paths, duration) for _ in range(repeat)])


class Reference:
    """A second stickyproxy holding the series' first state, alive for the whole series. The
    machine's speed drifts by 20-30% from one minute to the next, more than the 10% the
    flatness target allows, and in bursts rather than smoothly. So each point is measured beside
    it in alternating pairs, A B B A A B B A (reference, point, ...), and the point's cost is the
    median of the four ratios of its CPU per request to the reference run next to it."""

    def __init__(self, stack: Stack, proxy, port: int, ids: list[str], label: str) -> None:
        self.stack, self.proxy, self.port, self.label = stack, proxy, port, label
        self.paths = _paths(ids)

    def measure(self, proxy, port: int, ids: list[str], duration: float, pairs: int = 4) -> dict:
        paths = _paths(ids)
        _warm(self.stack, self.port, self.paths)
        _warm(self.stack, port, paths)
        ref_runs, runs = [], []
        for i in range(pairs):
            for which in ("ref", "point") if i % 2 == 0 else ("point", "ref"):
                if which == "ref":
                    ref_runs.append(_wrk(self.stack, self.proxy, self.port, self.paths, duration))
                else:
                    runs.append(_wrk(self.stack, proxy, port, paths, duration))
        ratios = [b["cpu_us_per_request"] / max(a["cpu_us_per_request"], 1e-9)
                  for a, b in zip(ref_runs, runs)]
        row = _summary(proxy, runs)
        row["paired"] = {"reference": self.label, "ratio": round(statistics.median(ratios), 3),
                         "ratios": [round(r, 3) for r in ratios],
                         "reference_cpu_us": [a["cpu_us_per_request"] for a in ref_runs],
                         "errors": sum(a["errors"] for a in ref_runs)}
        return row


def _other(stack: Stack, kind: str, backends: list[int], ids: list[str], duration: float) -> dict:
    """The same load through another proxy over the same backends: how much of a growth with the
    backend count any proxy pays on this machine. `haproxy`: one thread, `balance uri` over the
    same session paths, keep-alive. `python-floor`: benchmarks/floor_proxy.py, the least a Python
    sticky forwarder spends, with as many sessions of its own (it pins what it placed)."""
    proxy = None
    try:
        if kind == "haproxy":
            proxy, port = stack.start_haproxy(f"haproxy-scale-{len(backends)}", backends, mode="uri")
        else:
            proxy, port = stack.start_floor(backends)
            ids, errs = create_sessions("127.0.0.1", port, len(ids), concurrency=64)
            if errs:
                raise RuntimeError(f"POST /session through the floor failed: {sorted(set(errs))[:2]}")
        m = _measure(stack, proxy, port, ids, duration)
        return {k: m[k] for k in ("rps", "cpu_us_per_request", "user_us_per_request", "sys_us_per_request",
                                  "upstream_segs_per_request", "upstream_acks_per_request",
                                  "p99_us", "errors", "rss_mib")}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        if proxy is not None:
            stack.stop(proxy)


def _routing_cost(stack: Stack, sessions: int, backends: int) -> dict:
    """routing_cost.py on the stickyproxy being measured (its snapshot, not the working tree)."""
    try:
        r = subprocess.run([sys.executable, str(Path(__file__).with_name("routing_cost.py")),
                            str(sessions), str(backends)], capture_output=True, text=True,
                           cwd=stack.sp_path, env=dict(os.environ, PYTHONPATH=stack.sp_path),
                           timeout=300)
    except subprocess.TimeoutExpired:
        return {"error": "routing_cost.py ran over 300 s"}
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1]}
    return json.loads(r.stdout)


def _grow(port: int, ids: list[str], target: int) -> dict:
    t0 = time.monotonic()
    need = target - len(ids)
    new, errs = create_sessions("127.0.0.1", port, need, concurrency=64) if need > 0 else ([], [])
    ids.extend(new)
    dt = time.monotonic() - t0
    return {"created": len(new), "create_errors": len(errs), "create_s": round(dt, 2),
            "creates_per_s": round(len(new) / dt, 1) if dt and new else None,
            "first_errors": sorted(set(errs))[:3]}


def run(stack: Stack, *, duration: float, session_points=(10, 1_000, 100_000),
        backend_points=(4, 100, 1_000), backend_sessions: int = 1_000, sp_extra=None, log=print) -> dict:
    # shutdown only: with 100,000 live sessions a SIGTERM drain would otherwise wait its 60 s
    sp_extra = list(sp_extra or []) + ["--drain-timeout", "1s"]
    nginx, nports = stack.start_nginx(max(backend_points))
    out = {"sessions": [], "backends": []}
    try:
        # sessions grow, 4 backends, one proxy; beside it the reference with the first point's
        ref_proxy = None
        proxy = None
        try:
            ref_proxy, ref_port, ref_sport = stack.start_stickyproxy(nports[:4], sp_extra)
            wait_all_up(ref_sport, 4)
            ref_ids: list[str] = []
            _grow(ref_port, ref_ids, session_points[0])
            ref = Reference(stack, ref_proxy, ref_port, ref_ids,
                            f"{session_points[0]:,} sessions, 4 backends")
            proxy, port, sport = stack.start_stickyproxy(nports[:4], sp_extra)
            wait_all_up(sport, 4)
            ids: list[str] = []
            for target in session_points:
                g = _grow(port, ids, target)
                st = fetch_json(sport, "/stats")
                row = {"sessions": target, "backends": 4, **g, **ref.measure(proxy, port, ids, duration),
                       "stats_sessions_active": st.get("sessions_active"),
                       "routing": _routing_cost(stack, target, 4)}
                out["sessions"].append(row)
                log(f"[scale] sessions={target}: {row['rps']} req/s, {row['cpu_us_per_request']} us CPU/req "
                    f"(x{row['paired']['ratio']} the reference beside it), "
                    f"RSS {row['rss_mib']} MiB, created {g['created']} at {g['creates_per_s']}/s "
                    f"({g['create_errors']} errors), proxy says active={row['stats_sessions_active']}")
        except Exception as e:
            out["sessions"].append({"error": f"{type(e).__name__}: {e}"})
            log(f"[scale] sessions: ERROR {e}")
        finally:
            for p in (proxy, ref_proxy):
                if p is not None:
                    stack.stop(p, timeout=60)
        # backends grow, fixed sessions, a fresh proxy each; the reference has the first count
        ref_proxy = None
        try:
            ref_proxy, ref_port, ref_sport = stack.start_stickyproxy(
                nports[:backend_points[0]], sp_extra, config_file=True)
            wait_all_up(ref_sport, backend_points[0], timeout=60)
            ref_ids = []
            _grow(ref_port, ref_ids, backend_sessions)
            ref = Reference(stack, ref_proxy, ref_port, ref_ids,
                            f"{backend_sessions:,} sessions, {backend_points[0]:,} backends")
        except Exception as e:
            out["backends"].append({"error": f"reference proxy: {type(e).__name__}: {e}"})
            log(f"[scale] backends: reference ERROR {e}")
            ref = None
        for nb in backend_points if ref is not None else ():
            proxy = None
            try:
                proxy, port, sport = stack.start_stickyproxy(nports[:nb], sp_extra, config_file=True)
                t_up = time.monotonic()
                wait_all_up(sport, nb, timeout=60)
                t_up = round(time.monotonic() - t_up, 2)
                rss_idle = round(proxy.rss() / 2**20, 1)
                ids = []
                g = _grow(port, ids, backend_sessions)
                st = fetch_json(sport, "/stats")
                used = sum(1 for b in st.get("backends", []) if int(b.get("sessions_active", 0)) > 0)
                row = {"sessions": backend_sessions, "backends": nb, **g, "rss_idle_mib": rss_idle,
                       "all_up_s": t_up,
                       **ref.measure(proxy, port, ids, duration), "backends_with_sessions": used,
                       "stats_backends": len(st.get("backends", [])),
                       "routing": _routing_cost(stack, backend_sessions, nb)}
                out["backends"].append(row)
                log(f"[scale] backends={nb}: {row['rps']} req/s, {row['cpu_us_per_request']} us CPU/req "
                    f"(x{row['paired']['ratio']} the reference beside it), "
                    f"RSS {row['rss_mib']} MiB, sessions spread on {used}/{nb}")
                for kind in ("haproxy", "python-floor"):
                    row[kind] = _other(stack, kind, nports[:nb], ids, duration)
                    log(f"[scale] backends={nb}, {kind} over the same backends: {row[kind]}")
            except Exception as e:
                out["backends"].append({"backends": nb, "error": f"{type(e).__name__}: {e}"})
                log(f"[scale] backends={nb}: ERROR {e}")
            finally:
                if proxy is not None:
                    stack.stop(proxy, timeout=60)
        if ref_proxy is not None:
            stack.stop(ref_proxy, timeout=60)
    finally:
        stack.stop(nginx)
    return out
