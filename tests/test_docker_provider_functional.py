"""DockerProvider against a real Docker engine: the locally built PhantomJS image, host networking
on loopback, one pool name per test, and a fake sink that records publish/lost calls.

docker-py is blocking and must stay in threads: every test fails if a Docker API request was sent
from a thread running an event loop, or if any loop callback took longer than SLOW seconds (each
test runs its own loop in debug mode).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time

import aiohttp
import docker.api.client
import pytest

from conftest import eventually
from stickyproxy.providers import BackendSpec
from stickyproxy.providers.docker import (
    LABEL_POOL,
    DockerProvider,
    ImageUnavailable,
    free_port,
)

pytestmark = pytest.mark.functional

MEM_CAP = 160 * 1024 * 1024
SLOW = 0.25  # seconds a loop callback may take; docker calls take longer than that
TEST_TIMEOUT = 60.0  # one test's event loop, at most
# Grows the page's heap past MEM_CAP: ~1 MiB strings kept reachable from window.
HOG = ("window.hog = []; for (var i = 0; i < 600; i++) {"
       " window.hog.push(new Array(1 << 20).join(String.fromCharCode(65 + i % 26))); }"
       " return window.hog.length;")


class FakeSink:
    """Records what the provider tells the pool."""

    def __init__(self) -> None:
        self.published: list[list[BackendSpec]] = []
        self.losses: list[tuple[str, str]] = []

    def publish(self, source, specs) -> None:
        assert source == "docker"
        self.published.append(list(specs))

    def lost(self, backend_id, reason) -> None:
        self.losses.append((backend_id, reason))

    @property
    def current(self) -> dict[str, BackendSpec]:
        return {s.id: s for s in (self.published[-1] if self.published else [])}


# -- helpers ---------------------------------------------------------------------------------------


class _SlowCallbacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "took" in message and "Executing" in message:
            self.messages.append(message)


@pytest.fixture(autouse=True)
def docker_calls_off_the_loop(monkeypatch):
    """Record every Docker API request sent from a thread that runs an event loop."""
    offenders: list[str] = []
    send = docker.api.client.APIClient.send

    def guarded(self, request, **kwargs):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            offenders.append(f"{request.method} {request.path_url}")
        return send(self, request, **kwargs)

    monkeypatch.setattr(docker.api.client.APIClient, "send", guarded)
    yield
    assert not offenders, f"Docker API called on the event loop: {offenders}"


def run(coro):
    """asyncio.run in debug mode; fail when a callback blocked the loop."""
    slow = _SlowCallbacks()
    logger = logging.getLogger("asyncio")
    logger.addHandler(slow)

    async def main():
        asyncio.get_running_loop().slow_callback_duration = SLOW
        async with asyncio.timeout(TEST_TIMEOUT):
            return await coro

    try:
        result = asyncio.run(main(), debug=True)
    finally:
        logger.removeHandler(slow)
    assert not slow.messages, f"the event loop was blocked: {slow.messages}"
    return result


class Running:
    """A provider's run() as a task, cancelled and closed on exit."""

    def __init__(self, provider: DockerProvider, sink: FakeSink) -> None:
        self.provider, self.sink = provider, sink

    async def __aenter__(self):
        self.task = asyncio.create_task(self.provider.run(self.sink), name="provider-under-test")
        return self

    async def __aexit__(self, *exc):
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # the test's own timeout: do not swallow it
        finally:
            await self.provider.close()

    async def up(self, count: int, timeout: float = 30.0) -> dict[str, BackendSpec]:
        def ready():
            if self.task.done():
                self.task.result()  # raise what run() raised
            return len(self.sink.current) == count and self.sink.current
        return await eventually(ready, timeout, f"{count} backends published")


def http_client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))


async def status(session: aiohttp.ClientSession, url: str) -> dict | None:
    try:
        async with session.get(f"{url}/status", timeout=aiohttp.ClientTimeout(total=2)) as r:
            return await r.json(content_type=None) if r.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


async def answers(session: aiohttp.ClientSession, url: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = await status(session, url)
        if body is not None:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url}/status did not answer within {timeout}s")


async def new_session(session: aiohttp.ClientSession, url: str) -> str:
    async with session.post(f"{url}/session", json={"desiredCapabilities": {}}) as r:
        body = await r.json(content_type=None)
    assert r.status == 200, body
    return body["sessionId"]


def provider(image, pool, docker_engine, count=2, **kw) -> DockerProvider:
    kw.setdefault("mem_limit", MEM_CAP)
    return DockerProvider(count, image=image, pool=pool, base_url=docker_engine.base_url,
                          resync_interval=1.0, stats_interval=60.0, **kw)


def pool_containers(docker_client, pool):
    return docker_client.containers.list(all=True, filters={"label": f"{LABEL_POOL}={pool}"})


# -- tests -----------------------------------------------------------------------------------------


