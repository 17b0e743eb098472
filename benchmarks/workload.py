"""The end-to-end workload: real JSON Wire sessions from C threads, like Selenium 3 clients.

Each worker keeps one keep-alive HTTP connection (Selenium's urllib3 pool: TCP_NODELAY, reused
across requests and sessions) and loops: new session, load the local page, title, find elements by
CSS, execute `return 1+2`, quit. With `cookie`, a random Cookie rides on every request of a session
(the HAProxy recipe hashes it; real clients of the recipe send one per session). With
`"dialect": "w3c"` the same session is spoken as Selenium 4 speaks it (W3C new-session payload,
`/execute/sync`, W3C element references), which a PhantomJS pool serves only through
stickyproxy's bridge. Run as a subprocess so its CPU is its own:

    python -m benchmarks.workload '<json spec>'

It prints `WINDOW_START` / `WINDOW_END` on stdout (the harness samples the other processes' CPU
at those instants) and finally one JSON line with the results. Only sessions that complete inside
the measured window count; sessions in flight at the end are still finished and quit, never leaked.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import threading
import time

DEFAULT_TIMEOUT = 30.0
COMMANDS = ("new_session", "url", "title", "elements", "execute", "quit")
W3C_ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


class Conn(http.client.HTTPConnection):
    """urllib3-like connection: TCP_NODELAY; optionally re-arms TCP_QUICKACK around each read
    (used only for the direct-to-PhantomJS upper bound, where the client is GhostDriver's peer)."""

    quickack = False

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.arm()

    def arm(self) -> None:
        if self.quickack and self.sock is not None:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100.0 * (len(v) - 1))))]


def summarize(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": ms(pct(values, 50)), "p90_ms": ms(pct(values, 90)),
            "p99_ms": ms(pct(values, 99)), "max_ms": ms(max(values) if values else None)}


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000.0, 3)


class CommandError(Exception):
    pass


class Worker(threading.Thread):
    def __init__(self, run: "Run", idx: int, host: str, port: int):
        super().__init__(daemon=True, name=f"worker{idx}")
        self.run_, self.idx, self.host, self.port = run, idx, host, port
        self.conn: Conn | None = None
        self.lat: dict[str, list[float]] = {c: [] for c in COMMANDS}
        self.session_lat: list[float] = []
        self.completed = 0
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.placed: dict[str, int] = {}

    def _conn(self) -> Conn:
        if self.conn is None:
            self.conn = Conn(self.host, self.port, timeout=self.run_.timeout)
            self.conn.quickack = self.run_.quickack
        return self.conn

    def call(self, method: str, path: str, body: dict | None, cookie: str) -> tuple[dict, http.client.HTTPResponse]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json", "Connection": "keep-alive",
                   "User-Agent": "stickyproxy-bench/1"}
        if self.run_.cookie:
            headers["Cookie"] = cookie
        if data is not None:
            headers["Content-Type"] = "application/json;charset=UTF-8"
        for attempt in (0, 1):
            c = self._conn()
            reused = c.sock is not None
            try:
                c.request(method, self.run_.prefix + path, body=data, headers=headers)
                c.arm()
                r = c.getresponse()
                raw = r.read()
                c.arm()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                c.close()
                self.conn = None
                if attempt or not reused:  # retry once, only a reused idle connection (urllib3 does)
                    raise CommandError(type(e).__name__) from e
        if r.will_close:
            c.close()
            self.conn = None
        if r.status != 200:
            raise CommandError(f"HTTP {r.status}")
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError as e:
            raise CommandError("not JSON") from e
        if doc.get("status", 0) != 0:
            raise CommandError(f"status {doc.get('status')}")
        return doc, r

    def timed(self, name: str, method: str, path: str, body, cookie: str, record: bool):
        t0 = time.perf_counter()
        doc, r = self.call(method, path, body, cookie)
        if record:
            self.lat[name].append(time.perf_counter() - t0)
        return doc, r

    def run(self) -> None:
        R = self.run_
        n = 0
        while not R.stop.is_set() and n < R.max_sessions_per_worker:
            n += 1
            cookie = "SESSIONID=" + os.urandom(16).hex()  # random, like a real session cookie
            t0 = time.perf_counter()
            record = t0 >= R.window_start_pc  # commands of sessions begun in the window
            sid = None
            backend = live = None  # live: the backend counting this session until its quit is sent
            try:
                doc, r = self.timed("new_session", "POST", "/session", R.new_session_body, cookie, record)
                sid = doc.get("sessionId") or (doc.get("value") or {}).get("sessionId")
                if not sid:
                    raise CommandError("no sessionId")
                backend = live = R.backend_of(self, r)
                R.live_add(live, +1)
                s = f"/session/{sid}"
                self.timed("url", "POST", s + "/url", {"url": R.page_url}, cookie, record)
                doc, _ = self.timed("title", "GET", s + "/title", None, cookie, record)
                if doc.get("value") != "Bench page":
                    raise CommandError("wrong title")
                doc, _ = self.timed("elements", "POST", s + "/elements",
                                    {"using": "css selector", "value": "li.item"}, cookie, record)
                found = doc.get("value") or []
                if len(found) != 20:
                    raise CommandError("wrong element count")
                if R.element_key not in found[0]:
                    raise CommandError(f"element reference without {R.element_key!r}")
                doc, _ = self.timed("execute", "POST", s + R.execute_path,
                                    {"script": "return 1+2", "args": []}, cookie, record)
                if doc.get("value") != 3:
                    raise CommandError("wrong script result")
                # Live from the new-session answer until the quit is sent: the span in which the
                # session is certainly pinned on that backend, whatever the proxy. Counting until
                # the quit's answer instead overlaps the next session placed on the freed slot
                # (the proxy frees it before this thread reads the answer) and shows peaks that
                # no backend ever had.
                R.live_add(live, -1)
                live = None
                self.timed("quit", "DELETE", s, None, cookie, record)
                sid = None
                t1 = time.perf_counter()
                if R.window_start_pc <= t1 < R.window_end_pc:
                    self.completed += 1
                    self.session_lat.append(t1 - t0)
                    self.placed[backend] = self.placed.get(backend, 0) + 1
            except Exception as e:  # one failed session; go on (the table reports it)
                key = str(e) if isinstance(e, CommandError) else type(e).__name__
                self.errors[key] = self.errors.get(key, 0) + 1
                if time.perf_counter() >= R.window_start_pc:
                    self.failed += 1
                if self.conn is not None:
                    self.conn.close()
                    self.conn = None
                R.live_add(live, -1)
                if sid is not None:
                    try:
                        self.call("DELETE", f"/session/{sid}", None, cookie)
                    except Exception:
                        pass
        if self.conn is not None:
            self.conn.close()


