"""One command for the whole benchmark: `python -m benchmarks.run [--quick]` (see README.md).

Runs the parts side by side on loopback (end to end with PhantomJS, overhead against nginx,
scale of the state, restarts under load, the recipe in containers), writes benchmarks/out/<timestamp>.json and .md, and on a full run replaces
benchmarks/RESULTS.md with the new table. Everything it starts is stopped by PID on the way out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run.py` works too
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from benchmarks import containers, e2e, overhead, report, restarts, scale  # noqa: E402
from benchmarks.procs import REPO, MachineShare, Stack  # noqa: E402

HERE = Path(__file__).resolve().parent
PARTS = ("e2e", "overhead", "scale", "restarts", "docker")
QUICK = ("stickyproxy", "haproxy-close", "haproxy-recipe", "direct")


def _sh(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (p.stdout + p.stderr).strip()
    except Exception as e:  # a missing tool is reported, not fatal
        return f"? ({e})"


def machine(stack: Stack | None) -> dict:
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    meta = {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(),
            "haproxy": _sh(["/usr/sbin/haproxy", "-v"]).split("\n")[0].replace("HAProxy version ", "").split(" ")[0],
            "nginx": _sh(["/usr/sbin/nginx", "-v"]).split("/")[-1],
            "commit": _sh(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])}
    if stack is not None:
        meta["phantomjs"] = _sh([stack.phantom_bin(), "--version"])
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 7 minutes: shorter cells, C=8 and 16, up to 10,000 sessions")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {','.join(PARTS)}")
    ap.add_argument("--contenders", default=None,
                    help=f"end-to-end contenders (default {','.join(e2e.CONTENDERS)}; quick: {','.join(QUICK)})")
    ap.add_argument("--concurrency", default=None, help="comma list (default 1,8,16; quick 8,16)")
    ap.add_argument("--window", type=float, default=None, help="seconds measured per end-to-end round (8; quick 5)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="end-to-end rounds per cell, alternating the contenders' order (2; quick 1)")
    ap.add_argument("--paired-rounds", type=int, default=None,
                    help="more rounds of stickyproxy, HAProxy's best and no proxy back to back at C=8 "
                         "and 16, pooled with the main table's for the targets' ratios (4; quick 2; 0 skips)")
    ap.add_argument("--stickyproxy-ref", default="HEAD",
                    help="git ref of stickyproxy to run, snapshotted by git archive (default HEAD); "
                         "'worktree' runs the working tree as it is")
    ap.add_argument("--stickyproxy-cmd", default=None,
                    help="command that runs stickyproxy (default: this Python -m stickyproxy)")
    ap.add_argument("--sp-arg", action="append", default=[], help="extra argument for stickyproxy serve (repeatable)")
    ap.add_argument("--results", action=argparse.BooleanOptionalAction, default=None,
                    help="replace benchmarks/RESULTS.md (default: on for full runs, off for --quick)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    a = ap.parse_args(argv)

    parts = [p for p in a.parts.split(",") if p]
    quick = a.quick
    conc = [int(x) for x in (a.concurrency or ("8,16" if quick else "1,8,16")).split(",")]
    window = a.window or (5.0 if quick else 8.0)
    rounds = a.rounds or (1 if quick else 2)
    warmup = 1.0 if quick else 2.0
    paired_rounds = a.paired_rounds if a.paired_rounds is not None else (2 if quick else 4)
    paired_window = 4.0 if quick else 6.0
    wrk_s = 2.0 if quick else 5.0
    restart_window = 12.0 if quick else 30.0
    docker_window = 6.0 if quick else 10.0
    # as many runs of each as part 1's targets pool: one 10 s run differs from the next by
    # 10-20% whoever runs it (round ratios 0.82-1.00x in one run with 2 rounds)
    docker_rounds = 2 if quick else 6
    session_points = (10, 1_000, 10_000) if quick else (10, 1_000, 100_000)
    write_results = (not quick) if a.results is None else a.results

    stack = Stack(keep_tmp=a.keep_tmp)
    if a.stickyproxy_cmd:
        stack.sp_cmd = shlex.split(a.stickyproxy_cmd)
    sp_commit = "worktree" if a.stickyproxy_ref == "worktree" else stack.use_ref(a.stickyproxy_ref)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.time()
    started = dt.datetime.now(dt.timezone.utc)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    res: dict = {"meta": {}}
    cmd = "python -m benchmarks.run" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    load: dict = {}

    def log(msg: str) -> None:
        print(f"{time.time() - t0:6.1f}s {msg}", flush=True)

    try:
        res["meta"] = {**machine(stack), "started_utc": started.strftime("%Y-%m-%d %H:%M:%S"),
                       "command": cmd.strip(), "quick": quick, "e2e_window_s": window, "e2e_rounds": rounds,
                       "e2e_warmup_s": warmup, "e2e_paired_rounds": paired_rounds,
                       "e2e_paired_window_s": paired_window, "wrk_s": wrk_s, "restarts_window_s": restart_window,
                       "docker_window_s": docker_window, "docker_rounds": docker_rounds,
                       "scale_backend_sessions": 1_000,
                       "scale_paths": "random",
                       "sp_args": a.sp_arg, "stickyproxy_commit": sp_commit}
        log(f"load {os.getloadavg()[0]:.2f}; temp dir {stack.tmp}")
        if {"e2e", "restarts", "docker"} & set(parts):  # the page PhantomJS loads (stopped with the rest)
            _, page_port = stack.start_pageserver()
            page_url = f"http://127.0.0.1:{page_port}/page.html"
        if "e2e" in parts:
            before, share = os.getloadavg()[0], MachineShare()
            res["e2e"] = e2e.run(stack, page_url=page_url,
                                 concurrencies=conc, warmup=warmup, duration=window,
                                 contenders=[c for c in (a.contenders or ",".join(QUICK if quick else e2e.CONTENDERS)).split(",") if c],
                                 sp_extra=a.sp_arg, rounds=rounds, log=log)
            target_concs = [c for c in conc if c in (8, 16)]  # where the targets are set
            if paired_rounds and target_concs:
                res["e2e_paired"] = e2e.paired(stack, page_url=page_url, concurrencies=target_concs,
                                               warmup=warmup, duration=paired_window,
                                               sp_extra=a.sp_arg, rounds=paired_rounds, log=log)
            load["e2e"] = {"loadavg_before": round(before, 2), **share.result()}
        if "overhead" in parts:
            before, share = os.getloadavg()[0], MachineShare()
            res["overhead"] = overhead.run(stack, duration=wrk_s, sp_extra=a.sp_arg, log=log,
                                           repeat=1 if quick else 2)
            load["overhead"] = {"loadavg_before": round(before, 2), **share.result()}
        if "scale" in parts:
            before, share = os.getloadavg()[0], MachineShare()
            res["scale"] = scale.run(stack, duration=wrk_s, session_points=session_points,
                                     sp_extra=a.sp_arg, log=log)
            load["scale"] = {"loadavg_before": round(before, 2), **share.result()}
        if "restarts" in parts:
            before, share = os.getloadavg()[0], MachineShare()
            res["restarts"] = restarts.run(stack, page_url=page_url, warmup=warmup, window=restart_window, log=log)
            load["restarts"] = {"loadavg_before": round(before, 2), **share.result()}
        if "docker" in parts:
            before, share = os.getloadavg()[0], MachineShare()
            res["docker"] = containers.run(stack, page_url=page_url, warmup=warmup, window=docker_window,
                                           rounds=docker_rounds, log=log)
            load["docker"] = {"loadavg_before": round(before, 2), **share.result()}
    except KeyboardInterrupt:
        log("interrupted: stopping everything started")
        res["meta"]["interrupted"] = True
    finally:
        stack.stop_all()
    res["meta"]["load"] = load
    res["meta"]["finished_utc"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    res["meta"]["elapsed_s"] = round(time.time() - t0, 1)

    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / f"{stamp}.json").write_text(json.dumps(res, indent=1))
    md = report.markdown(res)
    (out / f"{stamp}.md").write_text(md)
    print(md)
    log(f"wrote {out / (stamp + '.json')} and .md")
    if write_results and not res["meta"].get("interrupted"):
        # The JSON beside the table lets the table be checked (and re-rendered) from the numbers.
        (HERE / "RESULTS.json").write_text(json.dumps(res, indent=1) + "\n")
        (HERE / "RESULTS.md").write_text(md)
        log("replaced benchmarks/RESULTS.md and RESULTS.json")
    return 1 if res["meta"].get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