def test_pool_comes_up_capped_labelled_and_answering(docker_engine, docker_client, phantomjs_image, pool):
    p = provider(phantomjs_image, pool, docker_engine, count=2)

    async def main():
        async with Running(p, FakeSink()) as running, http_client() as http:
            specs = await running.up(2)
            assert sorted(specs) == [f"docker-{pool}-0", f"docker-{pool}-1"]
            for spec in specs.values():
                body = await answers(http, spec.url)
                assert body["value"]["build"]["version"]  # GhostDriver's /status
                assert spec.url.startswith("http://127.0.0.1:")
                assert spec.source == "docker" and spec.generation
            await p.refresh_stats()
            return specs, p.stats()

    specs, stats = run(main())
    containers = {c.name: c for c in pool_containers(docker_client, pool)}
    assert sorted(containers) == [f"stickyproxy-{pool}-0", f"stickyproxy-{pool}-1"]
    for slot in (0, 1):
        c = containers[f"stickyproxy-{pool}-{slot}"]
        host = c.attrs["HostConfig"]
        assert host["Memory"] == MEM_CAP and host["MemorySwap"] == MEM_CAP
        assert host["RestartPolicy"]["Name"] == "always"
        assert host["NetworkMode"] == "host"
        labels = c.labels
        assert labels[LABEL_POOL] == pool and labels["stickyproxy.slot"] == str(slot)
        spec = specs[f"docker-{pool}-{slot}"]
        assert spec.url == f"http://127.0.0.1:{labels['stickyproxy.port']}"
        assert spec.meta["container_id"] == c.id[:12] and spec.meta["mem_limit"] == MEM_CAP
        s = stats[spec.id]
        assert s["container"]["id"] == c.id[:12] and s["container"]["name"] == c.name
        assert s["container"]["state"] == "running" and s["container"]["image"] == phantomjs_image
        assert s["memory"]["limit_bytes"] == MEM_CAP
        assert 0 < s["memory"]["used_bytes"] < MEM_CAP
        assert s["restarts"] == 0 and s["oom_kills"] == 0
        assert s["exits"] == {"oom": 0, "exited": 0, "removed": 0}


def test_oom_kill_is_reported_counted_and_the_backend_comes_back(docker_engine, phantomjs_image, pool):
    p = provider(phantomjs_image, pool, docker_engine, count=2)
    sink = FakeSink()
    victim, bystander = f"docker-{pool}-0", f"docker-{pool}-1"

    async def main():
        async with Running(p, sink) as running, http_client() as http:
            specs = await running.up(2)
            for spec in specs.values():
                await answers(http, spec.url)
            doomed = await new_session(http, specs[victim].url)
            survivor = await new_session(http, specs[bystander].url)
            with pytest.raises((aiohttp.ClientError, asyncio.TimeoutError)):
                async with http.post(f"{specs[victim].url}/session/{doomed}/execute",
                                     json={"script": HOG, "args": []},
                                     timeout=aiohttp.ClientTimeout(total=60)) as r:
                    raise AssertionError(f"survived the allocation: {r.status} {await r.text()}")
            await eventually(lambda: (victim, "oom") in sink.losses, 15, "lost(victim, oom)")
            # Docker's restart policy brings it back: a new generation is published and answers.
            back = await eventually(
                lambda: sink.current.get(victim) if sink.current.get(victim) and
                sink.current[victim].generation != specs[victim].generation else None,
                20, "the victim published again with a new generation")
            await answers(http, back.url)
            # The other container and its session were untouched.
            async with http.get(f"{specs[bystander].url}/session/{survivor}/url") as r:
                assert r.status == 200, await r.text()
            assert sink.current[bystander] == specs[bystander]
            return p.stats()

    stats = run(main())
    assert sink.losses == [(victim, "oom")]
    assert stats[victim]["oom_kills"] == 1 and stats[victim]["restarts"] == 1
    assert stats[victim]["exits"] == {"oom": 1, "exited": 0, "removed": 0}
    assert stats[victim]["container"]["state"] == "running"
    assert stats[bystander]["oom_kills"] == 0 and stats[bystander]["restarts"] == 0


def test_container_removed_by_hand_is_replaced(docker_engine, docker_client, phantomjs_image, pool):
    p = provider(phantomjs_image, pool, docker_engine, count=1)
    sink = FakeSink()
    bid = f"docker-{pool}-0"

    async def main():
        async with Running(p, sink) as running, http_client() as http:
            specs = await running.up(1)
            old = specs[bid]
            await asyncio.to_thread(docker_client.api.remove_container,
                                    old.meta["container_id"], force=True)
            await eventually(lambda: (bid, "removed") in sink.losses, 10, "lost(removed)")
            new = await eventually(
                lambda: sink.current.get(bid) if sink.current.get(bid) and
                sink.current[bid].meta["container_id"] != old.meta["container_id"] else None,
                20, "a replacement container published")
            await answers(http, new.url)
            # Same slot, same loopback port: the pool keeps the backend's record.
            assert new.url == old.url and new.generation != old.generation
            # It stayed published while it was replaced (the pool held it down after lost()).
            assert all(bid in {s.id for s in specs} for specs in sink.published)
            return p.stats()

    stats = run(main())
    assert sink.losses == [(bid, "removed")]
    assert stats[bid]["exits"] == {"oom": 0, "exited": 0, "removed": 1}
    assert stats[bid]["restarts"] == 1
    assert len(pool_containers(docker_client, pool)) == 1


