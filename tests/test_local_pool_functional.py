"""The embedded default: stickyproxy starts, caps, restarts and stops local PhantomJS processes."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from conftest import http_json, wait_for, wait_up

pytestmark = pytest.mark.functional

ALLOCATE = ("window.keep = []; for (var i = 0; i < 400; i++) "
            "{ window.keep.push(new Array(1000000).join(String.fromCharCode(65 + i % 26))); } "
            "return window.keep.length;")


def new_session(proxy):
    status, body, headers = http_json(proxy.url + "/wd/hub/session", "POST", {"desiredCapabilities": {}})
    assert status == 200, body
    return body["sessionId"], headers["X-Stickyproxy-Backend"]


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_local_pool_serves_restarts_and_stops(stickyproxy, pages, selenium3_client):
    proxy = stickyproxy("--local", "2", "--check-interval", "500ms")
    wait_up(proxy, 2)
    backends = proxy.stats()["backends"]
    assert sorted(b["id"] for b in backends) == ["local-1", "local-2"]
    pids = {b["id"]: b["pid"] for b in backends}
    for b in backends:
        assert alive(b["pid"]) and b["url"].startswith("http://127.0.0.1:")
        assert b["memory"]["limit_bytes"] == 2 << 30
        assert b["memory"]["cap"] in ("cgroup-v1", "cgroup-v2", "watchdog")

    results = selenium3_client("sessions3.py", proxy=proxy.url, page=pages + "/index.html",
                               sessions=4, concurrency=4).finish()["results"]
    assert all(r["ok"] for r in results), results
    rows = proxy.stats()["backends"]
    assert sum(b["sessions_total"] for b in rows) == 4 and max(b["sessions_peak"] for b in rows) <= 2

    # A process that dies is noticed at once, its session ends with the reason, it restarts.
    sid, backend_id = new_session(proxy)
    os.kill(pids[backend_id], signal.SIGKILL)
    wait_for(lambda: proxy.backend(backend_id)["restarts"] == 1, 15, what="restart counted")
    assert proxy.backend(backend_id)["exits"] == {"exited": 1}
    assert proxy.log(rf"BACKEND_LOST backend={backend_id} reason=exited")
    assert proxy.log(rf"SESSION_ENDED session={sid} backend={backend_id} reason=backend_down")
    status, body, _ = http_json(f"{proxy.url}/wd/hub/session/{sid}/title")
    assert status == 404 and "backend_down" in body["value"]["message"]
    wait_for(lambda: (b := proxy.backend(backend_id))["state"] == "up" and b["pid"], 30,
             what="restarted backend up")
    new_pid = proxy.backend(backend_id)["pid"]
    assert new_pid != pids[backend_id] and alive(new_pid)
    pids[backend_id] = new_pid

    # SIGTERM: exit 0, every PhantomJS it started is gone.
    assert proxy.stop(signal.SIGTERM) == 0
    assert not any(alive(pid) for pid in pids.values())
    assert proxy.log("STOPPED")


@pytest.mark.parametrize("mode, reason", [("cgroup", "oom"), ("watchdog", "memory")])
def test_memory_cap_kills_and_restarts_a_process_above_it(stickyproxy, mode, reason):
    proxy = stickyproxy("--local", "2", "--mem-limit", "200m", "--mem-enforce", mode,
                        "--check-interval", "500ms")
    wait_up(proxy, 2)
    assert {b["memory"]["cap"] for b in proxy.stats()["backends"]} <= {"cgroup-v1", "cgroup-v2", "watchdog"}
    hog, hog_backend = new_session(proxy)
    other, other_backend = new_session(proxy)
    assert hog_backend != other_backend
    status, body, _ = http_json(f"{proxy.url}/wd/hub/session/{hog}/execute", "POST",
                                {"script": ALLOCATE, "args": []}, timeout=60)
    assert status == 500 and f"its backend {hog_backend} is unavailable" in body["value"]["message"]

    wait_for(lambda: proxy.backend(hog_backend)["exits"].get(reason) == 1, 20, what="kill counted")
    assert proxy.log(rf"BACKEND_LOST backend={hog_backend} reason={reason}")
    assert proxy.log(rf"SESSION_ENDED session={hog} backend={hog_backend} reason=backend_oom")
    assert proxy.stats()["sessions_ended"]["backend_oom"] == 1
    # The other backend's session never noticed.
    status, body, _ = http_json(f"{proxy.url}/wd/hub/session/{other}/url")
    assert status == 200
    wait_for(lambda: proxy.backend(hog_backend)["state"] == "up", 30, what="back after the kill")
    http_json(f"{proxy.url}/wd/hub/session/{other}", "DELETE")


def listening_ports_here() -> set[int]:
    """TCP ports listening in this network namespace (the host's, for the test)."""
    return {c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}


def test_local_backends_are_isolated_and_still_serve(stickyproxy, pages, selenium3_client):
    """Issue 10: PhantomJS listens on 0.0.0.0 whatever it is told; in its own network namespace
    nothing it listens on exists on the host. Proven by inspecting sockets, never by traffic to
    another address."""
    proxy = stickyproxy("--local", "2", "--isolation", "require", "--check-interval", "500ms")
    wait_up(proxy, 2)
    ours = os.readlink("/proc/self/ns/net")
    here = listening_ports_here()
    for b in proxy.stats()["backends"]:
        assert b["isolated"] is True, b
        pid, port = b["pid"], b["port"]
        assert os.readlink(f"/proc/{pid}/ns/net") != ours  # another network namespace
        with open(f"/proc/{pid}/net/tcp") as f:  # its own table: it does listen there
            assert any(int(line.split()[1].split(":")[1], 16) == port and line.split()[3] == "0A"
                       for line in f.readlines()[1:])
        assert port not in here  # and nothing on the host listens on that port
        assert b["url"].startswith("http://127.0.0.1:")
    results = selenium3_client("sessions3.py", proxy=proxy.url, page=pages + "/index.html",
                               sessions=4, concurrency=2).finish()["results"]
    assert all(r["ok"] for r in results), results  # pages on the host's loopback still load


def test_isolation_off_says_which_ports_are_exposed(stickyproxy):
    proxy = stickyproxy("--local", "1", "--isolation", "off", "--check-interval", "500ms")
    wait_up(proxy, 1)
    (b,) = proxy.stats()["backends"]
    assert b["isolated"] is False and b["exposed_port"] == b["port"]
    assert proxy.log(r'ISOLATION_OFF reason="--isolation off"')
    assert proxy.log(rf"ISOLATION_OFF backend=local-1 exposed_ports={b['port']}")


def test_an_inherited_certificate_directory_is_warned_about_at_start(stickyproxy):
    proxy = stickyproxy("--local", "1", "--isolation", "off", "--check-interval", "500ms",
                        env={"SSL_CERT_DIR": "/etc/ssl/certs"})
    wait_up(proxy, 1)
    assert proxy.log(r'LOCAL_ENV_COSTLY var=SSL_CERT_DIR value="/etc/ssl/certs" browser=phantomjs')
