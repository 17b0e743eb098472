"""Part 1: end to end with real PhantomJS, each contender fronting the same 4 fresh processes.

For every (contender, concurrency) cell: restart the PhantomJS servers (they keep the memory of
quit sessions), start the contender, run the workload subprocess, and read CPU of every process at
the client's WINDOW_START / WINDOW_END. Contenders:
  stickyproxy         the project, plain Selenium-like clients (no Cookie): fewest live sessions
  stickyproxy-cookie  the project, the recipe's clients unchanged (Cookie -> rendezvous hash)
  stickyproxy-w3c     the project, Selenium 4's W3C dialect, translated for PhantomJS by the
                      bridge (no other contender can serve it: HAProxy passes W3C through and
                      GhostDriver refuses the new session)
  haproxy-close       balance hdr(Cookie) + option http-server-close (HAProxy's best variant)
  haproxy-recipe      balance hdr(Cookie), default keep-alive (the original recipe exactly)
  direct              no proxy: worker i talks straight to backend i % 4 (the upper bound)
  python-floor        reference only: benchmarks/floor_proxy.py, the least a Python + uvloop
                      sticky forwarder spends (round robin, no checks, limits or stats)
Placement is counted by the client from a response header (X-Stickyproxy-Backend, or X-Served-By
that the HAProxy config adds), exact for live peaks; stickyproxy's /stats totals cross-check it.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from .procs import REPO, Stack, fetch_json

CONTENDERS = ("stickyproxy", "stickyproxy-cookie", "stickyproxy-w3c", "haproxy-close", "haproxy-recipe",
              "direct", "python-floor")
N_BACKENDS = 4


def run_cell(stack: Stack, contender: str, concurrency: int, *, page_url: str, warmup: float,
             duration: float, sp_extra: list[str], log=print) -> dict:
    phantoms = stack.start_phantoms(N_BACKENDS)
    ports = [port for _, port in phantoms]
    label_of = {f"http://127.0.0.1:{p}": f"b{i + 1}" for i, p in enumerate(ports)}
    proxy = None
    stats_port = None
    spec = {"concurrency": concurrency, "warmup": warmup, "duration": duration, "page_url": page_url,
            "max_sessions_per_worker": int(duration * 40 + 200)}
    try:
        if contender == "direct":
            spec["targets"] = [["127.0.0.1", p, f"b{i + 1}"] for i, p in enumerate(ports)]
            spec["quickack"] = True  # the best a direct client can do against GhostDriver
        elif contender == "python-floor":
            proxy, port = stack.start_floor(ports)
            spec["targets"] = [["127.0.0.1", port, "python-floor"]]
            spec["backend_header"] = "X-Served-By"
        elif contender.startswith("haproxy"):
            proxy, port = stack.start_haproxy(contender, ports, mode=contender.split("-")[1])
            spec["targets"] = [["127.0.0.1", port, "haproxy"]]
            spec["backend_header"] = "X-Served-By"
            spec["cookie"] = True
        elif contender.startswith("stickyproxy"):
            proxy, port, stats_port = stack.start_stickyproxy(ports, sp_extra)
            st = wait_all_up(stats_port, N_BACKENDS)
            spec["targets"] = [["127.0.0.1", port, "stickyproxy"]]
            spec["backend_header"] = "X-Stickyproxy-Backend"
            spec["backend_labels"] = {b["id"]: label_of.get(b["url"], b["id"]) for b in st["backends"]}
            spec["cookie"] = contender.endswith("-cookie")
            spec["dialect"] = "w3c" if contender.endswith("-w3c") else "jsonwp"
        else:
            raise ValueError(contender)

        client = subprocess.Popen([sys.executable, "-m", "benchmarks.workload", json.dumps(spec)],
                                  cwd=str(REPO), stdout=subprocess.PIPE, text=True)
        cpu0 = cpu1 = None
        stats0 = stats1 = None
        result = None
        t_start = time.monotonic()
        for line in client.stdout:
            line = line.strip()
            if line == "WINDOW_START":
                cpu0 = _cpu(phantoms, proxy)
                if stats_port:
                    stats0 = fetch_json(stats_port, "/stats")
            elif line == "WINDOW_END":
                cpu1 = _cpu(phantoms, proxy)
                if stats_port:
                    stats1 = fetch_json(stats_port, "/stats")
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
        client.wait(30)
        if result is None:
            raise RuntimeError(f"workload client failed (rc={client.returncode})")
        result["wall_s"] = round(time.monotonic() - t_start, 2)
        n = max(1, result["sessions"])
        result["cpu_s"] = {k: round(cpu1[k] - cpu0[k], 4) for k in cpu0}
        result["cpu_s"]["client"] = result["client_cpu_s"]
        result["cpu_ms_per_session"] = {k: round(v * 1000.0 / n, 3) for k, v in result["cpu_s"].items()}
        result["phantom_rss_mib_end"] = round(sum(p.rss() for p, _ in phantoms) / 2**20, 1)
        if proxy is not None:
            result["proxy_rss_mib_end"] = round(proxy.rss() / 2**20, 1)
        if stats1 is not None:
            b0 = {b["id"]: b for b in stats0.get("backends", [])}
            result["stats_created_in_window"] = {
                label_of.get(b["url"], b["id"]): int(b["sessions_total"]) - int(b0.get(b["id"], {}).get("sessions_total", 0))
                for b in stats1.get("backends", [])}
            result["stats_end"] = {k: stats1.get(k) for k in ("sessions_active", "sessions_total",
                                                              "requests_total", "errors_total", "sessions_ended")}
            result["backend_connections_opened"] = {
                label_of.get(b["url"], b["id"]): (b.get("connections") or {}).get("opened_total")
                for b in stats1.get("backends", [])}
        result["placement_source"] = {"direct": "client (worker -> backend)"}.get(
            contender, "client (response header naming the backend)")
        if result.get("failed") and proxy is not None:
            # Why, from the proxy's side too (its log is gone once the next cell starts).
            result["proxy_warnings"] = [line for line in proxy.tail(1 << 24).splitlines()
                                        if " WARNING " in line or " ERROR " in line][:20]
        result["spread"] = spread(result.get("live_peak", {}), N_BACKENDS)
        result["worst_vs_fair"] = worst_vs_fair(result.get("live_peak", {}), concurrency)
        return result
    finally:
        if proxy is not None:
            rc = stack.stop(proxy)
            if contender.startswith("stickyproxy") and rc not in (0, None):
                log(f"  ! stickyproxy exited {rc} on SIGTERM")
        for p, _ in phantoms:
            stack.stop(p)


def wait_all_up(stats_port: int, n: int, timeout: float = 30.0) -> dict:
    """stickyproxy places sessions only on backends that passed a check: wait for all n."""
    deadline = time.monotonic() + timeout
    while True:
        st = fetch_json(stats_port, "/stats")
        if sum(1 for b in st.get("backends", []) if b.get("state") == "up") >= n:
            return st
        if time.monotonic() > deadline:
            raise TimeoutError(f"backends not up: {[b.get('state') for b in st.get('backends', [])]}")
        time.sleep(0.05)


def worst_vs_fair(peaks: dict, concurrency: int, n: int = N_BACKENDS) -> float | None:
    """The busiest backend's live peak against the fair share C/N (stricter than `spread`: round
    robin can peak 5,5,5,5 at C=8 where the fair share is 2). None below C=N."""
    vals = [int(v) for k, v in peaks.items() if k != "?"]
    if concurrency < n or not vals:
        return None
    return round(max(vals) / (concurrency / n), 2)


def spread(peaks: dict, n: int) -> float | None:
    vals = [int(v) for k, v in peaks.items() if k != "?"]
    vals += [0] * max(0, n - len(vals))
    if not vals or sum(vals) == 0:
        return None
    return round(max(vals) / (sum(vals) / len(vals)), 3)


def _cpu(phantoms, proxy) -> dict:
    out = {"phantomjs": sum(p.cpu() for p, _ in phantoms)}
    if proxy is not None:
        out["proxy"] = proxy.cpu()
        out["proxy_system"] = proxy.cpu(system_only=True)  # in the JSON only: kernel vs Python
    return out


def run(stack: Stack, *, page_url: str, concurrencies, warmup: float, duration: float,
        contenders=CONTENDERS, sp_extra=None, rounds: int = 2, log=print) -> list[dict]:
    """Every concurrency: `rounds` rounds over all contenders, in alternating order (A..E, E..A)
    so a drift in the machine's load does not favour whoever runs first; rounds are merged."""
    cells = []
    for c in concurrencies:
        cells += alternate(contenders, rounds, f"[e2e] C={c}", log, lambda name: run_cell(
            stack, name, c, page_url=page_url, warmup=warmup, duration=duration, sp_extra=sp_extra or [], log=log),
            failed={"concurrency": c})
    return cells


