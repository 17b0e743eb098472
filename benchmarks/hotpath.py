"""The Python cost of one proxied command, without sockets: how fast stickyproxy's own code is.

Part 2 measures a whole request through the kernel, and on this shared 2-core machine one
3-second wrk run differs from the next by 20%: too coarse to see a change worth 5%. Here the
real server (`server.Server`, the real WebDriver port, session table, metrics, upstream pool)
runs in one process, and only the two sockets are replaced by memory:

- each client connection is a `front.Connection` whose transport hands its answer back and
  feeds the next request (`GET /session/<id>/title`, the overhead part's command);
- each backend connection is an `upstream._Connection` whose transport answers every request
  with nginx's bytes (a fixed WebDriver JSON answer, a new session for `POST /session`).
  This in-memory backend exists only to take the kernel out of the measurement; every
  behaviour test uses real servers.

CPU per command is `time.process_time()` over slices of 1,000 commands, C client connections
at once (the limit of 7 connections per backend makes C=64 queue as it does under wrk); a run
reports its 10th-percentile slice, because a neighbour's burst on this shared machine slows
whole runs by up to 50%. `--compare REF...` runs each git ref (or `worktree`, or `floor`: the same load on
benchmarks/floor_proxy.py, the least a Python forwarder spends) in its own process, the refs
alternating over rounds, and reports per ref the minimum, the median and the median of
the ratios to the first ref within each round (which cancels the machine's drift):

    python -m benchmarks.hotpath --compare HEAD worktree floor [--rounds 10] [--connections 64]
    python -m benchmarks.hotpath --lifecycle          # new session + delete instead (per request)
    python -m benchmarks.hotpath --backends 1000 --sessions 1000   # commands over a larger state
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BODY = b'{"sessionId":"%s","status":0,"value":"WebDriver title"}'
NEW = b'{"sessionId":"%s","status":0,"value":{"browserName":"phantomjs"}}'
_IDS = itertools.count(1)  # a new session id for every POST /session
STATUS = b'{"status":0,"value":{"ready":true,"build":{"version":"2.1.1"}}}'


def nginx_answer(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 29 Nov 2026 04:40:00 GMT\r\n"
            b"Content-Type: application/json;charset=UTF-8\r\nContent-Length: %d\r\n"
            b"Connection: keep-alive\r\n\r\n%b" % (len(body), body))


class BackendTransport(asyncio.Transport):
    """The backend's side of one upstream connection: answers each request written to it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.loop, self.protocol, self.closed = loop, protocol, False
        self.sid = b"0" * 32

    def write(self, data: bytes) -> None:
        line = data[:data.index(b"\r\n")]
        if line.startswith(b"POST /session "):
            answer = nginx_answer(NEW % b"%032x" % next(_IDS))
        elif line.startswith(b"GET /status "):
            answer = nginx_answer(STATUS)
        else:
            answer = nginx_answer(BODY % self.sid)
        self.loop.call_soon(self.protocol.data_received, answer)

    def get_extra_info(self, name, default=None):
        return default  # no socket: no TCP options to set

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class ClientTransport(asyncio.Transport):
    """A keep-alive client, like one wrk connection: the next request once an answer is out."""

    def __init__(self, loop, run: "Run") -> None:
        super().__init__()
        self.loop, self.run, self.closed = loop, run, False
        self.protocol: asyncio.Protocol | None = None

    def write(self, data: bytes) -> None:
        if not data.startswith(b"HTTP/1.1 200 "):
            self.run.failed(data)
        elif self.run.answered():
            self.loop.call_soon(self.protocol.data_received, self.run.next_request(data))

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


CHUNK = 1000  # commands per slice of a run; the fastest slices are the least disturbed