def test_second_instance_adopts_the_running_pool(docker_engine, docker_client, phantomjs_image, pool):
    first = provider(phantomjs_image, pool, docker_engine, count=2)
    second = provider(phantomjs_image, pool, docker_engine, count=2)

    async def main():
        async with Running(first, FakeSink()) as running:
            before = await running.up(2)
        # first closed without cleanup: its containers keep running for the next start.
        sink = FakeSink()
        async with Running(second, sink) as running, http_client() as http:
            after = await running.up(2)
            for spec in after.values():
                await answers(http, spec.url)
            await asyncio.sleep(1.5)  # one more re-list pass: still nothing started
            return before, after, sink

    before, after, sink = run(main())
    assert after == before  # same containers, same generations, same urls
    assert len(sink.published) == 1 and sink.losses == []
    assert sorted(c.id for c in pool_containers(docker_client, pool)) == \
        sorted(next(c.id for c in pool_containers(docker_client, pool)
                    if c.id.startswith(s.meta["container_id"])) for s in before.values())


def test_changed_settings_replace_adopted_containers(docker_engine, docker_client, phantomjs_image, pool):
    first = provider(phantomjs_image, pool, docker_engine, count=1)
    second = provider(phantomjs_image, pool, docker_engine, count=1, mem_limit=MEM_CAP * 2)

    async def main():
        async with Running(first, FakeSink()) as running:
            before = await running.up(1)
        async with Running(second, FakeSink()) as running:
            await running.up(1)
            return before, await eventually(
                lambda: running.sink.current.get(f"docker-{pool}-0") if
                running.sink.current[f"docker-{pool}-0"].meta["mem_limit"] == MEM_CAP * 2 else None,
                10, "the new cap published")

    before, after = run(main())
    assert after.meta["container_id"] != before[f"docker-{pool}-0"].meta["container_id"]
    [c] = pool_containers(docker_client, pool)
    assert c.attrs["HostConfig"]["Memory"] == MEM_CAP * 2


def test_cleanup_removes_only_this_pools_containers(docker_engine, docker_client, phantomjs_image, pool):
    other_pool = f"{pool}x"
    cleaned = provider(phantomjs_image, pool, docker_engine, count=2, cleanup=True)
    kept = provider(phantomjs_image, other_pool, docker_engine, count=1, cleanup=False)
    bystander = docker_client.containers.create(
        phantomjs_image, ["phantomjs", f"--webdriver=127.0.0.1:{free_port()}"],
        network_mode="host", labels={"stickyproxy.test": pool})
    try:
        async def main():
            async with Running(cleaned, FakeSink()) as a, Running(kept, FakeSink()) as b:
                await a.up(2)
                await b.up(1)

        run(main())
        assert pool_containers(docker_client, pool) == []
        assert len(pool_containers(docker_client, other_pool)) == 1
        bystander.reload()  # raises NotFound if the cleanup took it
    finally:
        bystander.remove(force=True)
        for c in pool_containers(docker_client, other_pool):
            c.remove(force=True)


def test_missing_image_that_cannot_be_pulled_names_it_and_how_to_build(docker_engine, pool):
    # A registry on a closed loopback port: the pull fails at once and never leaves the machine.
    image = f"127.0.0.1:{free_port()}/stickyproxy-test/missing:1"
    progress = io.StringIO()
    p = DockerProvider(1, image=image, pool=pool, base_url=docker_engine.base_url, progress=progress)
    sink = FakeSink()

    async def main():
        try:
            await p.run(sink)
        finally:
            await p.close()

    with pytest.raises(ImageUnavailable) as raised:
        run(main())
    message = str(raised.value)
    assert image in message
    assert f"docker build -t {image} deploy/phantomjs" in message and "docker load" in message
    assert f"pulling {image}" in progress.getvalue()
    assert sink.published == [] and sink.losses == []


def test_recycling_replaces_then_retires_without_a_loss(docker_engine, docker_client, phantomjs_image, pool):
    p = provider(phantomjs_image, pool, docker_engine, count=1)
    sink = FakeSink()
    old = f"docker-{pool}-0"

    async def main():
        async with Running(p, sink) as running, http_client() as http:
            await running.up(1)
            new = await p.replace(old)
            specs = await running.up(2)
            await answers(http, specs[new].url)
            await p.retire(old)
            assert list(sink.current) == [new]
            return new, specs

    new, specs = run(main())
    assert new == f"docker-{pool}-1"
    assert sink.losses == []
    [c] = pool_containers(docker_client, pool)
    assert c.id.startswith(specs[new].meta["container_id"])
    assert p.recycled_total == 1 and old not in p.stats()