PAIRED = ("stickyproxy", "haproxy-close", "direct")


def paired(stack: Stack, *, page_url: str, concurrencies, warmup: float, duration: float,
           sp_extra=None, rounds: int = 4, log=print) -> list[dict]:
    """More rounds of stickyproxy, HAProxy's best variant and no proxy, back to back, the order
    reversed every other round (A B C, C B A, ...), for the targets' ratios.

    One run of a cell differs from the next by 10-20% on this machine, whichever the contender
    (no proxy too) and however close in time: more than the targets' margins, and more than
    the main table's two rounds can average out. The report pools these runs with the main
    table's (sessions over seconds) and shows each round's own ratio beside it."""
    out = []
    for c in concurrencies:
        runs: dict[str, list[dict]] = {n: [] for n in PAIRED}
        for rnd in range(rounds):
            for name in PAIRED if rnd % 2 == 0 else PAIRED[::-1]:
                try:
                    r = run_cell(stack, name, c, page_url=page_url, warmup=warmup, duration=duration,
                                 sp_extra=sp_extra or [], log=log)
                    log(f"[e2e paired] C={c} round {rnd + 1} {name}: {r['sessions_per_s']} sessions/s, "
                        f"failed {r['failed']}, proxy cpu ms/session {r['cpu_ms_per_session'].get('proxy')}"
                        + (f", errors {r.get('errors')} {r.get('proxy_warnings', [])[:3]}"
                           if r["failed"] else ""))
                except Exception as e:  # a run that cannot run is a result, not a crash
                    r = {"error": f"{type(e).__name__}: {e}"}
                    log(f"[e2e paired] C={c} round {rnd + 1} {name}: ERROR {r['error']}")
                runs[name].append(r)
        out.append(paired_row(c, duration, runs))
    return out