class Run:
    def __init__(self, spec: dict):
        self.targets = [tuple(t) for t in spec["targets"]]  # [[host, port, label], ...]
        self.concurrency = int(spec["concurrency"])
        self.warmup = float(spec.get("warmup", 2.0))
        self.duration = float(spec["duration"])
        self.max_sessions_per_worker = int(spec.get("max_sessions_per_worker", 100000))
        self.page_url = spec["page_url"]
        self.prefix = spec.get("prefix", "")
        self.quickack = bool(spec.get("quickack", False))
        self.timeout = float(spec.get("timeout", DEFAULT_TIMEOUT))
        self.backend_header = spec.get("backend_header")
        self.cookie = bool(spec.get("cookie", False))
        self.backend_labels = spec.get("backend_labels", {})
        self.nonce = spec.get("nonce", str(int(time.time() * 1000)))
        if spec.get("dialect", "jsonwp") == "w3c":  # what Selenium 4's webdriver.Remote sends
            self.new_session_body = {"capabilities": {"firstMatch": [{}],
                                                      "alwaysMatch": {"browserName": "phantomjs"}}}
            self.execute_path, self.element_key = "/execute/sync", W3C_ELEMENT
        else:  # Selenium 3
            self.new_session_body = {"desiredCapabilities": {"browserName": "phantomjs"}}
            self.execute_path, self.element_key = "/execute", "ELEMENT"
        self.stop = threading.Event()
        self.window_start_pc = float("inf")
        self.window_end_pc = float("inf")
        self._lock = threading.Lock()
        self.live: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    def backend_of(self, w: Worker, r: http.client.HTTPResponse) -> str:
        if self.backend_header:
            b = r.getheader(self.backend_header) or "?"
            return self.backend_labels.get(b, b)
        if len(self.targets) > 1:
            return self.targets[w.idx % len(self.targets)][2]
        return "?"

    def live_add(self, backend: str | None, d: int) -> None:
        if backend is None:
            return
        with self._lock:
            v = self.live.get(backend, 0) + d
            self.live[backend] = v
            if v > self.peak.get(backend, 0):
                self.peak[backend] = v

    def go(self) -> dict:
        workers = []
        for i in range(self.concurrency):
            host, port, _label = self.targets[i % len(self.targets)]
            workers.append(Worker(self, i, host, int(port)))
        t_begin = time.perf_counter()
        self.window_start_pc = t_begin + self.warmup
        self.window_end_pc = self.window_start_pc + self.duration
        for w in workers:
            w.start()
        time.sleep(max(0.0, self.window_start_pc - time.perf_counter()))
        cpu0 = time.process_time()
        print("WINDOW_START", flush=True)
        time.sleep(max(0.0, self.window_end_pc - time.perf_counter()))
        cpu1 = time.process_time()
        print("WINDOW_END", flush=True)
        self.stop.set()
        for w in workers:
            w.join(self.timeout * 8)
        hung = sum(1 for w in workers if w.is_alive())
        lat = {c: [x for w in workers for x in w.lat[c]] for c in COMMANDS}
        errors: dict[str, int] = {}
        placed: dict[str, int] = {}
        for w in workers:
            for k, v in w.errors.items():
                errors[k] = errors.get(k, 0) + v
            for k, v in w.placed.items():
                placed[k] = placed.get(k, 0) + v
        completed = sum(w.completed for w in workers)
        return {
            "concurrency": self.concurrency,
            "window_s": self.duration,
            "sessions": completed,
            "sessions_per_s": round(completed / self.duration, 3),
            "failed": sum(w.failed for w in workers),
            "errors": errors,
            "hung_workers": hung,
            "client_cpu_s": round(cpu1 - cpu0, 4),
            "latency": {c: summarize(v) for c, v in lat.items()},
            "raw_ms": {c: [round(x * 1000, 3) for x in v] for c, v in lat.items()},
            "raw_session_ms": [round(x * 1000, 2) for w in workers for x in w.session_lat],
            "session_latency": summarize([x for w in workers for x in w.session_lat]),
            "placed_total": placed,
            "live_peak": dict(self.peak),
            "live_at_end": dict(self.live),
        }


def main() -> None:
    spec = json.loads(sys.argv[1])
    res = Run(spec).go()
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
