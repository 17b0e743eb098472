"""What isolating a local PhantomJS costs per request (issue 10), measured on one machine.

Compares, through the proxy's own client (`upstream.Upstream`), sequential requests to:
  direct    PhantomJS on the host network (the unisolated baseline; TCP_QUICKACK re-armed)
  relay     PhantomJS in its own network namespace behind `isolation`'s Unix-socket relay
            (variants: without TCP_QUICKACK on the relay's inner leg; asyncio instead of uvloop)
  setns     root only: the client's sockets are created inside the namespace from a thread that
            setns(2)-es there and back, so there is no relay hop

Prints mean/p50/p99 latency and CPU per request of the client and of the relay process.
Traffic goes only to 127.0.0.1 (on the host or inside our own namespaces).

    python -m benchmarks.isolation_cost [-n 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from stickyproxy import isolation
from stickyproxy.providers.processes import find_phantomjs, free_port
from stickyproxy.upstream import NotConnected, Upstream

from .procs import browser_env

_TICK = os.sysconf("SC_CLK_TCK")
RELAY = ("import sys\n{patch}\nfrom stickyproxy.isolation import main\n"
         "sys.exit(main(sys.argv[1:]))")


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


class SetnsUpstream(Upstream):
    """Opens each connection with a socket created inside the target network namespace."""

    def __init__(self, url: str, limit: int, netns: str) -> None:
        super().__init__(url, limit)
        self.netns = netns

    def _socket_in_ns(self) -> socket.socket:
        libc = ctypes.CDLL(None, use_errno=True)
        box: list = []

        def work() -> None:  # a thread of its own: setns changes only the calling thread
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            target = os.open(self.netns, os.O_RDONLY)
            try:
                if libc.setns(target, isolation.CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
                try:
                    box.append(socket.socket())
                finally:
                    libc.setns(home, isolation.CLONE_NEWNET)
            finally:
                os.close(home)
                os.close(target)

        t = threading.Thread(target=work)
        t.start()
        t.join()
        return box[0]

    async def _open(self, timeout: float):
        from stickyproxy.upstream import _Connection
        loop = asyncio.get_running_loop()
        sock = self._socket_in_ns()
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (self.host, self.port))
        except OSError as exc:
            sock.close()
            raise NotConnected(str(exc)) from None
        _, conn = await loop.create_connection(_Connection, sock=sock)
        self.opened_total += 1
        return conn


async def start_relay(phantomjs: str, rundir: str, name: str, patch: str, log: int):
    port = free_port()
    path = isolation.socket_path(rundir, name)
    argv = [phantomjs, f"--webdriver=127.0.0.1:{port}", "--webdriver-loglevel=WARN"]
    cmd = [sys.executable, "-c", RELAY.format(patch=patch), "relay", "--flags",
           str(isolation.probe().flags), "--socket", path, "--port", str(port), "--", *argv]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=log,
        env=isolation._relay_env(browser_env(OPENSSL_CONF="/dev/null")))
    pid = 0
    while True:
        word, rest = isolation.parse_report(await proc.stdout.readline())
        if word == "pid":
            pid = int(rest)
        elif word == "note":
            continue
        elif word == "ready":
            return proc, pid, port, path  # pid: PhantomJS; its parent: the relay's data path
        else:
            raise RuntimeError(f"relay: {word} {rest}")


async def _get(up: Upstream, target: str, fresh: bool):
    if fresh:
        up.close()  # no idle connection left: the request opens its own
    return await up.request("GET", target, [], None, timeout=10)


async def measure(up: Upstream, n: int, fresh: bool, cpu_pid: int | None) -> dict:
    status, body = 0, b""
    resp = await up.request("POST", "/session", [(b"Content-Type", b"application/json")],
                            json.dumps({"desiredCapabilities": {}}).encode(), timeout=30)
    session = json.loads(await resp.read())["sessionId"]
    resp.release()
    targets = ["/status", f"/session/{session}/url"]
    out = {}
    for target in targets:
        for _ in range(50):  # warm up
            resp = await _get(up, target, fresh)
            await resp.read()
            resp.release()
        lat = []
        c0, r0 = time.process_time(), cpu_of(cpu_pid) if cpu_pid else 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            resp = await _get(up, target, fresh)
            body = await resp.read()
            status = resp.status
            resp.release()
            lat.append(time.perf_counter() - t0)
        c1, r1 = time.process_time(), cpu_of(cpu_pid) if cpu_pid else 0.0
        assert status == 200, (status, body)
        lat.sort()
        out["/status" if target == "/status" else "/session/:id/url"] = {
            "mean_ms": statistics.fmean(lat) * 1e3, "p50_ms": lat[len(lat) // 2] * 1e3,
            "p99_ms": lat[int(len(lat) * 0.99)] * 1e3,
            "client_cpu_us": (c1 - c0) / n * 1e6, "relay_cpu_us": (r1 - r0) / n * 1e6}
    resp = await up.request("DELETE", f"/session/{session}", [], None, timeout=30)
    await resp.read()
    resp.release()
    up.close()
    return out


async def main(n: int) -> None:
    phantomjs = find_phantomjs()
    rundir = tempfile.mkdtemp(prefix="stickyproxy-bench-")
    log = os.open(os.path.join(rundir, "log"), os.O_WRONLY | os.O_CREAT, 0o600)
    procs = []
    results = {}
    try:
        port = free_port()
        direct = subprocess.Popen([phantomjs, f"--webdriver=127.0.0.1:{port}"], stdout=log,
                                  stderr=log, env=browser_env(OPENSSL_CONF="/dev/null"))
        procs.append(direct)
        while True:
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        for fresh in (False, True):
            results[f"direct fresh={fresh}"] = await measure(Upstream(url, 4), n, fresh, None)
        variants = {"relay uvloop quickack": "",
                    "relay uvloop no-quickack": "import socket; del socket.TCP_QUICKACK",
                    "relay asyncio quickack": "sys.modules['uvloop'] = None"}
        for i, (label, patch) in enumerate(variants.items()):
            proc, pid, rport, path = await start_relay(phantomjs, rundir, f"b{i}", patch, log)
            procs.append(proc)
            for fresh in (False, True):
                up = Upstream(f"http://127.0.0.1:{rport}", 4, unix_socket=path)
                results[f"{label} fresh={fresh}"] = await measure(up, n, fresh, parent_of(pid))
            if os.geteuid() == 0 and i == 0:
                for fresh in (False, True):
                    up = SetnsUpstream(f"http://127.0.0.1:{rport}", 4, f"/proc/{pid}/ns/net")
                    results[f"setns fresh={fresh}"] = await measure(up, n, fresh, parent_of(pid))
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            if isinstance(proc, subprocess.Popen):
                proc.wait()
            else:
                await proc.wait()
        os.close(log)
        shutil.rmtree(rundir, ignore_errors=True)
    print(f"{'variant':40} {'target':18} {'mean':>7} {'p50':>7} {'p99':>7} {'cli us':>7} "
          f"{'relay us':>8}")
    for label, per in results.items():
        for target, r in per.items():
            print(f"{label:40} {target:18} {r['mean_ms']:7.3f} {r['p50_ms']:7.3f} "
                  f"{r['p99_ms']:7.3f} {r['client_cpu_us']:7.0f} {r['relay_cpu_us']:8.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=2000)
    asyncio.run(main(parser.parse_args().n))