class Run:
    def __init__(self, requests: list[bytes], total: int) -> None:
        self.requests, self.left, self.errors = requests, total, []
        self._turn = itertools.cycle(requests).__next__
        self.done = asyncio.get_running_loop().create_future()
        self.marks = [time.process_time()]  # CPU clock at every CHUNK answers

    def answered(self) -> bool:
        self.left -= 1
        if self.left % CHUNK == 0:
            self.marks.append(time.process_time())
        if self.left <= 0 and not self.done.done():
            self.done.set_result(None)
        return self.left > 0

    def figures(self, connections: int, requests: int) -> dict:
        """CPU per command: over the whole run, and the 10th percentile over its slices (a
        neighbour's burst on this shared machine slows some slices by 50%; the quick ones
        are what the code costs)."""
        slices = sorted((b - a) * 1e6 / CHUNK for a, b in zip(self.marks, self.marks[1:]))
        whole = (self.marks[-1] - self.marks[0]) * 1e6 / max(1, requests - 1)
        return {"connections": connections, "requests": requests, "cpu_us_whole": whole,
                "cpu_us": slices[len(slices) // 10] if slices else whole}

    def next_request(self, answer: bytes = b"") -> bytes:
        return self._turn()


CAPABILITIES = b'{"desiredCapabilities":{"browserName":"phantomjs"}}'
NEW_SESSION = (b"POST /session HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%b" % (len(CAPABILITIES), CAPABILITIES))
_SID = re.compile(rb'"sessionId":"([0-9a-f]+)"')


class Lifecycle(Run):
    """Each client: a new session, then its delete, over and over (the new-session path)."""

    def next_request(self, answer: bytes = b"") -> bytes:
        found = _SID.search(answer) if b'"browserName"' in answer else None
        if found is None:
            return NEW_SESSION
        return b"DELETE /session/%s HTTP/1.1\r\nHost: x\r\n\r\n" % found.group(1)

    def failed(self, data: bytes) -> None:
        self.errors.append(data[:300])
        if not self.done.done():
            self.done.set_exception(RuntimeError(f"unexpected answer: {data[:300]!r}"))


async def measure(connections: int, requests: int, backends: int = 1, sessions: int = 1,
                  lifecycle: bool = False) -> dict:
    from stickyproxy import config, upstream
    from stickyproxy.server import Server

    async def memory_open(self, timeout: float):
        conn = upstream._Connection()
        conn.connection_made(BackendTransport(asyncio.get_running_loop(), conn))
        self.opened_total += 1
        return conn

    upstream.Upstream._open = memory_open  # this process only: nothing else runs in it
    settings = config.build({"backend": [f"http://127.0.0.1:{10000 + i}" for i in range(backends)],
                             "listen": "127.0.0.1:0", "stats_listen": "127.0.0.1:0",
                             "log_level": "warning"}, {}, {})
    server = Server(settings)
    await server.start()
    try:
        deadline = time.monotonic() + 30
        while sum(b.health.up for b in server.pool) < backends:
            if time.monotonic() > deadline:
                raise RuntimeError("the in-memory backends never came up")
            await asyncio.sleep(0.01)
        port = server._port
        loop = asyncio.get_running_loop()
        # The sessions, created through the real new-session path (placed over the backends),
        # then pinned commands walking over them.
        run = Run([NEW_SESSION], sessions + 1)
        setup = ClientTransport(loop, run)
        conn = setup.protocol = port()
        conn.connection_made(setup)
        conn.data_received(run.next_request())
        await asyncio.wait_for(run.done, 60)
        setup.closed = True
        conn.connection_lost(None)
        sids = list(server.sessions.live)  # learned from the backends' answers
        if len(sids) < sessions:
            raise RuntimeError(f"only {len(sids)} of {sessions} sessions were created")
        paths = [(b"GET /session/%s/title HTTP/1.1\r\nHost: 127.0.0.1:8910\r\n"
                  b"Accept: application/json\r\n\r\n" % sid.encode()) for sid in sids]
        random.Random(1).shuffle(paths)
        for warm, count in ((True, min(requests, 10000)), (False, requests)):
            run = Lifecycle([NEW_SESSION], count) if lifecycle else Run(paths, count)
            clients = []
            for _ in range(connections):
                transport = ClientTransport(loop, run)
                conn = transport.protocol = port()
                conn.connection_made(transport)
                clients.append((conn, transport))
            for conn, _ in clients:
                conn.data_received(run.next_request())
            await asyncio.wait_for(run.done, 120)
            for conn, transport in clients:
                transport.closed = True
                conn.connection_lost(None)
            await asyncio.sleep(0)
        return {**run.figures(connections, requests), "backends": backends, "sessions": sessions,
                "lifecycle": lifecycle}
    finally:
        await server.stop()


async def measure_floor(connections: int, requests: int) -> dict:
    """The same load on benchmarks/floor_proxy.py (the least a Python forwarder can do), its
    8 upstream connections opened in memory up front (it never closes a keep-alive one)."""
    import floor_proxy as fp  # this file's directory is on sys.path when run as a script

    loop = asyncio.get_running_loop()
    backend = fp.Backend("http://127.0.0.1:9", "b1")
    fp.Client.backends = [backend]
    for _ in range(fp.LIMIT):
        conn = fp.Upstream()
        conn.transport = BackendTransport(loop, conn)
        backend.idle.append(conn)

    async def drive(request: bytes, count: int, clients: int) -> Run:
        run = Run([request], count)
        protocols = []
        for _ in range(clients):
            transport = ClientTransport(loop, run)
            client = transport.protocol = fp.Client()
            client.connection_made(transport)
            protocols.append(client)
        for client in protocols:
            client.data_received(request)
        await asyncio.wait_for(run.done, 120)
        return run

    body = b'{"desiredCapabilities":{"browserName":"phantomjs"}}'
    await drive(b"POST /session HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (len(body), body), 1, 1)
    sid = next(iter(fp.Client.pins))
    request = (b"GET /session/%s/title HTTP/1.1\r\nHost: 127.0.0.1:8910\r\n"
               b"Accept: application/json\r\n\r\n" % sid)
    await drive(request, min(requests, 10000), connections)
    run = await drive(request, requests, connections)
    await asyncio.sleep(0.01)  # the in-flight ones finish
    return run.figures(connections, requests)


def run_one(ref_path: str, connections: int, requests: int, extra: list[str] = ()) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) if ref_path == "floor" else ref_path)
    floor = ["--floor"] if ref_path == "floor" else []
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--run", *floor,
                        "--connections", str(connections), "--requests", str(requests),
                        *([] if ref_path == "floor" else extra)],
                       capture_output=True, text=True, env=env,
                       cwd=str(REPO) if ref_path == "floor" else ref_path, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"hot path run failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def snapshot(ref: str, into: Path) -> str:
    """`ref` as committed (git archive), or the working tree for 'worktree'."""
    if ref == "worktree":
        return str(REPO)
    if ref == "floor":
        return "floor"
    dst = into / ref.replace("/", "_")
    dst.mkdir()
    tar = subprocess.run(["git", "-C", str(REPO), "archive", ref, "stickyproxy"],
                         capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dst)], input=tar, check=True)
    return str(dst)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hotpath")
    ap.add_argument("--compare", nargs="+", default=["worktree"], metavar="REF")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--requests", type=int, default=30000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backends", type=int, default=1, help="in-memory backends (stickyproxy only)")
    ap.add_argument("--sessions", type=int, default=1, help="pinned sessions the commands walk over")
    ap.add_argument("--lifecycle", action="store_true",
                    help="new session + delete instead of a command (CPU per request of the two)")
    a = ap.parse_args()
    if a.run:
        import uvloop
        print(json.dumps(uvloop.run(measure_floor(a.connections, a.requests) if a.floor else
                                    measure(a.connections, a.requests, a.backends, a.sessions,
                                            a.lifecycle))))
        return 0
    extra = ["--backends", str(a.backends), "--sessions", str(a.sessions)]
    extra += ["--lifecycle"] if a.lifecycle else []
    with tempfile.TemporaryDirectory(prefix="sp-hotpath-") as tmp:
        paths = {ref: snapshot(ref, Path(tmp)) for ref in a.compare}
        results: dict[str, list[float]] = {ref: [] for ref in a.compare}
        for r in range(a.rounds):
            order = a.compare if r % 2 == 0 else list(reversed(a.compare))
            for ref in order:
                results[ref].append(run_one(paths[ref], a.connections, a.requests, extra)["cpu_us"])
        base = results[a.compare[0]]
        print(f"CPU us per command, {a.connections} connections, {a.requests} commands per run, "
              f"{a.rounds} rounds (each ref in its own process, alternating). The machine's "
              "speed drifts between runs: the paired ratio (same round) and the minimum are the "
              "figures to trust.")
        for ref, values in results.items():
            ratios = [v / b for v, b in zip(values, base)]
            print(f"  {ref:12s} min {min(values):6.2f}  median {statistics.median(values):6.2f}"
                  f"  paired ratio x{statistics.median(ratios):.3f} (min x{min(values) / min(base):.3f})"
                  f"  runs {', '.join(f'{v:.1f}' for v in values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