def _merged(counts) -> dict:
    out: dict = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def paired_row(concurrency: int, duration: float, runs: dict[str, list[dict]]) -> dict:
    """The extra rounds of one concurrency from its runs (lists in round order per contender):
    each contender's sessions/s per round, and each round's own ratios (a round where either
    run failed to run, or completed nothing, gives none)."""
    sp = runs[PAIRED[0]]
    row: dict = {"concurrency": concurrency, "rounds": len(sp), "window_s": duration,
                 "sessions_per_s": {n: [r.get("sessions_per_s") for r in rs] for n, rs in runs.items()},
                 "failed": {n: sum(r["failed"] for r in rs if "error" not in r) for n, rs in runs.items()},
                 # each failed session's reason as the client saw it, and the proxy's warnings
                 "failure_kinds": {n: _merged(r.get("errors") or {} for r in rs if "error" not in r)
                                   for n, rs in runs.items()},
                 "proxy_warnings": {n: [w for r in rs for w in r.get("proxy_warnings", [])][:20]
                                    for n, rs in runs.items()},
                 "errors": [f"{n} round {i + 1}: {r['error']}" for n, rs in runs.items()
                            for i, r in enumerate(rs) if "error" in r]}
    for other, key in ((PAIRED[1], "vs_haproxy"), (PAIRED[2], "vs_direct")):
        # (a run that completed nothing has no ratio: it would swamp the median)
        pairs = [(a, b) for a, b in zip(sp, runs[other])
                 if "error" not in a and "error" not in b and b["sessions_per_s"] > 0]
        if not pairs:
            continue
        rate = [a["sessions_per_s"] / b["sessions_per_s"] for a, b in pairs]
        # The verdict reads the median unrounded: 0.9996 is not 1.0x.
        row[key] = {"ratio": statistics.median(rate), "ratios": [round(x, 3) for x in rate]}
        if other == PAIRED[1]:
            cpu = [a["cpu_ms_per_session"]["proxy"] / b["cpu_ms_per_session"]["proxy"]
                   for a, b in pairs if a["cpu_ms_per_session"].get("proxy")
                   and b["cpu_ms_per_session"].get("proxy")]
            row[key]["cpu_ratio"] = statistics.median(cpu) if cpu else None
    return row


