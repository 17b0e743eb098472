"""Markdown from one run's result dict (pure: no I/O): the tables of every part, ratios against
HAProxy's best variant and against no proxy, and the targets marked "met" or "missed by X".
"""

from __future__ import annotations

HAPROXY_VARIANTS = ("haproxy-close", "haproxy-recipe")
SP = "stickyproxy"


def _f(x, nd=1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _ratio(a, b) -> float | None:
    return None if not a or not b else a / b


def _rx(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _cells(results: dict) -> dict[tuple[str, int], dict]:
    return {(c["contender"], c["concurrency"]): c for c in results.get("e2e", []) if "contender" in c}


def best_haproxy(cells: dict, conc: int) -> tuple[str | None, dict | None]:
    best = None
    for v in HAPROXY_VARIANTS:
        c = cells.get((v, conc))
        if c and "error" not in c and (best is None or c["sessions_per_s"] > best[1]["sessions_per_s"]):
            best = (v, c)
    return best or (None, None)


def _pooled(cell: dict | None, runs: list | None, window: float | None) -> tuple[float | None, int]:
    """A contender's sessions/s over all its runs at one concurrency, and how many: the main
    table's rounds and the extra rounds run back to back after it (`e2e_paired`)."""
    sessions = seconds = 0.0
    n = 0
    if cell and "error" not in cell:
        sessions, seconds, n = cell["sessions"], cell["window_s"], cell.get("rounds", 1)
    for x in runs or []:
        if x is not None and window:
            sessions, seconds, n = sessions + x * window, seconds + window, n + 1
    return (sessions / seconds if seconds else None), n


def _all_runs(sp: dict, other: dict | None, pair: dict, name: str, key: str,
              ratio: float | None, measured: str) -> tuple[float | None, str]:
    """A target's end-to-end ratio: over all the runs of the two when the extra rounds ran,
    with the spread of single rounds beside it (the noise one run carries); else the table's."""
    if not pair or name not in pair.get("sessions_per_s", {}):
        return ratio, measured
    per, window = pair["sessions_per_s"], pair["window_s"]
    a, n = _pooled(sp, per[SP], window)
    b, m = _pooled(other, per[name], window)
    r = _ratio(a, b)
    if r is None:
        return ratio, measured
    rounds = pair.get(key, {}).get("ratios") or []
    spread = f"; one round alone read {min(rounds)}-{max(rounds)}" if rounds else ""
    runs = f"all {n} runs of each" if n == m else f"all runs ({n} of stickyproxy, {m} of {name})"
    return r, (f"{r:.3f}x over {runs} ({measured} in the main table, then "
               f"{len(per[SP])} rounds back to back{spread})")


def targets(results: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows."""
    out = []
    cells = _cells(results)

    def verdict(ok: bool, miss: str) -> str:
        return "met" if ok else f"missed by {miss}"

    e2e_pairs = {row["concurrency"]: row for row in results.get("e2e_paired") or []}
    for conc in (8, 16):
        sp = cells.get((SP, conc))
        hname, h = best_haproxy(cells, conc)
        d = cells.get(("direct", conc))
        pair = e2e_pairs.get(conc, {})
        if not sp or "error" in sp:
            if sp:
                out.append((f"C={conc}: stickyproxy runs", sp["error"], "missed"))
            continue
        if h:
            r = _ratio(sp["sessions_per_s"], h["sessions_per_s"])
            measured = f"{r:.3f}x" if r else "-"
            if hname == "haproxy-close":  # the variant the paired runs ran beside
                r, measured = _all_runs(sp, h, pair, hname, "vs_haproxy", r, measured)
            out.append((f"C={conc}: sessions/s >= 1.0x HAProxy best ({hname})", measured,
                        verdict(r is not None and r >= 1.0, f"{(1 - (r or 0)) * 100:.1f}%")))
            cp, ch = sp["cpu_ms_per_session"].get("proxy"), h["cpu_ms_per_session"].get("proxy")
            r2 = _ratio(cp, ch)
            out.append((f"C={conc}: proxy CPU/session <= 2x HAProxy's",
                        f"{_f(cp, 2)} ms vs {_f(ch, 2)} ms ({_rx(r2)})",
                        verdict(r2 is not None and r2 <= 2.0, f"{_f(cp - 2 * ch, 2)} ms ({_rx(r2)} vs 2x)" if r2 else "?")))
        if d and "error" not in d:
            r = _ratio(sp["sessions_per_s"], d["sessions_per_s"])
            r, measured = _all_runs(sp, d, pair, "direct", "vs_direct", r, _rx(r))
            out.append((f"C={conc}: sessions/s >= 0.95x no proxy", measured,
                        verdict(r is not None and r >= 0.95, f"{(0.95 - (r or 0)) * 100:.1f} points")))
        failed = sp["failed"] + pair.get("failed", {}).get(SP, 0)  # the extra rounds' too
        kinds = {**(sp.get("errors") or {})}
        for k, v in (pair.get("failure_kinds", {}).get(SP) or {}).items():
            kinds[k] = kinds.get(k, 0) + v
        why = f"; as the client saw them: {', '.join(f'{k} {v}' for k, v in kinds.items())}" if failed and kinds else ""
        out.append((f"C={conc}: zero failures", str(failed) + (" (main table and extra rounds)" if pair else "") + why,
                    verdict(failed == 0 and not sp.get("hung_workers"), f"{failed} failed")))
        s = sp.get("spread")
        out.append((f"C={conc}: spread peak/mean live sessions <= 1.1",
                    f"{_f(s, 2)} (peaks {_peaks(sp)}; worst/fair {_f(sp.get('worst_vs_fair'), 2)})", verdict(s is not None and s <= 1.1, f"{_f(s - 1.1 if s else None, 2)}")))
    fails = [c for (n, _), c in cells.items() if n.startswith(SP) and "error" not in c and c["failed"]]
    if fails:
        out.append(("all stickyproxy cells: zero failures", ", ".join(f"{c['contender']} C={c['concurrency']}: {c['failed']}" for c in fails), "missed"))

    for conc in sorted({k[1] for k in cells}):
        w3c, plain = cells.get((SP + "-w3c", conc)), cells.get((SP, conc))
        if w3c and plain and "error" not in plain:
            if "error" in w3c:
                out.append((f"C={conc}: Selenium 4 (W3C) sessions through the bridge run", w3c["error"], "missed"))
                continue
            r = _ratio(w3c["sessions_per_s"], plain["sessions_per_s"])
            out.append((f"C={conc}: W3C sessions through the bridge, zero failures (this project's bar)",
                        f"{w3c['failed']} failed; {_rx(r)} the JSON Wire sessions/s, proxy CPU "
                        f"{_f(w3c['cpu_ms_per_session'].get('proxy'), 2)} vs {_f(plain['cpu_ms_per_session'].get('proxy'), 2)} ms",
                        verdict(w3c["failed"] == 0 and not w3c.get("hung_workers"), f"{w3c['failed']} failed")))
    rec = next((c for c in results.get("restarts") or [] if c.get("contender") == "stickyproxy-recycle"), None)
    if rec is not None:
        if "error" in rec:
            out.append(("restarts: recycling under load runs", rec["error"], "missed"))
        else:
            cron = next((c for c in results["restarts"] if c.get("contender") == "haproxy-cron" and "error" not in c), None)
            out.append(("restarts: recycling under load fails no session (this project's bar)",
                        f"{rec['failed']} failed over {rec.get('restarts', 0)} recycles"
                        + (f"; the cron restart: {cron['failed']} failed over {cron.get('restarts', 0)} restarts" if cron else ""),
                        verdict(rec["failed"] == 0 and rec.get("restarts", 0) > 0,
                                f"{rec['failed']} failed" if rec["failed"] else "no recycle happened")))

    dk = {c.get("contender"): c for c in results.get("docker") or []}
    sd, hd = dk.get("stickyproxy-docker"), dk.get("haproxy-compose")
    if sd is not None:
        if "error" in sd:
            out.append(("docker: stickyproxy over its own containers runs", sd["error"], "missed"))
        else:
            r = _ratio(sd["sessions_per_s"], hd and "error" not in hd and hd["sessions_per_s"])
            pairs = _round_ratios(sd, hd) if hd and "error" not in hd else []
            runs = len(sd.get("round_sessions_per_s") or [])
            over = (f" over all {runs} runs of each (one round alone read {min(pairs):.3f}-{max(pairs):.3f})"
                    if len(pairs) > 1 else "")
            out.append(("docker: sessions/s >= 1.0x HAProxy over the same containers' kind, zero failures (this project's bar)",
                        f"{_rx(r)}{over}, {sd['failed']} failed",
                        verdict(r is not None and r >= 1.0 and sd["failed"] == 0,
                                f"{(1 - (r or 0)) * 100:.1f}%" + (f", {sd['failed']} failed" if sd["failed"] else ""))))

    oh = results.get("overhead") or {}
    sp, h = oh.get(SP, {}), oh.get("haproxy", {})
    if "c64" in sp and "c64" in h:
        r = _ratio(sp["c64"]["rps"], h["c64"]["rps"])
        rc = _ratio(sp["c64"]["cpu_us_per_request"], h["c64"]["cpu_us_per_request"])
        measured = (f"{_rx(r)} (CPU per request {sp['c64']['cpu_us_per_request']} vs "
                    f"{h['c64']['cpu_us_per_request']} us: {_rx(rc)} HAProxy's)")
        pair = sp.get("paired_vs_haproxy")
        if pair:  # run alternately beside HAProxy: the machine's drift cancelled
            measured = (f"x{pair['ratio']:.3f} beside HAProxy (pairs "
                        f"{', '.join(map(str, pair['ratios']))}; CPU per request "
                        f"x{pair['cpu_ratio']:.2f} HAProxy's); best runs minutes apart: {measured}")
            r = pair["ratio"]
        needs = "" if pair else f" (needs {0.5 * h['c64']['rps']:.0f} req/s)"
        out.append(("overhead: req/s at 64 conns >= 0.5x HAProxy", measured,
                    verdict(r >= 0.5, f"{(0.5 - r) / 0.5 * 100:.1f}%{needs}")))
    if sp.get("added_p50_us") is not None:
        a = sp["added_p50_us"]
        out.append(("overhead: added p50 latency at 1 conn <= 0.3 ms", f"{a / 1000:.3f} ms",
                    verdict(a <= 300, f"{(a - 300) / 1000:.3f} ms")))

    sc = results.get("scale") or {}
    rows = [r for r in sc.get("sessions", []) if "error" not in r]
    if rows:
        big = rows[-1]
        out.append((f"state: RSS <= 100 MiB with {big['sessions']:,} sessions", f"{big['rss_mib']} MiB",
                    verdict(big["rss_mib"] <= 100, f"{big['rss_mib'] - 100:.1f} MiB")))
        for label, series in (("sessions", rows), ("backends", [r for r in sc.get("backends", []) if "error" not in r])):
            if len(series) >= 2:
                first, last = series[0], series[-1]
                worst = max(r["cpu_us_per_request"] for r in series)
                growth = worst / first["cpu_us_per_request"] - 1
                ref = _others_growth(series)
                unpaired = (f"{first['cpu_us_per_request']} -> {last['cpu_us_per_request']} us "
                            f"(worst +{growth * 100:.0f}%){_split_growth(series)}")
                paired = [r["paired"]["ratio"] for r in series if "paired" in r]
                if len(paired) == len(series):  # measured beside a reference: the drift cancelled
                    growth = max(paired[1:]) - 1
                    measured = (f"x{paired[-1]:.3f} the reference at {last[label]:,} (worst "
                                f"{growth * 100:+.1f}%; A/A at {first[label]:,}: x{paired[0]:.3f}); "
                                f"unpaired, best runs minutes apart: {unpaired}")
                else:
                    measured = unpaired
                out.append((f"state: CPU/request flat within 10%, {label} {first[label]:,} -> {last[label]:,}",
                            f"{measured}{ref}{_acks(series)}{_decisions(series)}",
                            verdict(growth <= 0.10, f"{(growth - 0.10) * 100:.1f} points")))
    return out


def _decisions(series: list[dict]) -> str:
    """The routing decisions alone over the same points (routing_cost.py), where measured: the
    verdict stays on the whole request; these say how much of a growth is the state's."""
    parts = []
    for key, what in (("pinned_ns", "a command's lookups"), ("placement_ns", "a new session's placement")):
        costs = [r.get("routing", {}).get(key) for r in series]
        if costs and None not in costs:
            parts.append(f"{what} {costs[0]} -> {costs[-1]} ns (worst +{(max(costs) / costs[0] - 1) * 100:.0f}%)")
    return "; decisions alone, in-process: " + ", ".join(parts) if parts else ""


def _acks(series: list[dict]) -> str:
    """Pure ACKs sent to the backends per request, first and last point, where measured."""
    ours = [r.get("upstream_acks_per_request") for r in series]
    if not series or None in ours:
        return ""
    text = f"; pure ACKs to the backends per request {ours[0]:.2f} -> {ours[-1]:.2f}"
    others = []
    for key, name in (("haproxy", "HAProxy"), ("python-floor", "the floor")):
        theirs = [r.get(key, {}).get("upstream_acks_per_request") for r in series]
        if None not in theirs:
            others.append(f"{name} {theirs[0]:.2f} -> {theirs[-1]:.2f}")
    if others:
        text += f" ({', '.join(others)})"
    return text


def _split_growth(series: list[dict]) -> str:
    """The same growth cut into user space (the proxy's code) and kernel (its sockets)."""
    if any("sys_us_per_request" not in r for r in series):
        return ""
    parts = []
    for key, what in (("user_us_per_request", "user space"), ("sys_us_per_request", "kernel")):
        v = [r[key] for r in series]
        parts.append(f"{what} {v[0]} -> {v[-1]} us (worst +{(max(v) / v[0] - 1) * 100:.0f}%)")
    return "; of it " + ", ".join(parts)


def _others_growth(series: list[dict]) -> str:
    """The reference proxies' own growth over the same backend counts, where the run measured it."""
    text = ""
    for key, name in (("haproxy", "HAProxy"), ("python-floor", "the Python floor")):
        ref = [r[key] for r in series if "cpu_us_per_request" in r.get(key, {})]
        if len(ref) < 2 or len(ref) != len(series):
            continue
        worst = max(r["cpu_us_per_request"] for r in ref)
        text += (f"; {name} over the same: {ref[0]['cpu_us_per_request']} -> "
                 f"{ref[-1]['cpu_us_per_request']} us (worst +{(worst / ref[0]['cpu_us_per_request'] - 1) * 100:.0f}%)"
                 f"{_split_growth(ref)}")
    return text


def _peaks(c: dict) -> str:
    p = c.get("live_peak") or {}
    return ",".join(str(p.get(f"b{i}", 0)) for i in range(1, 5))


def _totals(c: dict) -> str:
    p = c.get("placed_total") or {}
    return ",".join(str(p.get(f"b{i}", 0)) for i in range(1, 5))


def markdown(results: dict) -> str:
    m = results["meta"]
    L = [f"# Benchmark results ({m['started_utc'][:10]})", "",
         f"- Date: {m['started_utc']} to {m.get('finished_utc', '?')} (UTC)",
         f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, Python {m['python']}, "
         f"HAProxy {m.get('haproxy', '?')}, nginx {m.get('nginx', '?')}, PhantomJS {m.get('phantomjs', '?')}",
         f"- Command: `{m['command']}`; stickyproxy as committed at {m.get('stickyproxy_commit', '?')} "
         f"(repo HEAD {m.get('commit', '?')})" + (f", extra args `{' '.join(m['sp_args'])}`" if m.get("sp_args") else ""),
         "- Machine load per part (1-min load average before it; CPU cores busy during it, ours and "
         "other processes'): " + "; ".join(
             f"{k}: load {v['loadavg_before']}, others {v['others_cores']} cores (ours {v['ours_cores']}"
             + ("; the containers' processes are outside this run's process tree, so among the "
                "others" if k == "docker" else "") + ")"
             for k, v in m.get("load", {}).items()) + ". Other engineers share this 2-core machine: "
         "compare ratios within this run, never absolute figures across runs.",
         ""]
    cells = _cells(results)
    if cells:
        concs = sorted({k[1] for k in cells})
        names = [n for n in ("stickyproxy", "stickyproxy-cookie", "stickyproxy-w3c", "haproxy-close",
                             "haproxy-recipe", "direct", "python-floor")
                 if any(k[0] == n for k in cells)]
        L += ["## 1. End to end: 4 PhantomJS 2.1.1, real JSON Wire sessions (and W3C through the bridge)", "",
              f"Session = new session, load a local page, title, find elements by CSS, execute `return 1+2`, "
              f"quit. Each cell is {m.get('e2e_rounds', 1)} round(s) of {m.get('e2e_window_s')} s measured after "
              f"{m.get('e2e_warmup_s')} s warm-up, the contenders' order alternating between rounds; PhantomJS "
              "restarted before every round. `xHAProxy` is against the faster HAProxy variant at the "
              "same concurrency; `xdirect` against no proxy. CPU is ms per completed session (psutil, whole window). "
              "Live peaks and totals: the most live sessions each backend b1..b4 held at once, and the sessions "
              "created on each (counted by the client from a response header naming the backend). "
              "`stickyproxy-w3c` runs the same session in Selenium 4's W3C dialect (`/execute/sync`, W3C "
              "element references), which stickyproxy's bridge translates for GhostDriver; no other "
              "contender can serve it (GhostDriver refuses a W3C new session). Spread = "
              "highest peak / mean of the peaks (the issue's measure); worst/fair = highest peak / (C/4), stricter. "
              "`python-floor` is a reference, not a contender: `benchmarks/floor_proxy.py`, a ~150-line raw "
              "uvloop/httptools forwarder with none of stickyproxy's features, the least Python can spend.", "",
              "| C | contender | sessions/s (rounds) | xHAProxy | xdirect | failed | session p50/p99 ms | proxy CPU | PhantomJS CPU | client CPU | live peaks | spread | worst/fair | totals |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for conc in concs:
            _, h = best_haproxy(cells, conc)
            d = cells.get(("direct", conc))
            for n in names:
                c = cells.get((n, conc))
                if c is None:
                    continue
                if "error" in c:
                    L.append(f"| {conc} | {n} | error: {_one(c['error'])} ||||||||||||")
                    continue
                cpu = c["cpu_ms_per_session"]
                sl = c["session_latency"]
                rs = c.get("round_sessions_per_s") or []
                rtxt = f" ({', '.join(f'{x:.0f}' for x in rs)})" if len(rs) > 1 else ""
                L.append(f"| {conc} | {n} | {c['sessions_per_s']:.1f}{rtxt} | "
                         f"{_rx(_ratio(c['sessions_per_s'], h and h['sessions_per_s']))} | "
                         f"{_rx(_ratio(c['sessions_per_s'], d and 'error' not in d and d['sessions_per_s']))} | "
                         f"{_failed(c)} | "
                         f"{_f(sl['p50_ms'])} / {_f(sl['p99_ms'])} | {_f(cpu.get('proxy'), 2)} | "
                         f"{_f(cpu.get('phantomjs'), 1)} | {_f(cpu.get('client'), 2)} | {_peaks(c)} | "
                         f"{_f(c.get('spread'), 2) if conc >= 4 else '-'} | {_f(c.get('worst_vs_fair'), 2)} | {_totals(c)} |")
        L += ["", "Per-command latency, p50 / p99 ms:", "",
              "| C | contender | new session | url | title | elements | execute | quit |",
              "|---|---|---|---|---|---|---|---|"]
        for conc in concs:
            for n in names:
                c = cells.get((n, conc))
                if c is None or "error" in c:
                    continue
                lat = c["latency"]
                L.append(f"| {conc} | {n} | " + " | ".join(
                    f"{_f(lat[k]['p50_ms'], 2)} / {_f(lat[k]['p99_ms'], 1)}"
                    for k in ("new_session", "url", "title", "elements", "execute", "quit")) + " |")
        L.append("")
    pr = results.get("e2e_paired")
    if pr:
        cells = _cells(results)
        L += ["More rounds, for the targets: one run of a cell differs from the next by 10-20%, "
              "whichever the contender (no proxy too) and however close in time, more than the "
              "targets' margins. So stickyproxy, haproxy-close and direct ran "
              f"{m.get('e2e_paired_rounds')} more rounds of {m.get('e2e_paired_window_s')} s each "
              f"(after {m.get('e2e_warmup_s')} s warm-up, PhantomJS restarted before every run), back to "
              "back, the order reversed every other round. The targets' ratios are over all the runs "
              "of each, these and the main table's (sessions over seconds); a round's own ratio, "
              "stickyproxy's sessions/s over the other's in the same round, shows what one run alone "
              "can read. The proxy CPU ratio is the median of the rounds'.", "",
              "| C | stickyproxy sessions/s per round | haproxy-close | direct | x HAProxy, all runs "
              "(each round's) | x direct, all runs (each round's) | proxy CPU x HAProxy | failed |",
              "|---|---|---|---|---|---|---|---|"]
        for row in pr:
            per, conc, window = row["sessions_per_s"], row["concurrency"], row["window_s"]
            sp_all, _ = _pooled(cells.get((SP, conc)), per.get(SP), window)

            def versus(name: str, key: str) -> str:
                other, _ = _pooled(cells.get((name, conc)), per.get(name), window)
                r, rounds = _ratio(sp_all, other), (row.get(key) or {}).get("ratios")
                return f"{_rx(r)}" + (f" ({', '.join(map(str, rounds))})" if rounds else "")
            vh = row.get("vs_haproxy") or {}
            L.append(f"| {conc} | " + " | ".join(
                ", ".join("error" if x is None else f"{x:.0f}" for x in per.get(n, []))
                for n in ("stickyproxy", "haproxy-close", "direct")) + " | "
                + versus("haproxy-close", "vs_haproxy") + " | " + versus("direct", "vs_direct") + " | "
                + (f"x{vh['cpu_ratio']:.2f}" if vh.get("cpu_ratio") else "-") + " | "
                + ", ".join(f"{n} {v}" for n, v in row["failed"].items()) + " |")
        errs = [e for row in pr for e in row.get("errors", [])]
        if errs:
            L += ["", "Extra rounds that failed to run: " + "; ".join(_one(e) for e in errs)]
        L.append("")
    oh = results.get("overhead")
    if oh:
        h64 = (oh.get("haproxy") or {}).get("c64", {}).get("rps")
        hcpu = (oh.get("haproxy") or {}).get("c64", {}).get("cpu_us_per_request")
        L += ["## 2. Proxy overhead in isolation (nginx, 1 worker, fixed WebDriver JSON)", "",
              f"`GET /session/<id>/title` (a pinned session for stickyproxy), wrk {m.get('wrk_s')} s per point. "
              "Added latency = p50 at 1 connection minus nginx direct. CPU is the proxy's (nginx's for direct) per request. "
              "`x HAProxy` compares the best runs of each target, minutes apart; `x HAProxy (paired)`, the "
              "figure the target uses, is the median ratio of req/s over four pairs of runs alternating with "
              "HAProxy (A B B A A B B A, every proxy kept up), which cancels the machine's drift.", "",
              "| target | 1 conn req/s | 1 conn p50 us | added p50 us | 64 conns req/s | x HAProxy | x HAProxy (paired) | 64 conns p50 / p99 us | CPU us/request (64 conns) | CPU x HAProxy | RSS MiB | errors |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for n in ("direct", "haproxy", SP, "python-floor"):
            r = oh.get(n)
            if not r:
                continue
            if "error" in r:
                L.append(f"| {n} | error: {_one(r['error'])} |||||||||||")
                continue
            c1, c64 = r["c1"], r["c64"]
            pair = r.get("paired_vs_haproxy")
            L.append(f"| {n} | {c1['rps']:.0f} | {c1['p50_us']} | {_f(r.get('added_p50_us'))} | {c64['rps']:.0f} | "
                     f"{_rx(_ratio(c64['rps'], h64))} | "
                     f"{'x%.3f (%s)' % (pair['ratio'], ', '.join(map(str, pair['ratios']))) if pair else '-'} | "
                     f"{c64['p50_us']} / {c64['p99_us']} | {c64['cpu_us_per_request']} | "
                     f"{_rx(_ratio(c64['cpu_us_per_request'], hcpu)) if n != 'direct' else '-'} | "
                     f"{_f(r.get('rss_mib'))} | {c1['errors'] + c64['errors']} |")
        L.append("")
    sc = results.get("scale")
    if sc:
        if m.get("scale_paths") == "random":  # (runs before it walked the paths in a stride)
            walk = "picking at random among"
            turns = ("a backend's turns come at random, on average 1,000 requests apart, so the "
                     "slower proxy's waits pass 40 ms more often")
        else:
            walk = "walking"
            turns = ("each connection waits about 1,000 requests between its turns, and the "
                     "slower proxy waits longer")
        L += ["## 3. Scale of the state (stickyproxy, nginx backends)", "",
              f"wrk, 64 connections, {m.get('wrk_s')} s, {walk} up to 10,000 pinned session paths. "
              "Sessions grow on one proxy with 4 backends; each backend count is a fresh proxy with "
              f"{m.get('scale_backend_sessions', 1000):,} sessions (backends from a `--config` TOML file). "
              "Creation rate is 64 concurrent `POST /session` through the proxy. Routing and placement "
              "are the decisions alone, timed in-process on the same state (`routing_cost.py`: route, "
              "session, backend and its health for a command; `Pool.pick` for a new session). "
              "`x reference` is the flatness measure: CPU per request over that of a reference "
              "proxy in the series' first state, kept alive and run alternately beside each point "
              "(A B B A A B B A, the median of the four ratios), because the machine drifts more between "
              "minutes than the 10% target; at the first point it is an A/A check of the method. "
              "`vs first` compares the best runs of points minutes apart.", "",
              "| sessions | backends | req/s | vs first | CPU us/request | vs first | x reference (paired) | p99 us | RSS MiB | creates/s | errors | routing ns | placement ns |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for key in ("sessions", "backends"):
            rows = sc.get(key, [])
            first = next((r for r in rows if "error" not in r), None)
            for r in rows:
                if "error" in r:
                    L.append(f"| {r.get('sessions', '-')} | {r.get('backends', '-')} | error: {_one(r['error'])} ||||||||||")
                    continue
                pair = r.get("paired")
                L.append(f"| {r['sessions']:,} | {r['backends']:,} | {r['rps']:.0f} | {_rx(_ratio(r['rps'], first['rps']))} | "
                         f"{r['cpu_us_per_request']} | {_rx(_ratio(r['cpu_us_per_request'], first['cpu_us_per_request']))} | "
                         f"{'x%.3f (%s)' % (pair['ratio'], ', '.join(map(str, pair['ratios']))) if pair else '-'} | "
                         f"{r['p99_us']} | {r['rss_mib']} | {_f(r.get('creates_per_s'), 0)} | {r['errors'] + r.get('create_errors', 0)} | "
                         f"{_f(r.get('routing', {}).get('pinned_ns'), 0)} | {_f(r.get('routing', {}).get('placement_ns'), 0)} |")
        L.append("")
        ref = [r for r in sc.get("backends", []) if "haproxy" in r]
        if ref:
            L += ["The same backend counts through HAProxy (one thread, `balance uri`: each session "
                  "path hashed to one backend, keep-alive) and through `python-floor` "
                  "(benchmarks/floor_proxy.py, the least a Python sticky forwarder spends; sessions of "
                  "its own, placed round-robin), for reference; `vs first` is each proxy's own growth. "
                  "Pure ACKs: the TCP segments without data each proxy sent to the backends per "
                  "request (the kernel's counters, `ss -ti`, over the proxy's backend connections). A "
                  "backend connection that idles past the kernel's delayed-ACK window (40 ms here) "
                  "between two requests acknowledges the answer with a segment of its own instead of "
                  "inside the next request; with 1,000 backends " + turns + ":", "",
                  "| backends | proxy | req/s | CPU us/request (user + kernel) | vs first | pure ACKs/request | CPU x HAProxy |",
                  "|---|---|---|---|---|---|---|"]
            for r in ref:
                h = r["haproxy"]
                for name, p in (("haproxy", h), ("python-floor", r.get("python-floor")), (SP, r)):
                    if p is None:
                        continue
                    if "error" in p:
                        L.append(f"| {r['backends']:,} | {name} | error: {_one(p['error'])} |||||")
                        continue
                    first = ref[0] if p is r else ref[0].get(name, {})
                    L.append(f"| {r['backends']:,} | {name} | {p['rps']:.0f} | {p['cpu_us_per_request']}{_us_split(p)} | "
                             f"{_rx(_ratio(p['cpu_us_per_request'], first.get('cpu_us_per_request')))} | "
                             f"{_f(p.get('upstream_acks_per_request'), 2)} | "
                             f"{_rx(_ratio(p['cpu_us_per_request'], h.get('cpu_us_per_request')))} |")
            L.append("")
    rs = results.get("restarts")
    if rs:
        base = next((c for c in rs if c.get("contender") == "stickyproxy-norestart" and "error" not in c), None)
        L += ["## 4. Restarts under load: the recipe's cron restart against recycling", "",
              f"The end-to-end workload at C=8 over 4 PhantomJS for one {m.get('restarts_window_s')} s window "
              f"(after {m.get('e2e_warmup_s')} s warm-up). `haproxy-cron`: haproxy-close with health checks "
              "(GET /status every 1 s, fall 2, rise 1); every PhantomJS stopped and started again on its port "
              "at 1/3 and 2/3 of the window, as the recipe's cron job does every 20 minutes. "
              "`stickyproxy-recycle`: stickyproxy's own pool (`--local 4`), each backend drained and replaced "
              "after N sessions. `stickyproxy-norestart`: the same pool never restarted. PhantomJS memory is "
              "sampled every 0.25 s: the sum over live processes (peak, at the window's end) and the largest "
              "single process. Ended sessions are stickyproxy's own count by reason. Sessions/s compare within "
              "one proxy only (HAProxy spends less CPU per session than stickyproxy, part 1); across "
              "proxies, compare failed sessions.", "",
              "| contender | restarts (policy) | sessions/s | x the same pool never restarted | failed | session p50/p99 ms | "
              "PhantomJS RSS MiB: peak / end / largest one | sessions ended (stickyproxy) |",
              "|---|---|---|---|---|---|---|---|"]
        def restart_row(c: dict) -> str:
            sl = c["session_latency"]
            ended = ", ".join(f"{k} {v}" for k, v in (c.get("sessions_ended") or {}).items()) or "-"
            return (f"| {c['contender']} | {c.get('restarts', 0)} ({c.get('restart_policy', '-')}) | "
                    f"{c['sessions_per_s']:.1f} | "
                    f"{_rx(_ratio(c['sessions_per_s'], base and base['sessions_per_s'])) if c['contender'].startswith(SP) else '-'} | "
                    f"{_failed(c)} | {_f(sl['p50_ms'])} / {_f(sl['p99_ms'])} | {c['phantom_rss_mib_peak']} / "
                    f"{c['phantom_rss_mib_end']} / {c.get('phantom_rss_mib_largest', '-')} | {ended} |")

        L += _contender_rows(rs, 8, restart_row) + [""]
    dk = results.get("docker")
    if dk:
        h = next((c for c in dk if c.get("contender") == "haproxy-compose" and "error" not in c), None)
        L += ["## 5. The recipe as deployed: 4 PhantomJS containers", "",
              f"Memory-capped containers (1 GiB, swap alike, restart always, host networking on loopback "
              f"ports) of one locally built PhantomJS image. `haproxy-compose`: 4 containers started as "
              f"docker-compose would, behind haproxy-close with health checks, clients sending the Cookie. "
              f"`stickyproxy-docker`: stickyproxy starts and owns its 4 (`--docker 4 --mem-limit 1g`), "
              f"plain clients. The end-to-end workload at C=8, "
              f"{m.get('docker_rounds', m.get('e2e_rounds', 1))} round(s) of "
              f"{m.get('docker_window_s')} s each, the order alternating; sessions/s is over all of "
              f"them, each round's in brackets. "
              "CPU is ms per session: the proxy's, and the containers' processes' (psutil on their PIDs).", "",
              "| contender | sessions/s | xHAProxy | failed | session p50/p99 ms | proxy CPU | containers CPU | "
              "live peaks | spread |",
              "|---|---|---|---|---|---|---|---|---|"]
        def container_row(c: dict) -> str:
            sl, cpu = c["session_latency"], c["cpu_ms_per_session"]
            rs = c.get("round_sessions_per_s") or []
            rtxt = f" ({', '.join(f'{x:.0f}' for x in rs)})" if len(rs) > 1 else ""
            return (f"| {c['contender']} | {c['sessions_per_s']:.1f}{rtxt} | "
                    f"{_rx(_ratio(c['sessions_per_s'], h and h['sessions_per_s']))} | {_failed(c)} | "
                    f"{_f(sl['p50_ms'])} / {_f(sl['p99_ms'])} | {_f(cpu.get('proxy'), 2)} | "
                    f"{_f(cpu.get('containers'), 1)} | {_peaks(c)} | {_f(c.get('spread'), 2)} |")

        L += _contender_rows(dk, 9, container_row) + [""]
    t = targets(results)
    if t:
        L += ["## Targets (issue 3's; rows marked \"this project's bar\" are ours)", "", "| target | measured | verdict |", "|---|---|---|"]
        L += [f"| {a} | {b} | {c} |" for a, b, c in t]
        L.append("")
        if any(c.startswith("missed") for _, _, c in t):
            L += ["Where the time goes, for the targets missed: py-spy profiles in "
                  "`benchmarks/profiles/` (`e2e.txt`: the proxy's samples under the end-to-end load, "
                  "most inside its socket writes; `backends.txt`: each function's CPU per request "
                  "over 4 and over 1,000 backends, and the growth), made by `python -m benchmarks.profile "
                  "e2e|backends` apart from this run (each file's first line names the code it "
                  "profiled). README.md \"Speed\" explains the misses.", ""]
    return "\n".join(L)


def _round_ratios(a: dict, b: dict) -> list[float]:
    """a's sessions/s over b's, round by round (the rounds ran back to back, in turn)."""
    return [x / y for x, y in zip(a.get("round_sessions_per_s") or [], b.get("round_sessions_per_s") or [])
            if y]


def _us_split(m: dict) -> str:
    """ (user + kernel) after a CPU figure, where the run measured the split."""
    if "sys_us_per_request" not in m:
        return ""
    return f" ({m['user_us_per_request']} + {m['sys_us_per_request']})"


def _contender_rows(cells: list[dict], columns: int, render) -> list[str]:
    """One table row per contender: `render`'s, or the error it ran into across the row."""
    return [f"| {c['contender']} | error: {_one(c['error'])} |" + "|" * (columns - 2) if "error" in c
            else render(c) for c in cells]


def _failed(c: dict) -> str:
    """Failed sessions, with why when any failed."""
    why = ", ".join(f"{k}: {v}" for k, v in c["errors"].items())
    return f"{c['failed']} ({why})" if why else str(c["failed"])


def _one(err: str) -> str:
    """An error on one table line."""
    return err.replace("|", "/").replace("\n", " ")[:160]
