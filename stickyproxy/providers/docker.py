"""Docker backends: a pool of memory-capped PhantomJS containers launched and supervised here.

Owns: which containers the pool should have (`plan`, pure, on top), starting/adopting/replacing
them through docker-py, noticing deaths from Docker events plus a periodic re-list, telling the
pool at once which backend was lost and why (`oom`, `exited`, `removed`), and per-container stats.
Leaves to others: health checks and placement (the pool), session bookkeeping (`PoolSink.lost`
ends the sessions), flags and units (config/cli hand in plain values).

Containers are found again by label, never by name alone: `stickyproxy.pool=<pool>` marks the
pool, `stickyproxy.slot=<i>` the backend id `docker-<pool>-<i>`, `stickyproxy.port` the loopback
port under host networking, and `stickyproxy.config` a hash of what the container was started
with, so a restart with another image or memory cap replaces the pool instead of adopting it.

docker-py is blocking: every call runs in `asyncio.to_thread`, and the events stream has its own
thread and its own client. Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shlex
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Mapping, Sequence, TextIO

from . import BackendSpec, PoolSink

log = logging.getLogger("stickyproxy.providers.docker")

SOURCE = "docker"
DEFAULT_IMAGE = "wernight/phantomjs"
WEBDRIVER_PORT = 8910  # PhantomJS's port inside a container on a named network
# Under host networking every container shares the host's interfaces: bind loopback only, or
# each PhantomJS would answer on every address of the machine.
# GhostDriver logs about 1.2 kB per session at its default level (INFO), which the engine's
# default log driver keeps without a limit: tens of GB a day at 150 sessions/s. WARN, as the
# local pool runs it.
DEFAULT_HOST_COMMAND = "phantomjs --webdriver=127.0.0.1:{port} --webdriver-loglevel=WARN"
DEFAULT_NETWORK_COMMAND = "phantomjs --webdriver={port} --webdriver-loglevel=WARN"
# `always` is the original recipe's `restart: always`: Docker itself brings an OOM-killed or crashed
# PhantomJS back within ~100 ms, even while stickyproxy is down or restarting. With `on-failure` a
# clean exit (status 0) would stay down until the next re-list starts it.
DEFAULT_RESTART = "always"
RESTART_POLICIES = ("always", "unless-stopped", "on-failure", "no")

LABEL_POOL = "stickyproxy.pool"
LABEL_SLOT = "stickyproxy.slot"
LABEL_PORT = "stickyproxy.port"
LABEL_CONFIG = "stickyproxy.config"

# Lost reasons (issue 4; the same strings as sessions.EndReason's members).
OOM, EXITED, REMOVED = "oom", "exited", "removed"


class DockerUnavailable(RuntimeError):
    """The Docker engine cannot be reached or refused a required call; the message says which."""


class ImageUnavailable(RuntimeError):
    """The image is not present and could not be pulled; the message says how to build/load it."""


# -- pure part -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    """One container carrying the pool's label, as a list/inspect saw it."""

    id: str
    slot: int | None  # None when the slot label is missing or malformed
    state: str  # Docker's State.Status: created running paused restarting removing exited dead
    config: str = ""
    started_at: str = ""
    name: str = ""
    port: int | None = None
    restart_count: int = 0

    @property
    def generation(self) -> str:
        return f"{self.id[:12]}@{self.started_at}"


@dataclass(frozen=True)
class Action:
    kind: str  # "create" | "start" | "unpause" | "remove"
    slot: int | None
    container_id: str | None = None
    why: str = ""


_STATE_RANK = {"running": 0, "restarting": 1, "paused": 2, "created": 3, "exited": 4,
               "removing": 5, "dead": 6}


def choose_slots(existing: Sequence[Observed], count: int, config: str) -> list[int]:
    """The `count` slots a starting provider keeps: first those with a running container of
    `config` (adopted as they are), then slots holding any other container (started again or
    replaced in place), then the lowest free indices. A pool recycled for a while has gaps in its
    slot numbers; adopting it must not replace healthy containers just to renumber them.
    """
    rank: dict[int, int] = {}
    for c in existing:
        if c.slot is None or c.slot < 0 or c.state in ("removing", "dead"):
            continue
        best = 0 if c.state in ("running", "restarting") and c.config == config else 1
        rank[c.slot] = min(best, rank.get(c.slot, best))
    chosen = sorted(rank, key=lambda slot: (rank[slot], slot))[:count]
    index = 0
    while len(chosen) < count:
        if index not in chosen:
            chosen.append(index)
        index += 1
    return sorted(chosen)


