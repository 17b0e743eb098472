"""Where stickyproxy's time goes: py-spy on the proxy while a bounded load runs.

    python -m benchmarks.profile overhead [--seconds 10]   # wrk, 64 conns, pinned /title on nginx
    python -m benchmarks.profile e2e [--seconds 15]        # 4 PhantomJS, C=16 sessions
    python -m benchmarks.profile newsession [--seconds 10] # POST /session + DELETE against nginx
    python -m benchmarks.profile backends [--seconds 10]   # part 3's commands over 4, then 1,000
                                                           # backends: where the growth goes

Needs py-spy (`pip install py-spy`; a profiling tool, not a dependency of stickyproxy). Writes
benchmarks/out/profile-<scenario>-<time>.svg (flame graph) and .txt: the share of samples by
function, self and inclusive, from py-spy's collapsed stacks. `backends` writes the .txt and
each count's raw samples (.collapsed), no flame graph. Its .txt has each function's self time in microseconds of the proxy's CPU per request (its share of the
samples times the CPU per request measured over the same seconds), over 4 backends and over
1,000 (`--backends`), and the difference. A socket call is timed inside the Python function that
makes it (`Outbox.write` is mostly `send`), so the kernel's part of a growth shows there.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from .loadgen import create_sessions, wrk_run
from .procs import Stack

OUT = Path(__file__).resolve().parent / "out"
GIL: list[str] = []  # ["--gil"]: only samples holding the GIL (excludes uvloop waiting in epoll)


def summarize(collapsed: str, top: int = 40) -> str:
    self_c: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = [re.sub(r" \((?:/[^)]*/)?([^/)]+)\)", r" (\1)", f) for f in stack.split(";")]
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "no samples\n"
    areas: collections.Counter = collections.Counter()
    for f, c in self_c.items():
        areas[_area(f)] += c
    lines = [f"{total} samples (holding the GIL unless --all-samples)", "", "BY AREA (self time)"]
    lines += [f"{c * 100 / total:6.1f}%  {a}" for a, c in areas.most_common()]
    lines += ["", "SELF share  function (file:line)"]
    lines += [f"{c * 100 / total:6.1f}%  {f}" for f, c in self_c.most_common(top)]
    lines += ["", "INCLUSIVE share  function (file:line)"]
    lines += [f"{c * 100 / total:6.1f}%  {f}" for f, c in incl.most_common(top)]
    return "\n".join(lines) + "\n"


SYSCALL_FRAMES = ("_Connection.send ", "StreamWriter._writelines ", "Runner.run ", "Upstream._open ",
                  "Outbox.write ", "Outbox.flush ")  # (outbox.py's two call transport.write)


def _area(frame: str) -> str:
    """Which layer a leaf frame belongs to (frames that mostly wrap one syscall count apart)."""
    if frame.startswith(SYSCALL_FRAMES) or frame.startswith("socket."):
        return "socket syscalls and the event loop (transport.write, connect, uvloop run)"
    for key, area in (("(aiohttp/", "aiohttp server: request objects, routing, response building"),
                      ("(yarl/", "aiohttp server: request objects, routing, response building"),
                      ("(multidict/", "aiohttp server: request objects, routing, response building"),
                      ("(asyncio/", "asyncio primitives (timeout, Semaphore, futures, tasks)"),
                      ("(logging/", "logging"), ("(json/", "json"), ("(stickyproxy/", "stickyproxy code")):
        if key in frame:
            return area
    return "other: " + frame.split(" (")[-1].rstrip(")")


def _pyspy(pid: int, seconds: float, out: Path, fmt: str) -> subprocess.Popen:
    exe = shutil.which("py-spy")
    if not exe:
        sys.exit("py-spy is not installed: pip install py-spy")
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                             "--rate", "250", "--nonblocking", *GIL, "--format", fmt, "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def self_shares(collapsed: str) -> tuple[collections.Counter, int]:
    """Self samples per function (absolute directories dropped, as `summarize` does), and the
    total."""
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            leaf = re.sub(r" \((?:/[^)]*/)?([^/)]+)\)", r" (\1)", stack.split(";")[-1])
            counts[leaf] += int(n)
            total += int(n)
    return counts, total


def per_request(collapsed: str, cpu_us_per_request: float) -> dict[str, float]:
    """Each function's self time as microseconds of CPU per request."""
    counts, total = self_shares(collapsed)
    return {f: n / total * cpu_us_per_request for f, n in counts.items()} if total else {}


