"""`stickyproxy serve --docker N` in front of a real Docker engine (host networking, loopback),
with the PhantomJS image built locally and real Selenium 3 clients.

Sessions are spread over the containers and stay pinned; a container pushed past its memory cap
is OOM-killed, its session ends with `backend_oom` (the client gets `invalid session id` naming
it, never another backend), the other container's session is untouched, /stats shows the OOM,
and the container comes back and takes new sessions. A restarted stickyproxy adopts the pool.
"""

from __future__ import annotations


import pytest

from conftest import http_json, wait_for, wait_up
from stickyproxy.providers.docker import LABEL_POOL

pytestmark = [pytest.mark.functional, pytest.mark.docker]

MEM_CAP = "160m"
HOG = ("window.hog = []; for (var i = 0; i < 600; i++) {"
       " window.hog.push(new Array(1 << 20).join(String.fromCharCode(65 + i % 26))); }"
       " return window.hog.length;")


def docker_proxy(stickyproxy, engine, image, pool, *extra):
    return stickyproxy("--docker", "2", "--image", image, "--pool", pool, "--docker-host",
                       engine.base_url, "--mem-limit", MEM_CAP, "--check-interval", "500ms", *extra)


def test_sessions_pinned_and_an_oom_ends_only_its_session(stickyproxy, docker_engine, docker_client,
                                                          phantomjs_image, pool, pages,
                                                          selenium3_client):
    proxy = docker_proxy(stickyproxy, docker_engine, phantomjs_image, pool)
    wait_up(proxy, 2, timeout=60)
    rows = {b["id"]: b for b in proxy.stats()["backends"]}
    assert set(rows) == {f"docker-{pool}-0", f"docker-{pool}-1"}
    for row in rows.values():
        assert row["memory"]["limit_bytes"] == 160 << 20 and row["container"]["id"]

    # Real Selenium 3 clients, concurrently: every one completes, spread evenly.
    results = selenium3_client("sessions3.py", proxy=proxy.url, page=pages + "/index.html",
                               sessions=8, concurrency=4).finish()["results"]
    assert all(r["ok"] for r in results), results
    rows = proxy.stats()["backends"]
    # Level while live (4 at a time over 2): totals may differ, as sessions end at their own pace.
    assert [b["sessions_peak"] for b in rows] == [2, 2]
    assert sum(b["sessions_total"] for b in rows) == 8
    for row in rows:  # GhostDriver at WARN: no ~1.2 kB per session kept by the engine's log driver
        logs = docker_client.containers.get(row["container"]["id"]).logs().decode()
        assert "[INFO" not in logs and len(logs) < 2000, logs[-2000:]

    # One session on each container; the first container is pushed past its cap.
    sessions = {}
    while len(sessions) < 2:
        status, body, headers = http_json(proxy.url + "/session", "POST", {"desiredCapabilities": {}})
        sessions.setdefault(headers["X-Stickyproxy-Backend"], body["sessionId"])
    victim, other = f"docker-{pool}-0", f"docker-{pool}-1"
    status, body, _ = http_json(f"{proxy.url}/session/{sessions[victim]}/execute", "POST",
                                {"script": HOG, "args": []}, timeout=60)
    assert status == 500 and victim in body["value"]["message"]

    def ended():
        status, body, _ = http_json(f"{proxy.url}/session/{sessions[victim]}/url")
        return status == 404 and body

    body = wait_for(ended, 15, what="the OOM-killed session to end")
    assert body["value"]["error"] == "invalid session id"
    assert "backend_oom" in body["value"]["message"] and victim in body["value"]["message"]
    assert http_json(f"{proxy.url}/session/{sessions[other]}/url")[0] == 200  # untouched

    def back():
        row = proxy.backend(victim)
        return row["state"] == "up" and row["restarts"] == 1 and row

    row = wait_for(back, 30, what="the OOM-killed container back and up")
    assert row["oom_kills"] == 1 and row["last_lost"] == "oom"
    assert proxy.backend(other)["oom_kills"] == 0
    assert proxy.stats()["sessions_ended"]["backend_oom"] == 1
    assert proxy.log(rf"SESSION_ENDED session={sessions[victim]} backend={victim} reason=backend_oom")
    placed = set()
    for _ in range(4):
        status, body, headers = http_json(proxy.url + "/session", "POST", {"desiredCapabilities": {}})
        assert status == 200
        placed.add(headers["X-Stickyproxy-Backend"])
        http_json(f"{proxy.url}/session/{body['sessionId']}", "DELETE")
    assert victim in placed
    http_json(f"{proxy.url}/session/{sessions[other]}", "DELETE")


def test_a_restarted_stickyproxy_adopts_its_pool(stickyproxy, docker_engine, docker_client,
                                                 phantomjs_image, pool):
    first = docker_proxy(stickyproxy, docker_engine, phantomjs_image, pool)
    wait_up(first, 2, timeout=60)
    ids = {c.id for c in docker_client.containers.list(filters={"label": f"{LABEL_POOL}={pool}"})}
    assert len(ids) == 2
    assert first.stop() == 0  # without --docker-cleanup the containers keep running
    assert {c.id for c in docker_client.containers.list(filters={"label": f"{LABEL_POOL}={pool}"})} == ids

    second = docker_proxy(stickyproxy, docker_engine, phantomjs_image, pool, "--docker-cleanup")
    wait_up(second, 2, timeout=60)
    adopted = {b["container"]["id"] for b in second.stats()["backends"]}
    assert {i[:len(next(iter(adopted)))] for i in ids} == adopted  # adopted, not new
    assert not second.log("DOCKER_ACTION action=create")
    assert second.stop() == 0
    assert docker_client.containers.list(all=True, filters={"label": f"{LABEL_POOL}={pool}"}) == []


def test_a_missing_image_stops_start_up_with_a_message(docker_engine, pool):
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "stickyproxy", "serve", "--docker", "1",
                          "--image", "127.0.0.1:9/none/such:image", "--pool", pool,
                          "--docker-host", docker_engine.base_url, "--listen", "127.0.0.1:0",
                          "--stats-listen", "127.0.0.1:0"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert "127.0.0.1:9/none/such:image" in run.stderr and "docker build" in run.stderr
