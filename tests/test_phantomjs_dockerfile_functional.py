"""deploy/phantomjs/Dockerfile: the PhantomJS image for those who cannot pull wernight/phantomjs.

No registry is reachable here, so its Debian base is made locally (debootstrap, cached under
.cache/) and passed as BASE_IMAGE; apt and PyPI are reached through the host's network. The image
must answer WebDriver /status and run a session as a non-root user, with its PID 1 an init.
"""

from __future__ import annotations

import time

import pytest

from dockerengine import TEST_LABEL, build_phantomjs_dockerfile_image, wait_for
from conftest import http_json
from stickyproxy.providers.docker import free_port

pytestmark = pytest.mark.functional


def call(method: str, url: str, body=None, timeout: float = 30.0):
    return http_json(url, method, body, timeout=timeout)[:2]


def test_phantomjs_dockerfile_builds_and_serves_webdriver(docker_client, debian_image):
    started = time.monotonic()
    tag, _log = build_phantomjs_dockerfile_image(docker_client, debian_image)
    print(f"built {tag} from deploy/phantomjs/Dockerfile in {time.monotonic() - started:.1f}s")
    config = docker_client.images.get(tag).attrs["Config"]
    assert config["User"] == "65534:65534"
    assert config["Cmd"] == ["phantomjs", "--webdriver=8910"] and "8910/tcp" in config["ExposedPorts"]

    port = free_port()
    container = docker_client.containers.run(
        tag, ["phantomjs", f"--webdriver=127.0.0.1:{port}"], network_mode="host", detach=True,
        mem_limit="256m", memswap_limit="256m", labels={TEST_LABEL: "1"})
    try:
        def up():
            container.reload()
            assert container.status != "exited", container.logs().decode()[-2000:]
            try:
                return call("GET", f"http://127.0.0.1:{port}/status", timeout=2)[0] == 200
            except OSError:
                return False

        wait_for(up, 30, "PhantomJS from deploy/phantomjs/Dockerfile")
        status, body = call("POST", f"http://127.0.0.1:{port}/session", {"desiredCapabilities": {}})
        assert status == 200, body
        sid = body["sessionId"]
        status, result = call("POST", f"http://127.0.0.1:{port}/session/{sid}/execute",
                              {"script": "return navigator.userAgent;", "args": []})
        assert "PhantomJS/2.1.1" in result["value"]
        top = container.top()
        processes = [p[top["Titles"].index("CMD")] for p in top["Processes"]]
        assert "tini" in processes[0] and any("phantomjs" in p for p in processes[1:]), processes
    finally:
        container.remove(force=True)