def growth_table(small: dict, large: dict, labels: tuple[str, str], top: int = 25) -> str:
    """Functions by how much their CPU per request grew from `small` to `large`."""
    names = sorted(set(small) | set(large), key=lambda f: large.get(f, 0) - small.get(f, 0),
                   reverse=True)
    lines = [f"{'growth':>8} {labels[0]:>10} {labels[1]:>10}  function (self time, us per request)"]
    for f in names[:top]:
        a, b = small.get(f, 0.0), large.get(f, 0.0)
        lines.append(f"{b - a:+8.2f} {a:10.2f} {b:10.2f}  {f}")
    rest = sum(large.get(f, 0) - small.get(f, 0) for f in names[top:])
    lines.append(f"{rest:+8.2f} {'':>10} {'':>10}  (all the others)")
    return "\n".join(lines) + "\n"


def _backends(stack: Stack, a, base: Path) -> str:
    """Part 3's load (wrk, 64 connections, random picks over 1,000 pinned sessions' paths) on a
    fresh stickyproxy over 4 nginx ports, then one over `--backends` ports, each profiled."""
    from . import scale
    from .e2e import wait_all_up

    if a.backends <= 4:
        sys.exit("--backends: more than 4 (the first profile is over 4)")
    nginx, nports = stack.start_nginx(a.backends)
    out, rows = [], {}
    for nb in (4, a.backends):
        proxy, port, sport = stack.start_stickyproxy(nports[:nb], ["--drain-timeout", "1s",
                                                                   *a.sp_arg], config_file=True)
        try:
            wait_all_up(sport, nb, timeout=60)
            ids, errors = create_sessions("127.0.0.1", port, 1_000, concurrency=64)
            if errors:
                sys.exit(f"POST /session failed: {sorted(set(errors))[:2]}")
            paths = scale._paths(ids)
            scale._warm(stack, port, paths)
            result: dict = {}
            load = threading.Thread(target=lambda: result.update(wrk_run(
                stack.tmp, f"http://127.0.0.1:{port}/", connections=64,
                duration=a.seconds + 3, paths=paths)), daemon=True)
            load.start()
            time.sleep(1)
            raw = base.with_name(f"{base.name}-{nb}.collapsed")
            cpu0, sys0, t0 = proxy.cpu(), proxy.cpu(system_only=True), time.monotonic()
            spy = _pyspy(proxy.pid, a.seconds, raw, "raw")
            if spy.wait(a.seconds + 60) != 0 or not raw.exists():
                sys.exit(f"py-spy failed: {spy.stderr.read().decode(errors='replace')[-300:]}")
            cpu, kernel = proxy.cpu() - cpu0, proxy.cpu(system_only=True) - sys0
            seconds = time.monotonic() - t0
            load.join(a.seconds + 60)
            if not result.get("rps") or result.get("errors"):
                sys.exit(f"wrk over {nb} backends: {result.get('errors', 'no result')} errors")
            requests = result["rps"] * seconds
            cpu_us = cpu * 1e6 / requests
            collapsed = re.sub(r":\d+\)", ")", raw.read_text())
            rows[nb] = per_request(collapsed, cpu_us)
            out.append(f"{nb:,} backends: {result['rps']:.0f} req/s, {cpu_us:.2f} us of CPU per "
                       f"request ({kernel * 1e6 / requests:.2f} in the kernel)")
        finally:
            stack.stop(proxy, timeout=60)
    stack.stop(nginx)
    return ("scenario backends: wrk at 64 connections over 1,000 pinned sessions, random picks\n"
            + "\n".join(out) + "\n\n"
            + growth_table(rows[4], rows[a.backends], ("4", f"{a.backends:,}")))


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    ap.add_argument("scenario", choices=("overhead", "e2e", "newsession", "backends"))
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--backends", type=int, default=1_000, help="backends: the larger count")
    ap.add_argument("--sp-arg", action="append", default=[],
                    help="backends: extra argument for stickyproxy serve (repeatable)")
    ap.add_argument("--all-samples", action="store_true",
                    help="count samples not holding the GIL too (default: --gil, CPU in Python only)")
    ap.add_argument("--stickyproxy-ref", default="HEAD",
                    help="git ref to profile (snapshot by git archive), or 'worktree'")
    ap.add_argument("--function-lines", action="store_true", help="keep line numbers (default: per function)")
    a = ap.parse_args()
    if not a.all_samples:
        GIL.append("--gil")
    OUT.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = OUT / f"profile-{a.scenario}-{stamp}"
    stack = Stack()
    if a.stickyproxy_ref != "worktree":
        made = f"stickyproxy at {stack.use_ref(a.stickyproxy_ref)}"
        print(made)
    else:
        made = "stickyproxy from the working tree"
    made += f", {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, `python -m benchmarks.profile {' '.join(sys.argv[1:])}`\n"
    try:
        if a.scenario == "backends":
            text = made + _backends(stack, a, base)
            base.with_suffix(".txt").write_text(text)
            print(text)
            print(f"wrote {base}.txt")
            return 0
        if a.scenario in ("overhead", "newsession"):
            nginx, (nport,) = stack.start_nginx(1)
            proxy, port, sport = stack.start_stickyproxy([nport])
            from . import e2e

            e2e.wait_all_up(sport, 1)  # a session cannot be created before its backend is up
            ids, errors = create_sessions("127.0.0.1", port, 1, 1)
            if not ids:
                sys.exit(f"could not create a session: {errors[:1]}")
            time.sleep(0.5)
            args = dict(connections=64, duration=a.seconds + 2, lua="")
            url = f"http://127.0.0.1:{port}/session/{ids[0]}/title"
            if a.scenario == "newsession":
                url = f"http://127.0.0.1:{port}/session"
                args["lua"] = ('wrk.method = "POST"\nwrk.body = \'{"desiredCapabilities":{}}\'\n'
                               'wrk.headers["Content-Type"] = "application/json"\n')
            load = threading.Thread(target=lambda: wrk_run(stack.tmp, url, **args), daemon=True)
            load.start()
            time.sleep(1)
        else:
            from . import e2e

            page, page_port = stack.start_pageserver()
            phantoms = stack.start_phantoms(4)
            ports = [p for _, p in phantoms]
            proxy, port, sport = stack.start_stickyproxy(ports)
            e2e.wait_all_up(sport, 4)
            spec = {"targets": [["127.0.0.1", port, "sp"]], "concurrency": 16, "warmup": 1,
                    "duration": a.seconds + 2, "page_url": f"http://127.0.0.1:{page_port}/page.html"}
            load = threading.Thread(target=lambda: subprocess.run(
                [sys.executable, "-m", "benchmarks.workload", json.dumps(spec)], capture_output=True), daemon=True)
            load.start()
            time.sleep(2)
        cpu0 = proxy.cpu()
        t0 = time.monotonic()
        svg = _pyspy(proxy.pid, a.seconds, base.with_suffix(".svg"), "flamegraph")
        raw = _pyspy(proxy.pid, a.seconds, base.with_suffix(".collapsed"), "raw")
        for p in (svg, raw):
            p.wait(a.seconds + 60)
        busy = (proxy.cpu() - cpu0) / (time.monotonic() - t0)
        load.join(a.seconds + 60)
        collapsed = base.with_suffix(".collapsed").read_text()
        if not a.function_lines:
            collapsed = re.sub(r":\d+\)", ")", collapsed)
        text = made + f"scenario {a.scenario}, proxy busy {busy * 100:.0f}% of one core\n" + summarize(collapsed)
        base.with_suffix(".txt").write_text(text)
        print(text)
        print(f"wrote {base}.svg / .txt / .collapsed")
    finally:
        stack.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
