"""Composition root: builds the pool, session table and providers from Settings, serves both
ports, runs one health-check task per backend, and shuts down in order on SIGINT/SIGTERM (stop
accepting, stop providers and their processes, exit 0).

Every background task is named and owned here, and cancelled and awaited on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from typing import Any

from aiohttp import web

from . import isolation, proxy, stats
from .backends import Backend, Pool
from .config import ConfigError, Settings
from .auth import Authenticator
from .guard import Guard
from .health import UP, check_loop, probe
from .ratelimit import RateLimiter, parse_rate
from .lifecycle import Lifecycle, fmt
from .metrics import Metrics
from .queue import SessionQueue
from .webdriver import WebDriverError
from .providers.processes import BROWSERS, LocalProcesses, find_chromedriver, find_phantomjs
from .providers.dns import DnsProvider
from .providers.static import StaticProvider
from .sessions import EndReason, SessionTable, missing_sessions
from .outbox import Outbox
from .upstream import Deadlines, Upstream

log = logging.getLogger("stickyproxy")


class Server:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sessions = SessionTable()
        self.pool = Pool(settings.rise, settings.fall, self.sessions, settings.max_sessions)
        self.pool.on_added.append(self._backend_added)
        self.pool.on_removed.append(self._backend_removed)
        self.queue = SessionQueue(self.pool.pick, self.pool.release, settings.max_queue)
        self.pool.on_capacity.append(self.queue.dispatch)
        self.sessions.on_end.append(self.queue.dispatch)
        self.providers: list[Any] = []
        self.lifecycle: Lifecycle | None = None
        self.guard: Guard | None = None
        self.shutting_down = False
        self._checks: dict[str, asyncio.Task] = {}
        self._deadlines = Deadlines()  # every backend's awaited answers, under one timer
        self.outbox = Outbox()  # the writes of a loop turn, gathered: the port's and the backends'
        self._reconciles: set[asyncio.Task] = set()
        self._provider_tasks: list[asyncio.Task] = []
        self._runners: list[web.AppRunner] = []
        self._port: proxy.Port | None = None
        self.started = time.time()
        self.addresses: dict[str, tuple[str, int]] = {}
        self.metrics = Metrics(self.snapshot)  # /metrics renders the same snapshot as /stats

    def _build_providers(self) -> None:
        s = self.settings
        if s.backend:
            self.providers.append(StaticProvider(s.backend))
        if s.backend_dns:
            self.providers.append(DnsProvider(s.backend_dns, s.dns_interval, s.dns_server))
        engines = list(s.docker_host) or [None]  # None: DOCKER_HOST, else the local socket
        if s.docker:
            from .providers.docker import DockerProvider  # docker-py loads only when used
            if s.docker_network == "host":
                log.warning('ISOLATION_OFF source=docker reason="--docker-network host: '
                            'PhantomJS in the containers listens on every interface of this host" '
                            'detail="use a private network, as deploy/docker-compose.launcher.yml"')
            for index, (engine, count) in enumerate(spread(s.docker, engines), 1):
                if not count:
                    continue
                several = len(engines) > 1  # each engine its own pool label, source and ids
                self.providers.append(DockerProvider(
                    count, image=s.image, mem_limit=s.mem_limit,
                    pool=f"{s.pool}-e{index}" if several else s.pool,
                    network=s.docker_network, cleanup=s.docker_cleanup, base_url=engine,
                    source=f"docker-e{index}" if several else "docker"))
        if s.docker_discover:
            from .providers.labels import LabelProvider
            for index, engine in enumerate(engines, 1):
                self.providers.append(LabelProvider(engine, source=f"labels-e{index}"))
        if s.local_count:
            binary = (find_chromedriver(s.chromedriver) if s.local_browser == "chromium"
                      else find_phantomjs(s.phantomjs))
            isolate = self._isolation()
            self.providers.append(LocalProcesses(s.local_count, binary, s.mem_limit,
                                                 browser=BROWSERS[s.local_browser],
                                                 mem_enforce=s.mem_enforce, isolate=isolate))

    async def _prepare_engines(self) -> None:
        """Make sure each Docker engine answers and has the image. With one engine a failure
        stops start-up, clearly; with several, an engine that fails is left out (and logged)
        while any one works."""
        launchers = [p for p in self.providers if hasattr(p, "ensure_image")]
        failures = []
        for provider in launchers:
            try:
                await provider.ensure_image()
            except RuntimeError as exc:  # DockerUnavailable, ImageUnavailable
                if len(launchers) == 1:
                    raise
                failures.append(exc)
                log.error('DOCKER_ENGINE_UNAVAILABLE source=%s reason="%s"', provider.source, exc)
                self.providers.remove(provider)
        if launchers and len(failures) == len(launchers):
            raise failures[0]

    def _isolation(self) -> isolation.Isolation:
        """Each local server in its own network namespace where the host allows it (issue 10:
        PhantomJS listens on every interface whatever it is told)."""
        mode = self.settings.isolation
        if mode == "off":
            log.warning('ISOLATION_OFF reason="--isolation off" detail="local backends listen on '
                        'every interface; each start names its port"')
            return isolation.Isolation(0, "--isolation off")
        isolate = isolation.probe()  # once, before the loop is busy: one short child process
        if not isolate.available:
            if mode == "require":
                raise ConfigError(f"--isolation require: {isolate.reason}")
            log.warning('ISOLATION_OFF reason="%s" detail="local backends will listen on '
                        'every interface; each start names its port"', isolate.reason)
        return isolate

    # backends come and go
    def _backend_added(self, backend: Backend) -> None:
        s = self.settings
        # One connection of GhostDriver's ~10 stays free for the health check.
        backend.upstream = Upstream(backend.spec.url, max(1, s.backend_connections - 1),
                                    backend.spec.unix_socket, self._deadlines, self.outbox)
        self._checks[backend.id] = asyncio.get_running_loop().create_task(
            check_loop(backend.id, lambda: probe(backend.upstream, s.check_path, s.check_timeout),
                       s.check_interval, lambda result: self._checked(backend, result),
                       starting=lambda: not backend.health.ever_up),
            name=f"check-{backend.id}")

    def _checked(self, backend: Backend, result) -> None:
        self.metrics.observe_check(result.code, result.latency)
        if self.pool.record_check(backend, result) == UP and self.sessions.per_backend[backend.id]:
            # Back from down: if it was restarted meanwhile, its old sessions are gone for good.
            task = asyncio.get_running_loop().create_task(self._reconcile(backend),
                                                          name=f"reconcile-{backend.id}")
            self._reconciles.add(task)
            task.add_done_callback(self._reconciles.discard)

    async def _reconcile(self, backend: Backend) -> None:
        """End the pins of sessions the backend no longer lists (`GET /sessions`). A backend
        that cannot list its sessions keeps every pin: an unproven loss is not a loss."""
        try:
            status, body = await backend.upstream.check("/sessions", self.settings.check_timeout)
            listed = {s["id"] for s in json.loads(body)["value"]} if status == 200 else None
        except (OSError, TimeoutError, ValueError, KeyError, TypeError):
            listed = None
        if listed is None:
            log.info("RECONCILE_SKIPPED backend=%s reason=\"cannot list sessions\"", backend.id)
            return
        for session in missing_sessions(self.sessions.of_backend(backend.id), listed):
            self.sessions.end(session.id, EndReason.BACKEND_DOWN,
                              "backend came back without this session (it was restarted)")

    def _backend_removed(self, backend: Backend) -> None:
        task = self._checks.pop(backend.id, None)
        if task:
            task.cancel()
        if backend.upstream:
            backend.upstream.close()

    def snapshot(self) -> dict[str, Any]:
        extra: dict[str, dict[str, Any]] = {}
        for provider in self.providers:
            for backend_id, values in provider.stats().items():
                extra.setdefault(backend_id, {}).update(values)
        return stats.snapshot(self.pool, self.sessions, extra, time.time(), self.started,
                              self.queue, self.lifecycle.recycled_total if self.lifecycle else 0,
                              time.monotonic(), self.shutting_down,
                              self.guard.refused if self.guard else None)

    def _memory(self, backend_id: str) -> int | None:
        for provider in self.providers:
            if hasattr(provider, "memory"):
                value = provider.memory(backend_id)
                if value is not None:
                    return value
        return None

    async def start(self) -> None:
        s = self.settings
        self._build_providers()
        await self._prepare_engines()
        self.lifecycle = Lifecycle(self.pool, self.sessions, s,
                                   {p.source: p for p in self.providers}, self._memory)
        self.guard = Guard(Authenticator(s.auth_token, load_users(s.auth_users)),
                           RateLimiter(*parse_rate(s.new_session_rate)), s.max_body,
                           s.max_connections)
        app = proxy.App(self.pool, self.sessions, self.queue, self.lifecycle, self, self.guard,
                        s.backend_timeout, s.queue_timeout, s.session_key.encode(),
                        self.metrics, s.access_log)
        self._port = proxy.make_port(app, idle_timeout=s.client_idle_timeout,
                                     max_header_size=s.max_header_size, outbox=self.outbox)
        with _listening("--listen", s.listen):
            self.addresses["listen"] = await self._port.start(*s.listen)
        runner = web.AppRunner(stats.make_app(self.snapshot, self, self.metrics), access_log=None,
                               handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, *s.stats_listen, reuse_address=True)
        with _listening("--stats-listen", s.stats_listen):
            await site.start()
        self.addresses["stats"] = runner.addresses[0][:2]
        for provider in self.providers:
            task = asyncio.get_running_loop().create_task(provider.run(self.pool),
                                                          name=f"provider-{provider.source}")
            task.add_done_callback(_report_crash)
            self._provider_tasks.append(task)
        task = asyncio.get_running_loop().create_task(self.lifecycle.run(), name="lifecycle")
        task.add_done_callback(_report_crash)
        self._provider_tasks.append(task)

    async def drain(self, hurry: asyncio.Event) -> None:
        """SIGTERM: take no new sessions, let live ones finish up to --drain-timeout, then
        delete what remains on the backends."""
        self.shutting_down = True
        self.queue.fail_all(WebDriverError.session_not_created("stickyproxy is shutting down"))
        log.info("DRAINING sessions=%d timeout=%s", len(self.sessions),
                 fmt(self.settings.drain_timeout))
        await self.lifecycle.drain_all(self.settings.drain_timeout, hurry)

    async def stop(self) -> None:
        # Stop accepting first, so no new session lands on a backend we are about to stop.
        if self._port is not None:
            await self._port.close()
        for runner in self._runners:
            await runner.cleanup()
        tasks = self._provider_tasks + list(self._checks.values()) + list(self._reconciles)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for provider in self.providers:
            await provider.close()
        for backend in self.pool:
            if backend.upstream:
                backend.upstream.close()


def spread(count: int, engines: list) -> list[tuple[object, int]]:
    """`count` containers over `engines`, as evenly as they go: (engine, how many)."""
    base, extra = divmod(count, len(engines))
    return [(engine, base + (i < extra)) for i, engine in enumerate(engines)]


def load_users(path: str) -> dict[str, str]:
    if not path:
        return {}
    from .auth import parse_users
    from .config import ConfigError
    try:
        with open(path) as f:
            return parse_users(f.read())
    except OSError as exc:
        raise ConfigError(f"--auth-users {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"--auth-users {path}: {exc}") from None


def _report_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("PROVIDER_FAILED task=%s", task.get_name(), exc_info=task.exception())


class CannotListen(Exception):
    """A port to serve on could not be opened (taken, or an address not of this host)."""


@contextlib.contextmanager
def _listening(option: str, address: tuple[str, int]):
    try:
        yield
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)  # (uvloop's text is longer)
        where = f"{address[0]}:{address[1]} ({option})"
        raise CannotListen(f"cannot listen on {where}: {why}") from None


async def serve(settings: Settings, ready=None) -> None:
    server = Server(settings)
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            hurry.set()  # a second signal: stop waiting for live sessions
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await server.start()
        listen, stats_at = server.addresses["listen"], server.addresses["stats"]
        log.info("READY listen=%s:%d stats=%s:%d", *listen, *stats_at)
        if ready:
            ready(server)
        await stop.wait()
        log.info("STOPPING")
        await server.drain(hurry)
    finally:
        await server.stop()
        log.info("STOPPED")