def alternate(contenders, rounds: int, tag: str, log, run_one, failed: dict | None = None) -> list[dict]:
    """`rounds` rounds of run_one(contender) over all contenders, the order reversed every other
    round (A..E, E..A) so a drift in the machine's load does not favour whoever runs first; one
    merged cell per contender. A contender that cannot run is a result (`failed` + its error)."""
    per: dict[str, list[dict]] = {n: [] for n in contenders}
    for rnd in range(rounds):
        for name in (list(contenders) if rnd % 2 == 0 else list(reversed(contenders))):
            try:
                r = run_one(name)
                log(f"{tag} round {rnd + 1} {name}: {r['sessions_per_s']} sessions/s, failed {r['failed']}, "
                    f"cpu ms/session {r['cpu_ms_per_session']}, peaks {r.get('live_peak')}")
            except Exception as e:  # a contender that cannot run is a result, not a crash
                r = {**(failed or {}), "error": f"{type(e).__name__}: {e}"}
                log(f"{tag} round {rnd + 1} {name}: ERROR {r['error']}")
            per[name].append(r)
    cells = []
    for name in contenders:
        cell = merge(per[name])
        cell["contender"] = name
        cells.append(cell)
    return cells


def merge(rounds: list[dict]) -> dict:
    """One cell from its rounds: counts and CPU summed, latencies pooled, peaks maxed."""
    from .workload import summarize

    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return dict(rounds[0])
    out: dict = {"concurrency": ok[0]["concurrency"], "rounds": len(ok)}
    out["window_s"] = sum(r["window_s"] for r in ok)
    out["sessions"] = sum(r["sessions"] for r in ok)
    out["sessions_per_s"] = round(out["sessions"] / out["window_s"], 3)
    out["round_sessions_per_s"] = [r["sessions_per_s"] for r in ok]
    out["failed"] = sum(r["failed"] for r in ok)
    out["hung_workers"] = sum(r.get("hung_workers", 0) for r in ok)
    out["errors"] = {}
    for r in ok:
        for k, v in r["errors"].items():
            out["errors"][k] = out["errors"].get(k, 0) + v
    if len(ok) < len(rounds):
        out["errors"]["round failed to run"] = len(rounds) - len(ok)
    out["cpu_s"] = {}
    for r in ok:
        for k, v in r["cpu_s"].items():
            out["cpu_s"][k] = round(out["cpu_s"].get(k, 0.0) + v, 4)
    n = max(1, out["sessions"])
    out["cpu_ms_per_session"] = {k: round(v * 1000.0 / n, 3) for k, v in out["cpu_s"].items()}
    out["latency"] = {k: summarize([x / 1000.0 for r in ok for x in r["raw_ms"][k]]) for k in ok[0]["raw_ms"]}
    out["session_latency"] = summarize([x / 1000.0 for r in ok for x in r["raw_session_ms"]])
    for key in ("live_peak",):
        out[key] = {}
        for r in ok:
            for b, v in r.get(key, {}).items():
                out[key][b] = max(out[key].get(b, 0), v)
    for key in ("placed_total", "stats_created_in_window"):
        if any(key in r for r in ok):
            out[key] = {}
            for r in ok:
                for b, v in r.get(key, {}).items():
                    out[key][b] = out[key].get(b, 0) + v
    out["spread"] = spread(out["live_peak"], N_BACKENDS)
    out["worst_vs_fair"] = worst_vs_fair(out["live_peak"], out["concurrency"])
    out["round_spread"] = [r.get("spread") for r in ok]
    for key in ("placement_source", "phantom_rss_mib_end", "proxy_rss_mib_end", "stats_end", "sessions_ended"):
        if key in ok[-1]:
            out[key] = ok[-1][key]
    out["client_cpu_s"] = out["cpu_s"].get("client")
    return out