def plan(existing: Sequence[Observed], slots: Collection[int], config: str) -> list[Action]:
    """What to do so that each of `slots` has exactly one container of `config`, and no
    container of the pool sits outside them.

    Keeps a running (or Docker-restarting) container of the right config in each slot and
    removes the rest; an exited/created one is started again (stopped by hand, or a policy that
    gave up); a dead one, or one of another config, is replaced. A slot whose container is being
    removed waits for the `destroy` event before a new one is created (the name is still taken).
    Order: removals, then starts, then creations, each by slot.
    """
    wanted = set(slots)
    removes: list[Action] = []
    starts: list[Action] = []
    creates: list[Action] = []
    by_slot: dict[int, list[Observed]] = {}
    for c in existing:
        if c.slot is None:
            removes.append(Action("remove", None, c.id, "no slot label"))
        elif c.slot not in wanted:
            removes.append(Action("remove", c.slot, c.id, "slot not in the pool"))
        else:
            by_slot.setdefault(c.slot, []).append(c)
    for slot in sorted(wanted):
        # Newest start first, then: right config, then the liveliest state.
        newest = sorted(by_slot.get(slot, ()), key=lambda c: (c.started_at, c.id), reverse=True)
        candidates = sorted(newest, key=lambda c: (c.config != config, _STATE_RANK.get(c.state, 9)))
        if not candidates:
            creates.append(Action("create", slot, None, "missing"))
            continue
        keep, extra = candidates[0], candidates[1:]
        removes.extend(Action("remove", slot, c.id, "duplicate") for c in extra if c.state != "removing")
        if keep.state == "removing":
            continue
        if keep.config != config:
            removes.append(Action("remove", slot, keep.id, "config changed"))
            creates.append(Action("create", slot, None, "config changed"))
        elif keep.state == "dead":
            removes.append(Action("remove", slot, keep.id, "dead"))
            creates.append(Action("create", slot, None, "dead"))
        elif keep.state in ("exited", "created"):
            starts.append(Action("start", slot, keep.id, keep.state))
        elif keep.state == "paused":
            starts.append(Action("unpause", slot, keep.id, "paused"))
    key = lambda a: (-1 if a.slot is None else a.slot, a.container_id or "")  # noqa: E731
    return sorted(removes, key=key) + sorted(starts, key=key) + sorted(creates, key=key)


def slot_backend_id(pool: str, slot: int) -> str:
    return f"docker-{pool}-{slot}"


def container_name(pool: str, slot: int) -> str:
    return f"stickyproxy-{pool}-{slot}"


def backend_url(network: str, name: str, port: int | None) -> str:
    if network == "host":
        return f"http://127.0.0.1:{port}"
    return f"http://{name}:{WEBDRIVER_PORT}"


def serving_by_slot(existing: Iterable[Observed], slots: Collection[int], config: str) -> dict[int, Observed]:
    """slot -> the running container of `config` that serves it (the newest if several)."""
    best: dict[int, Observed] = {}
    for c in existing:
        if c.state != "running" or c.config != config or c.slot not in slots:
            continue
        if c.slot not in best or c.started_at > best[c.slot].started_at:
            best[c.slot] = c
    return dict(sorted(best.items()))


def spec_for(c: Observed, *, pool: str, network: str, mem_limit: int | None, image: str,
             source: str = "docker") -> BackendSpec:
    return BackendSpec(
        id=slot_backend_id(pool, c.slot),
        url=backend_url(network, c.name, c.port),
        source=source,
        generation=c.generation,
        meta={"container_id": c.id[:12], "container_name": c.name, "image": image,
              "mem_limit": mem_limit, "port": c.port if network == "host" else WEBDRIVER_PORT},
    )


