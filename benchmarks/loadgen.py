"""Load generators for the fast-backend parts: wrk (bounded by -d) and a session creator.

`wrk_run` returns requests/s and latency percentiles in microseconds from a Lua `done` hook (no
parsing of wrk's human output). `create_sessions` opens many keep-alive connections and POSTs
/session `count` times (bounded), returning the session ids the proxy answered.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

WRK = "/usr/bin/wrk"

_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"mean_us":%.2f,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""

# Each request picks a path at random, every wrk thread from its own seeded sequence. (A stride
# walk shared by the threads made each path's turns come in pairs at a fixed phase that changed
# from run to run: with 1,000 backends, the share of answers a proxy acknowledged on their own
# after the kernel's 40 ms delayed-ACK wait read anything from 0.06 to 0.99 per request.)
_PATHS = r"""
local paths = {}
for line in io.lines("%s") do paths[#paths + 1] = line end
local n = #paths
local threads = 0
setup = function(thread)
  threads = threads + 1
  thread:set("seed", threads * 7919)
end
init = function(args)
  math.randomseed(seed)
end
request = function()
  return wrk.format("GET", paths[math.random(n)], {["Accept"] = "application/json"})
end
"""


def wrk_run(tmp: Path, url: str, *, connections: int, duration: float, threads: int | None = None,
            paths: list[str] | None = None, lua: str = "") -> dict:
    """wrk against url; with `paths`, each request takes one of them at random."""
    script = tmp / f"wrk_{connections}_{len(paths or [])}_{abs(hash(lua))}.lua"
    body = lua + _DONE
    if paths:
        pf = tmp / f"paths_{len(paths)}.txt"
        pf.write_text("\n".join(paths) + "\n")
        body = _PATHS % str(pf) + body
    script.write_text(body)
    threads = threads or min(2, connections)
    argv = [WRK, f"-t{threads}", f"-c{connections}", f"-d{max(1, int(round(duration)))}s",
            "--timeout", "10s", "-s", str(script), url]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    m = re.search(r"^WRKJSON (\{.*\})$", p.stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk failed rc={p.returncode}: {p.stdout[-500:]} {p.stderr[-500:]}")
    r = json.loads(m.group(1))
    secs = r["duration_us"] / 1e6
    r["rps"] = round(r["requests"] / secs, 1) if secs else 0.0
    r["errors"] = sum(r[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    r["connections"] = connections
    return r


_SID = re.compile(rb'"sessionId"\s*:\s*"([^"]+)"')


async def _creator(host: str, port: int, n: int, ids: list[str], errors: list[str], prefix: str) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    body = b'{"desiredCapabilities":{"browserName":"phantomjs"}}'
    req = (f"POST {prefix}/session HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    try:
        for _ in range(n):
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if m:
                data = await reader.readexactly(int(m.group(1)))
            else:  # chunked or close-delimited: rare here; read what remains of the response
                data = await _read_chunked(reader) if b"chunked" in head.lower() else await reader.read()
            sm = _SID.search(data)
            if head.startswith(b"HTTP/1.1 200") and sm:
                ids.append(sm.group(1).decode())
            else:
                errors.append(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            if b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = b""
    while True:
        size = int((await reader.readline()).strip().split(b";")[0], 16)
        if size == 0:
            await reader.readline()
            return out
        out += await reader.readexactly(size)
        await reader.readline()


def create_sessions(host: str, port: int, count: int, concurrency: int = 64, prefix: str = "",
                    timeout: float = 300.0) -> tuple[list[str], list[str]]:
    """POST /session `count` times over `concurrency` keep-alive connections; (ids, errors)."""
    ids: list[str] = []
    errors: list[str] = []
    per = [count // concurrency + (1 if i < count % concurrency else 0) for i in range(concurrency)]

    async def main():
        await asyncio.wait_for(asyncio.gather(*(_creator(host, port, k, ids, errors, prefix)
                                                for k in per if k)), timeout)

    asyncio.run(main())
    return ids, errors
