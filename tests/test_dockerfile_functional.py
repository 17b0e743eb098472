"""The repository's Dockerfile: it builds on a locally made Python base (no registry here), runs
as non-root, passes its own HEALTHCHECK and serves WebDriver sessions from inside the container
(host networking on loopback ports; PhantomJS from the image's `phantomjs` extra, `--local 1`).
"""

from __future__ import annotations

import time

import pytest

from dockerengine import TEST_LABEL, build_stickyproxy_image, wait_for
from conftest import http_json
from stickyproxy.providers.docker import free_port

pytestmark = pytest.mark.functional


def call(method: str, url: str, body=None, timeout: float = 30.0):
    return http_json(url, method, body, timeout=timeout)[:2]


@pytest.fixture(scope="module")
def stickyproxy_image(docker_client, python_image):
    started = time.monotonic()
    tag, _log = build_stickyproxy_image(docker_client, python_image)
    print(f"built {tag} from the Dockerfile in {time.monotonic() - started:.1f}s")
    return tag


def test_image_is_non_root_with_ports_and_healthcheck(docker_client, stickyproxy_image):
    config = docker_client.images.get(stickyproxy_image).attrs["Config"]
    assert config["User"] == "10001:10001"
    assert set(config["ExposedPorts"]) == {"8910/tcp", "8911/tcp"}
    test = config["Healthcheck"]["Test"]
    assert test[:2] == ["CMD", "python3"] and "/healthz" in test[-1] and "curl" not in " ".join(test)
    assert config["Entrypoint"] == ["stickyproxy"] and config["Cmd"] == ["serve"]


def test_container_serves_sessions_and_is_healthy(docker_client, stickyproxy_image):
    port, stats_port = free_port(), free_port()
    container = docker_client.containers.run(
        stickyproxy_image,
        ["serve", f"--listen=127.0.0.1:{port}", f"--stats-listen=127.0.0.1:{stats_port}", "--local=1",
         "--check-interval=1s", "--rise=1"],
        network_mode="host", detach=True, environment={"STATS_PORT": str(stats_port)},
        labels={TEST_LABEL: "1"})
    try:
        def healthz():
            container.reload()
            if container.status == "exited":
                raise AssertionError(f"stickyproxy exited:\n{container.logs().decode()[-3000:]}")
            try:
                return call("GET", f"http://127.0.0.1:{stats_port}/healthz", timeout=2)[0] == 200
            except OSError:
                return False

        wait_for(healthz, 60, "stickyproxy's /healthz inside the container")
        # The image's own HEALTHCHECK command, run as Docker would run it.
        test = docker_client.images.get(stickyproxy_image).attrs["Config"]["Healthcheck"]["Test"]
        exit_code, output = container.exec_run(test[1:], environment={"STATS_PORT": str(stats_port)})
        assert exit_code == 0, output
        assert container.exec_run(["python3", "-c", "import os; print(os.getuid())"]).output.strip() == b"10001"

        def session():
            try:
                status, body = call("POST", f"http://127.0.0.1:{port}/session",
                                    {"desiredCapabilities": {}})
            except OSError:
                return None
            return body if status == 200 else None

        body = wait_for(session, 60, "a session through the containerised proxy", interval=0.5)
        sid = body.get("sessionId") or body["value"]["sessionId"]
        status, result = call("POST", f"http://127.0.0.1:{port}/session/{sid}/execute",
                              {"script": "return 6 * 7;", "args": []})
        assert status == 200 and result["value"] == 42
        status, _ = call("DELETE", f"http://127.0.0.1:{port}/session/{sid}")
        assert status == 200
    except BaseException:
        print(container.logs().decode()[-5000:])
        raise
    finally:
        container.remove(force=True)