def config_hash(*, image: str, command: Sequence[str], mem_limit: int | None, network: str,
                restart: str, init: bool) -> str:
    """What a running container must match to be adopted; a mismatch replaces it, ending its
    sessions. GhostDriver's log level is left out: a change of it (as the default's, to WARN)
    is not worth the live sessions, and the next container started gets it."""
    command = [arg for arg in command if not arg.startswith("--webdriver-loglevel=")]
    blob = json.dumps([image, command, mem_limit, network, restart, init], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def container_config(*, image: str, command: list[str], name: str, port: int, pool: str,
                     slot: int, config: str, environment: Mapping[str, str], restart: str,
                     init: bool, mem_limit: int | None, network: str) -> dict[str, Any]:
    """The keyword arguments of `containers.run` for one backend (pure, so tests can check
    what the engine is asked for). No port is ever published: on a named network only
    containers on it (stickyproxy) reach PhantomJS; `host` networking is for single-host and
    test use, and exposes PhantomJS on every interface (it ignores the address it is given)."""
    kwargs: dict[str, Any] = {
        "image": image, "command": command, "name": name, "detach": True,
        "labels": {LABEL_POOL: pool, LABEL_SLOT: str(slot), LABEL_PORT: str(port),
                   LABEL_CONFIG: config},
        "environment": dict(environment), "restart_policy": {"Name": restart}, "init": init,
    }
    if mem_limit:
        # Swap capped to the same figure: a leaking PhantomJS is killed, it cannot spill.
        kwargs.update(mem_limit=mem_limit, memswap_limit=mem_limit)
    if network == "host":
        kwargs["network_mode"] = "host"
    else:
        kwargs["network"] = network
    return kwargs


def render_command(template: str | Sequence[str], port: int) -> list[str]:
    """`phantomjs --webdriver={port}` -> argv with the port filled in."""
    argv = shlex.split(template) if isinstance(template, str) else list(template)
    return [arg.replace("{port}", str(port)) for arg in argv]


def observe(attrs: Mapping[str, Any]) -> Observed:
    """An Observed from `docker inspect` attributes."""
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    state = attrs.get("State") or {}
    return Observed(
        id=attrs["Id"],
        slot=_int(labels.get(LABEL_SLOT)),
        state=state.get("Status", ""),
        config=labels.get(LABEL_CONFIG, ""),
        started_at=state.get("StartedAt", ""),
        name=(attrs.get("Name") or "").lstrip("/"),
        port=_int(labels.get(LABEL_PORT)),
        restart_count=int(attrs.get("RestartCount") or 0),
    )


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def memory_from_stats(stats: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(used bytes, limit bytes) as `docker stats` shows them: usage less the page cache."""
    mem = stats.get("memory_stats") or {}
    usage = mem.get("usage")
    if usage is None:
        return None, mem.get("limit")
    detail = mem.get("stats") or {}
    cache = detail.get("total_inactive_file", detail.get("inactive_file", detail.get("cache", 0)))
    return max(0, usage - (cache or 0)), mem.get("limit")


def pull_message(image: str, error: object) -> str:
    return (
        f"Docker image {image!r} is not present and could not be pulled ({error}). "
        f"Build it from this repository with `docker build -t {image} deploy/phantomjs`, "
        f"or load a saved copy with `docker load -i phantomjs.tar`, then start stickyproxy again."
    )


# -- the provider --------------------------------------------------------------------------------


@dataclass
class _Counters:
    restarts: int = 0  # a new container generation behind the backend id
    oom_kills: int = 0
    exits: int = 0
    removals: int = 0
    lost_oom: int = 0
    generation: str = ""
    memory_used: int | None = None
    memory_limit: int | None = None
    memory_at: float | None = None
    docker_restart_count: int = 0
    container_id: str = ""
    container_name: str = ""
    state: str = ""
    port: int | None = None


@dataclass
class _Live:
    """A published container whose loss has not been reported yet."""

    backend_id: str
    generation: str
    oom: bool = False
    pending: asyncio.TimerHandle | None = field(default=None, repr=False)


class DockerProvider:
    """N PhantomJS containers of `image`, each capped at `mem_limit` bytes (swap included)."""

    source = SOURCE

    def __init__(
        self,
        count: int,
        *,
        image: str = DEFAULT_IMAGE,
        command: str | Sequence[str] | None = None,
        mem_limit: int | None = None,
        restart: str = DEFAULT_RESTART,
        pool: str = "default",
        network: str = "host",
        base_url: str | None = None,
        cleanup: bool = False,
        init: bool = True,
        resync_interval: float = 5.0,
        stats_interval: float = 10.0,
        removal_grace: float = 0.3,
        progress: TextIO | None = None,
        environment: Mapping[str, str] | None = None,
        source: str = SOURCE,
    ) -> None:
        self.source = source  # one per engine when several are used: the lifecycle finds us by it
        if count < 0:
            raise ValueError("docker: count must be >= 0")
        if restart not in RESTART_POLICIES:
            raise ValueError(f"docker: restart policy must be one of {', '.join(RESTART_POLICIES)}")
        if not pool or not all(ch.isalnum() or ch in "-_." for ch in pool):
            raise ValueError("docker: pool name must be non-empty [A-Za-z0-9_.-]")
        self.count = count
        self.image = image if ":" in image.rsplit("/", 1)[-1] or "@" in image else f"{image}:latest"
        self.network = network
        self.command = command or (DEFAULT_HOST_COMMAND if network == "host" else DEFAULT_NETWORK_COMMAND)
        self.mem_limit = mem_limit
        self.restart = restart
        self.pool = pool
        self.base_url = base_url
        self.cleanup = cleanup
        self.init = init
        self.resync_interval = resync_interval
        self.stats_interval = stats_interval
        # `docker rm -f` emits kill, die, destroy within milliseconds: a die is held this long to
        # tell a removal from an exit. An OOM is known before the die and is reported at once.
        self.removal_grace = removal_grace
        self.progress = progress if progress is not None else sys.stderr
        # PhantomJS 2.1's bundled OpenSSL fails to read modern openssl.cnf files (Debian 12's).
        self.environment = {"OPENSSL_CONF": "/dev/null", **(environment or {})}
        self.config = config_hash(image=self.image, command=render_command(self.command, 0),
                                  mem_limit=mem_limit, network=network, restart=restart, init=init)

        self._client = None
        self._events_client = None
        self._events_stream = None
        self._events_thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._sink: PoolSink | None = None
        self._dirty: asyncio.Event | None = None
        self._events: asyncio.Queue | None = None
        self._reconcile_lock: asyncio.Lock | None = None
        self._published: list[BackendSpec] | None = None
        self._live: dict[str, _Live] = {}  # container id -> published, loss not yet reported
        self._counters: dict[str, _Counters] = {}
        self._image_ready = False
        self._oom_seen: set[str] = set()  # container ids with an OOM since their last start
        self._slots: set[int] | None = None  # chosen at the first pass; replace/retire change it
        self._specs: dict[int, BackendSpec] = {}  # slot -> its last published spec
        self._next_slot = 0
        self.recycled_total = 0

    @property
    def label(self) -> str:
        return f"{LABEL_POOL}={self.pool}"

    # -- blocking helpers (run in threads) --

    def _connect(self):
        try:
            import docker
        except ImportError as exc:
            raise DockerUnavailable("the Docker backends need docker-py: "
                                    "pip install 'stickyproxy[docker]'") from exc

        where = self.base_url or "DOCKER_HOST / the default socket"
        kwargs = {"base_url": self.base_url} if self.base_url else docker.utils.kwargs_from_env()
        # Ping with a fixed API version first: with "auto" the constructor connects at once, and
        # a refused connection there leaks its socket.
        url = kwargs.get("base_url") or "unix:///var/run/docker.sock"
        if url.startswith(("unix://", "http+unix://")):
            # docker-py leaks the socket of a refused unix connection: try it ourselves first.
            path = url.split("://", 1)[1]
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(5)
                    s.connect(path)
            except OSError as exc:
                raise DockerUnavailable(f"cannot reach the Docker engine at {where}: {exc}") from exc
        probe = docker.APIClient(version="1.24", timeout=10, **kwargs)
        try:
            probe.ping()
        except Exception as exc:  # docker.errors.DockerException, requests errors
            raise DockerUnavailable(f"cannot reach the Docker engine at {where}: {exc}") from exc
        finally:
            probe.close()
        try:
            return docker.DockerClient(**kwargs)
        except Exception as exc:
            raise DockerUnavailable(f"cannot use the Docker engine at {where}: {exc}") from exc

    def _ensure_image_blocking(self) -> None:
        import docker.errors

        client = self._client
        try:
            client.images.get(self.image)
            return
        except docker.errors.ImageNotFound:
            pass
        repository, tag = docker.utils.parse_repository_tag(self.image)
        print(f"stickyproxy: pulling {self.image} (not present on the Docker engine)",
              file=self.progress, flush=True)
        try:
            shown: dict[str, tuple[str, float]] = {}
            for line in client.api.pull(repository, tag=tag, stream=True, decode=True):
                if "error" in line:
                    raise docker.errors.APIError(line["error"])
                self._print_progress(line, shown)
            client.images.get(self.image)
        except Exception as exc:
            raise ImageUnavailable(pull_message(self.image, exc)) from exc
        print(f"stickyproxy: pulled {self.image}", file=self.progress, flush=True)

    def _print_progress(self, line: Mapping[str, Any], shown: dict[str, tuple[str, float]]) -> None:
        # One line per layer and status, and at most one a second while a layer downloads.
        layer, status = line.get("id", ""), line.get("status", "")
        now = time.monotonic()
        last = shown.get(layer)
        if last and last[0] == status and now - last[1] < 1.0:
            return
        shown[layer] = (status, now)
        text = " ".join(part for part in (layer, status, line.get("progress", "")) if part)
        print(f"  {text}", file=self.progress, flush=True)

    def _check_network_blocking(self) -> None:
        import docker.errors

        if self.network == "host":
            return
        try:
            self._client.networks.get(self.network)
        except docker.errors.NotFound as exc:
            raise DockerUnavailable(
                f"Docker network {self.network!r} does not exist; create it "
                f"(`docker network create {self.network}`) and attach stickyproxy to it"
            ) from exc

    def _list_blocking(self) -> list[Observed]:
        containers = self._client.containers.list(all=True, filters={"label": self.label},
                                                  ignore_removed=True)
        return [observe(c.attrs) for c in containers]

    def _apply_blocking(self, action: Action, taken_ports: set[int], preferred_port: int | None = None) -> None:
        import docker.errors

        client = self._client
        try:
            if action.kind == "remove":
                client.api.remove_container(action.container_id, force=True)
            elif action.kind == "start":
                client.api.start(action.container_id)
            elif action.kind == "unpause":
                client.api.unpause(action.container_id)
            elif action.kind == "create":
                self._create_blocking(action.slot, taken_ports, preferred_port)
        except docker.errors.NotFound:
            pass  # gone meanwhile: the next re-list decides again
        log.info("DOCKER_ACTION action=%s pool=%s slot=%s container=%s why=%r", action.kind,
                 self.pool, action.slot, (action.container_id or "")[:12], action.why)

    def _create_blocking(self, slot: int, taken_ports: set[int], preferred_port: int | None) -> None:
        if self.network == "host":
            # A replacement keeps its slot's port when it is free: same URL, so the pool keeps the
            # backend's record instead of removing and re-adding it.
            port = (preferred_port if preferred_port and preferred_port not in taken_ports
                    and port_is_free(preferred_port) else free_port(taken_ports))
            taken_ports.add(port)
        else:
            port = WEBDRIVER_PORT
        self._client.containers.run(**container_config(
            image=self.image, command=render_command(self.command, port),
            name=container_name(self.pool, slot), port=port, pool=self.pool, slot=slot,
            config=self.config, environment=self.environment, restart=self.restart,
            init=self.init, mem_limit=self.mem_limit, network=self.network))

    def _stats_blocking(self, container_id: str) -> tuple[int | None, int | None]:
        try:
            raw = self._client.api.stats(container_id, stream=False, one_shot=True)
        except Exception:  # one_shot needs API 1.41; older engines sample for a second
            raw = self._client.api.stats(container_id, stream=False)
        return memory_from_stats(raw)

    def _remove_pool_blocking(self) -> int:
        import docker.errors

        removed = 0
        for c in self._client.containers.list(all=True, filters={"label": self.label},
                                              ignore_removed=True):
            try:
                c.remove(force=True)
                removed += 1
            except docker.errors.NotFound:
                pass
        return removed

    def _watch_events_blocking(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        """Thread: forward the pool's container events to the loop; reconnect when cut."""
        delay = 0.5
        while not self._closing.is_set():
            try:
                if self._events_client is None:
                    self._events_client = self._connect()
                stream = self._events_client.events(
                    decode=True, filters={"label": self.label, "type": "container"})
                self._events_stream = stream
                if self._closing.is_set():
                    stream.close()
                    break
                loop.call_soon_threadsafe(queue.put_nowait, {"Action": "resync"})
                delay = 0.5
                for event in stream:
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody listens any more
                break
            except Exception as exc:  # engine restarted, socket cut
                if self._closing.is_set():
                    break
                log.warning("DOCKER_EVENTS_LOST pool=%s error=%r", self.pool, exc)
                self._events_client = None
            if self._closing.wait(delay):
                break
            delay = min(delay * 2, 10.0)

    # -- the loop --

    async def ensure_image(self) -> None:
        """Connect and make sure the image is present (pulling it, progress on the terminal).

        Raises DockerUnavailable or ImageUnavailable; the CLI may call this before serving.
        """
        if self._client is None:
            self._client = await asyncio.to_thread(self._connect)
        if not self._image_ready:
            await asyncio.to_thread(self._ensure_image_blocking)
            await asyncio.to_thread(self._check_network_blocking)
            self._image_ready = True

    async def run(self, sink: PoolSink) -> None:
        self._sink = sink
        await self.ensure_image()
        loop = asyncio.get_running_loop()
        self._dirty = asyncio.Event()
        self._events = asyncio.Queue()
        self._reconcile_lock = asyncio.Lock()
        self._closing.clear()
        # Subscribe before the first list, so that nothing happening in between is missed.
        self._events_thread = threading.Thread(
            target=self._watch_events_blocking, args=(loop, self._events),
            name=f"stickyproxy-docker-events-{self.pool}", daemon=True)
        self._events_thread.start()
        self._dirty.set()  # first pass at once: adopt or start the pool
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._consume_events(), name=f"docker-events-{self.pool}")
                tasks.create_task(self._resync_loop(), name=f"docker-resync-{self.pool}")
                tasks.create_task(self._stats_loop(), name=f"docker-stats-{self.pool}")
        finally:
            await self._stop_watching()

    async def close(self) -> None:
        await self._stop_watching()
        for live in self._live.values():
            if live.pending is not None:
                live.pending.cancel()
        if self._client is None:
            return
        if self.cleanup:
            removed = await asyncio.to_thread(self._remove_pool_blocking)
            log.info("DOCKER_CLEANUP pool=%s removed=%d", self.pool, removed)
        await asyncio.to_thread(self._client.close)
        self._client = None

    async def _stop_watching(self) -> None:
        self._closing.set()
        stream = self._events_stream
        if stream is not None:
            await asyncio.to_thread(stream.close)
        thread = self._events_thread
        if thread is not None:
            await asyncio.to_thread(thread.join, 10)
            self._events_thread = None
        if self._events_client is not None:
            await asyncio.to_thread(self._events_client.close)
            self._events_client = None
        self._events_stream = None

    async def _resync_loop(self) -> None:
        backoff = 0.0
        while True:
            # Not asyncio.wait_for: on 3.11 it can swallow a cancellation that arrives as the
            # event is set, and this task would then never end.
            try:
                async with asyncio.timeout(self.resync_interval + backoff):
                    await self._dirty.wait()
            except TimeoutError:
                pass
            self._dirty.clear()
            try:
                await self.reconcile()
                backoff = 0.0
            except Exception as exc:  # engine down or a call refused: try again later
                log.warning("DOCKER_RESYNC_FAILED pool=%s error=%r", self.pool, exc)
                backoff = min(max(backoff * 2, 1.0), 30.0)

    async def reconcile(self) -> None:
        """List the pool, apply `plan`, report losses events missed, publish the running set."""
        async with self._reconcile_lock:
            observed = await asyncio.to_thread(self._list_blocking)
            if self._slots is None:  # first pass: adopt what runs, fill up to count
                self._slots = set(choose_slots(observed, self.count, self.config))
                labelled = {c.slot for c in observed if c.slot is not None}
                self._next_slot = max(self._slots | labelled, default=-1) + 1
            actions = plan(observed, self._slots, self.config)
            if actions:
                taken = {c.port for c in observed if c.port is not None}
                for action in actions:
                    last = self._specs.get(action.slot)
                    preferred = last.meta.get("port") if last is not None else None
                    try:
                        await asyncio.to_thread(self._apply_blocking, action, taken, preferred)
                    except Exception as exc:
                        log.warning("DOCKER_ACTION_FAILED action=%s pool=%s slot=%s error=%r",
                                    action.kind, self.pool, action.slot, exc)
                observed = await asyncio.to_thread(self._list_blocking)
            self._observe(observed)

    def _observe(self, observed: list[Observed]) -> None:
        by_id = {c.id: c for c in observed}
        # Losses the events have not told (stream cut, thread reconnecting, a restart between two
        # passes). A pending die is left to its timer, which tells a removal from an exit.
        for cid, live in list(self._live.items()):
            c = by_id.get(cid)
            if c is None or c.state == "removing":
                self._lost(cid, REMOVED)
            elif c.generation != live.generation:
                self._lost(cid, EXITED)  # it ran again since: not removed
            elif c.state != "running" and live.pending is None:
                self._lost(cid, EXITED)
        serving = serving_by_slot(observed, self._slots or (), self.config)
        fresh = [spec_for(c, pool=self.pool, network=self.network, mem_limit=self.mem_limit,
                          source=self.source,
                          image=self.image) for c in serving.values()]
        # A slot stays published while its container restarts or is replaced (the pool was told
        # through lost() and holds it down): it keeps its record and counters in the pool, and a
        # new generation tells the pool when it is back.
        self._specs.update(zip(serving, fresh))
        for slot in set(self._specs) - (self._slots or set()):
            del self._specs[slot]
        specs = [self._specs[slot] for slot in sorted(self._specs)]
        for c, spec in zip(serving.values(), fresh):
            counters = self._counters.setdefault(spec.id, _Counters())
            if counters.generation and counters.generation != spec.generation:
                counters.restarts += 1
                counters.memory_used = counters.memory_at = None  # the old container's figure
            counters.generation = spec.generation
            counters.container_id, counters.container_name = c.id[:12], c.name
            counters.port, counters.docker_restart_count = spec.meta["port"], c.restart_count
            if c.id not in self._live:
                self._live[c.id] = _Live(spec.id, spec.generation)
                log.info("DOCKER_BACKEND_UP backend=%s container=%s url=%s", spec.id, c.id[:12],
                         spec.url)
        for bid, counters in self._counters.items():
            states = [c.state for c in observed
                      if c.slot is not None and slot_backend_id(self.pool, c.slot) == bid]
            counters.state = "running" if any(s == "running" for s in states) else (
                states[0] if states else "missing")
        if specs != self._published:
            self._published = specs
            self._sink.publish(self.source, specs)

    def _lost(self, container_id: str, reason: str) -> None:
        """Report the loss of a published container once; an OOM seen for it wins the reason."""
        live = self._live.pop(container_id, None)
        if live is None:
            return
        if live.pending is not None:
            live.pending.cancel()
        if live.oom:
            reason = OOM
        counters = self._counters.setdefault(live.backend_id, _Counters())
        if reason == EXITED:
            counters.exits += 1
        elif reason == REMOVED:
            counters.removals += 1
        else:
            counters.lost_oom += 1
        log.warning("DOCKER_BACKEND_LOST backend=%s container=%s reason=%s", live.backend_id,
                    container_id[:12], reason)
        self._sink.lost(live.backend_id, reason)

    async def _consume_events(self) -> None:
        while True:
            event = await self._events.get()
            try:
                self._on_event(event)
            except Exception:  # a malformed event must not stop supervision
                log.exception("DOCKER_EVENT_FAILED event=%r", event)

    def _on_event(self, event: Mapping[str, Any]) -> None:
        action = event.get("Action") or event.get("status") or ""
        actor = event.get("Actor") or {}
        cid = event.get("id") or actor.get("ID") or ""
        live = self._live.get(cid)
        if action == "oom":
            # cgroup v1 can signal one OOM more than once: count it once per container run.
            if cid not in self._oom_seen:
                self._oom_seen.add(cid)
                slot = _int((actor.get("Attributes") or {}).get(LABEL_SLOT))
                if slot is not None:
                    self._counters.setdefault(slot_backend_id(self.pool, slot), _Counters()).oom_kills += 1
            if live is not None:
                live.oom = True
                if live.pending is not None:  # the die came first
                    self._lost(cid, OOM)
        elif action == "die" and live is not None:
            if live.oom:
                self._lost(cid, OOM)
            elif live.pending is None:
                loop = asyncio.get_running_loop()
                live.pending = loop.call_later(self.removal_grace, self._lost, cid, EXITED)
        elif action == "destroy":
            self._lost(cid, REMOVED)
            self._oom_seen.discard(cid)
        elif action == "start":
            self._oom_seen.discard(cid)
        if action in ("resync", "start", "die", "destroy", "stop", "pause", "unpause"):
            self._dirty.set()

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.stats_interval)
            for cid, live in list(self._live.items()):
                try:
                    used, limit = await asyncio.to_thread(self._stats_blocking, cid)
                except Exception:
                    continue  # died meanwhile; the events say so
                counters = self._counters.get(live.backend_id)
                if counters is not None:
                    counters.memory_used, counters.memory_limit = used, limit
                    counters.memory_at = time.time()

    async def refresh_stats(self) -> None:
        """Read memory use now (the stats loop does this every `stats_interval`)."""
        for cid, live in list(self._live.items()):
            used, limit = await asyncio.to_thread(self._stats_blocking, cid)
            counters = self._counters[live.backend_id]
            counters.memory_used, counters.memory_limit, counters.memory_at = used, limit, time.time()

    # -- recycling (lifecycle.py): a replacement first, the old one retired once drained --

    async def replace(self, backend_id: str) -> str:
        """Add a slot whose container will take over from `backend_id`; return its id."""
        slot = self._next_slot
        self._next_slot += 1
        if self._slots is None:
            self._slots = set()
        self._slots.add(slot)
        self._dirty.set()
        return slot_backend_id(self.pool, slot)

    async def retire(self, backend_id: str) -> None:
        """Drop `backend_id`'s slot and remove its container. Its sessions were drained by the
        lifecycle: this is not a loss to report."""
        slot = next((s for s in self._slots or () if slot_backend_id(self.pool, s) == backend_id), None)
        if slot is None:
            return
        self._slots.discard(slot)
        self._specs.pop(slot, None)
        for cid, live in list(self._live.items()):
            if live.backend_id == backend_id:
                if live.pending is not None:
                    live.pending.cancel()
                del self._live[cid]
        self._counters.pop(backend_id, None)
        self.recycled_total += 1
        await self.reconcile()  # publishes the set without it and removes its container

    def memory(self, backend_id: str) -> int | None:
        """The last sampled memory use of `backend_id`'s container (every stats_interval)."""
        counters = self._counters.get(backend_id)
        return counters.memory_used if counters is not None else None

    def stats(self) -> Mapping[str, Mapping[str, Any]]:
        """Per backend, merged into the pool's row in /stats (so no key of the pool's own)."""
        out: dict[str, dict[str, Any]] = {}
        for bid, c in sorted(self._counters.items()):
            limit = c.memory_limit if c.memory_limit else self.mem_limit
            out[bid] = {
                "container": {"id": c.container_id, "name": c.container_name, "image": self.image,
                              "state": c.state, "port": c.port,
                              "docker_restart_count": c.docker_restart_count},
                "restarts": c.restarts,
                "oom_kills": c.oom_kills,
                "exits": {OOM: c.lost_oom, EXITED: c.exits, REMOVED: c.removals},
                "memory": {
                    "used_bytes": c.memory_used,
                    "limit_bytes": limit,
                    "percent": round(100.0 * c.memory_used / limit, 1)
                    if c.memory_used is not None and limit else None,
                    "sampled_at": c.memory_at,
                },
            }
        return out


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(taken: Iterable[int] = ()) -> int:
    """A loopback port free right now (bind port 0 and read it back), not in `taken`."""
    taken = set(taken)
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port
    raise RuntimeError("no free loopback port found")
