"""Part 5: the recipe as deployed, in containers. 4 memory-capped PhantomJS containers (1 GiB,
swap capped alike, `restart: always`, host networking on loopback ports, as docker-compose would
start them) behind HAProxy, against stickyproxy starting and owning its 4 containers itself
(`--docker 4`, same image, cap and restart policy). Same end-to-end workload as part 1 at C=8,
one window each.

The Docker engine and the PhantomJS image come from tests/dockerengine.py (the engine running
here, else a private dockerd it starts and stops; the image is `docker import`ed from this
machine's PhantomJS binary and its libraries: no registry). Every container this part starts
carries the test label and is removed at the end; stickyproxy removes its own
(`--docker-cleanup`).

Reported: sessions/s, failures, session latency, CPU per session of the proxy and of the
containers' processes (psutil on each container's PIDs), and live-session spread. Like part 1,
rounds alternate the contenders' order and are pooled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil

from .e2e import N_BACKENDS, alternate, wait_all_up
from .procs import REPO, Proc, Stack, fetch_json, free_ports, wait_http

CONTENDERS = ("haproxy-compose", "stickyproxy-docker")
CONCURRENCY = 8
MEM_LIMIT = "1g"


def _container_procs(client, filters: dict) -> list[psutil.Process]:
    """The host processes of the running containers that match (PhantomJS and its init)."""
    out = []
    for c in client.containers.list(filters=filters):
        pid = (c.attrs.get("State") or {}).get("Pid")
        if not pid:
            continue
        try:
            top = psutil.Process(pid)
            out += [top] + top.children(recursive=True)
        except psutil.Error:
            pass
    return out


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def run_cell(stack: Stack, client, engine_url: str, image: str, label: str, contender: str, *, page_url: str,
             warmup: float, window: float) -> dict:
    spec = {"concurrency": CONCURRENCY, "warmup": warmup, "duration": window, "page_url": page_url,
            "max_sessions_per_worker": int(window * 40 + 200)}
    proxy: Proc | None = None
    started = []
    stats_port = None
    nonce = f"{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    try:
        if contender == "haproxy-compose":
            ports = free_ports(N_BACKENDS)
            for i, port in enumerate(ports):
                started.append(client.containers.run(
                    image, ["phantomjs", f"--webdriver=127.0.0.1:{port}", "--webdriver-loglevel=WARN"],
                    name=f"sp-bench-{nonce}-{i + 1}", detach=True, network_mode="host",
                    mem_limit=MEM_LIMIT, memswap_limit=MEM_LIMIT, restart_policy={"Name": "always"},
                    labels={label: "bench", "sp-bench": nonce}))
            for port in ports:
                wait_http(port, "/status", 60)
            proxy, port = stack.start_haproxy("haproxy-compose", ports, mode="close", checks=True)
            spec["backend_header"] = "X-Served-By"
            spec["cookie"] = True
            filters = {"label": f"sp-bench={nonce}"}
        else:
            pool = f"bench-{nonce}"
            proxy, port, stats_port = stack.start_stickyproxy([], [
                "--docker", str(N_BACKENDS), "--image", image, "--pool", pool, "--docker-host", engine_url,
                "--mem-limit", MEM_LIMIT, "--docker-cleanup"])
            st = wait_all_up(stats_port, N_BACKENDS, timeout=120)
            spec["backend_header"] = "X-Stickyproxy-Backend"
            spec["backend_labels"] = {b["id"]: f"b{i + 1}" for i, b in enumerate(st["backends"])}
            filters = {"label": f"stickyproxy.pool={pool}"}
        spec["targets"] = [["127.0.0.1", port, contender]]
        procs = _container_procs(client, filters)
        if len({p.pid for p in procs}) < N_BACKENDS:
            raise RuntimeError(f"found {len(procs)} container processes, want {N_BACKENDS}")
        client_proc = subprocess.Popen([sys.executable, "-m", "benchmarks.workload", json.dumps(spec)],
                                       cwd=str(REPO), stdout=subprocess.PIPE, text=True)
        cpu0 = cpu1 = None
        result = None
        for line in client_proc.stdout:
            line = line.strip()
            if line == "WINDOW_START":
                cpu0 = (proxy.cpu(), _cpu(procs))
            elif line == "WINDOW_END":
                cpu1 = (proxy.cpu(), _cpu(procs))
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
        client_proc.wait(30)
        if result is None or cpu0 is None or cpu1 is None:
            raise RuntimeError(f"workload client failed (rc={client_proc.returncode})")
        result["cpu_s"] = {"proxy": round(cpu1[0] - cpu0[0], 4), "containers": round(cpu1[1] - cpu0[1], 4)}
        result["cpu_ms_per_session"] = {k: round(v * 1000 / max(1, result["sessions"]), 3)
                                        for k, v in result["cpu_s"].items()}
        if stats_port:
            result["sessions_ended"] = {k: v for k, v in fetch_json(stats_port, "/stats")["sessions_ended"].items()
                                        if v}
        return result  # the shape of part 1's cells, so e2e.merge pools the rounds (sessions_ended: the last round's)
    finally:
        if proxy is not None:
            stack.stop(proxy, timeout=60)  # --docker-cleanup: stickyproxy removes its containers
        for c in started:
            try:
                c.remove(force=True)
            except Exception:  # already gone
                pass


def run(stack: Stack, *, page_url: str, warmup: float, window: float, rounds: int = 2,
        contenders=CONTENDERS, log=print) -> list[dict]:
    """`rounds` rounds over the contenders in alternating order (as part 1), merged per contender."""
    sys.path.insert(0, str(REPO))  # tests/dockerengine.py: the engine and the image, as the tests get them
    from tests import dockerengine

    cells = []
    try:
        with dockerengine.docker_engine_context() as engine:
            client = engine.client()
            t0 = time.monotonic()
            image = dockerengine.build_phantomjs_image(client)
            log(f"[docker] engine {engine.base_url}, image {image} ready in {time.monotonic() - t0:.1f}s")
            cells = alternate(contenders, rounds, "[docker]", log, lambda name: run_cell(
                stack, client, engine.base_url, image, dockerengine.TEST_LABEL, name, page_url=page_url,
                warmup=warmup, window=window), failed={"concurrency": CONCURRENCY})
            client.close()
    except dockerengine.EngineUnavailable as e:
        cells = [{"contender": n, "error": f"no Docker engine: {e}"} for n in contenders]
        log(f"[docker] no Docker engine: {e}")
    return cells
