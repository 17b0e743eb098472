"""Past one engine: the launcher spreads containers over two Docker engines on one machine
(separate sockets and data roots), and stopping one fails only its sessions; containers that
others start are adopted by their `stickyproxy.port` label."""

from __future__ import annotations

import uuid

import docker
import pytest

from conftest import http_json, wait_for, wait_up
from dockerengine import build_phantomjs_image, start_engine, stop_engine
from stickyproxy.providers.docker import LABEL_POOL
from stickyproxy.providers.processes import free_port

pytestmark = [pytest.mark.functional, pytest.mark.docker]

NEW = {"desiredCapabilities": {}}


@pytest.fixture
def second_engine(docker_engine):
    engine = start_engine()  # a private dockerd of its own, stopped by PID at teardown
    client = docker.DockerClient(base_url=engine.base_url)
    try:
        yield engine, client
    finally:
        client.close()
        stop_engine(engine)


def test_containers_spread_over_two_engines_and_one_engine_fails_alone(
        stickyproxy, docker_engine, docker_client, phantomjs_image, second_engine):
    engine_b, client_b = second_engine
    image_b = build_phantomjs_image(client_b, phantomjs_image)
    pool = f"t{uuid.uuid4().hex[:8]}"
    proxy = stickyproxy("--docker", "4", "--image", phantomjs_image, "--pool", pool,
                        "--docker-host", docker_engine.base_url, "--docker-host", engine_b.base_url,
                        "--mem-limit", "256m", "--docker-cleanup", "--check-interval", "300ms",
                        "--fall", "2")
    try:
        assert image_b == phantomjs_image
        wait_up(proxy, 4, timeout=90)
        on_a = docker_client.containers.list(filters={"label": f"{LABEL_POOL}={pool}-e1"})
        on_b = client_b.containers.list(filters={"label": f"{LABEL_POOL}={pool}-e2"})
        assert len(on_a) == 2 and len(on_b) == 2  # spread evenly over both engines

        sessions = {}
        for _ in range(4):
            status, body, headers = http_json(proxy.url + "/session", "POST", NEW)
            assert status == 200
            sessions[body["sessionId"]] = headers["X-Stickyproxy-Backend"]
        assert {b.split("-e")[-1][0] for b in sessions.values()} == {"1", "2"}

        stop_engine(engine_b)  # engine 2 goes away with its containers
        for sid, backend in sessions.items():
            status, body, _ = http_json(f"{proxy.url}/session/{sid}/url", timeout=30)
            if f"{pool}-e2" in backend:
                assert status in (404, 500) and body["value"]["error"] in (
                    "unknown error", "invalid session id"), body
            else:
                assert status == 200, body  # engine 1's sessions never noticed
        wait_for(lambda: proxy.stats()["backends_up"] == 2, 30, what="engine 2's backends down")
        for _ in range(3):
            status, body, headers = http_json(proxy.url + "/session", "POST", NEW)
            assert status == 200 and f"{pool}-e1" in headers["X-Stickyproxy-Backend"]
            http_json(f"{proxy.url}/session/{body['sessionId']}", "DELETE")
    finally:
        proxy.shutdown()
        for c in docker_client.containers.list(all=True, filters={"label": f"{LABEL_POOL}={pool}-e1"}):
            c.remove(force=True)


def test_labelled_containers_are_adopted_and_lost_when_removed(stickyproxy, docker_engine,
                                                                   docker_client, phantomjs_image):
    port = free_port()
    name = f"adopt-{uuid.uuid4().hex[:8]}"
    container = docker_client.containers.run(
        phantomjs_image, ["phantomjs", f"--webdriver=127.0.0.1:{port}"], name=name, detach=True,
        network_mode="host", labels={"stickyproxy.port": str(port)})
    try:
        proxy = stickyproxy("--docker-discover", "--docker-host", docker_engine.base_url,
                            "--check-interval", "300ms")
        wait_up(proxy, 1, timeout=60)
        (row,) = proxy.stats()["backends"]
        assert row["id"] == f"labels-e1-{name}" and row["url"] == f"http://127.0.0.1:{port}"
        status, body, _ = http_json(proxy.url + "/session", "POST", NEW)
        assert status == 200
        sid = body["sessionId"]
        container.remove(force=True)  # its sessions went with it
        wait_for(lambda: proxy.stats()["backends"] == [], 30, what="removed container dropped")
        assert proxy.log(rf"SESSION_ENDED session={sid} backend=labels-e1-{name} reason=backend_down")
        status, body, _ = http_json(f"{proxy.url}/session/{sid}/url")
        assert status == 404 and "backend_down" in body["value"]["message"]
    finally:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
