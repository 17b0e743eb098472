"""A backend dies mid-session: its sessions get a clear error at once, the others finish, new
sessions avoid it after `fall` failed checks, and it is back after `rise` good ones."""

from __future__ import annotations

import signal
import time

import pytest

from conftest import http_json, wait_for, wait_up
from stickyproxy.providers.processes import free_port

pytestmark = pytest.mark.functional


def test_killed_backend(stickyproxy, phantomjs, pages, selenium3_client):
    phantoms = [phantomjs() for _ in range(3)]
    proxy = stickyproxy(*[a for p in phantoms for a in ("--backend", p.url)],
                        "--check-interval", "300ms", "--check-timeout", "2s",
                        "--fall", "3", "--rise", "2")
    wait_up(proxy, 3)
    client = selenium3_client("sessions3.py", proxy=proxy.url, page=pages + "/index.html",
                              sessions=6, hold=True)
    held = client.read_json()["held"]
    victim = phantoms[0]
    doomed = set(victim.sessions()) & set(held)
    assert len(doomed) == 2  # six sessions, three backends, placed evenly
    victim_id = next(b["id"] for b in proxy.stats()["backends"] if b["url"] == victim.url)

    victim.kill(signal.SIGKILL)
    client.send()
    results = {r["id"]: r for r in client.finish()["results"]}

    for sid, result in results.items():
        if sid in doomed:
            assert not result["ok"]
            assert f"its backend {victim_id} is unavailable" in result["error"], result
            assert "never moves a session" in result["error"]
            assert result["seconds"] < 10, result  # an error, not a hang
        else:
            assert result["ok"], result
    # Nothing was sent to another backend: the survivors never saw the doomed sessions.
    for p in phantoms[1:]:
        assert not (set(p.sessions()) & doomed)

    # Down after `fall` failed checks, with the reason kept; new sessions avoid it meanwhile.
    wait_for(lambda: proxy.backend(victim_id)["state"] == "down", 15, what="victim down")
    check = proxy.backend(victim_id)["last_check"]
    assert check["ok"] is False and check["result"] == "refused"
    assert proxy.log(rf"BACKEND_DOWN backend={victim_id} check=refused")
    for _ in range(4):
        status, body, headers = http_json(proxy.url + "/session", "POST", {"desiredCapabilities": {}})
        assert status == 200 and headers["X-Stickyproxy-Backend"] != victim_id
        http_json(f"{proxy.url}/session/{body['sessionId']}", "DELETE")

    # Restarted on its port: up again after `rise` good checks, and takes new sessions again.
    restarted = phantomjs(victim.port)
    wait_for(lambda: proxy.backend(victim_id)["state"] == "up", 15, what="victim up again")
    assert proxy.log(rf"BACKEND_UP backend={victim_id}")
    # It came back without its old sessions: their pins end, counted and logged with the reason.
    wait_for(lambda: proxy.stats()["sessions_ended"]["backend_down"] == 2, 10, what="pins ended")
    assert len(proxy.log(rf"SESSION_ENDED session=.* backend={victim_id} reason=backend_down")) == 2
    status, body, _ = http_json(f"{proxy.url}/wd/hub/session/{doomed.pop()}/title")
    assert status == 404 and "backend_down" in body["value"]["message"]
    placed = set()
    sids = []
    for _ in range(6):
        status, body, headers = http_json(proxy.url + "/session", "POST", {"desiredCapabilities": {}})
        assert status == 200
        placed.add(headers["X-Stickyproxy-Backend"])
        sids.append(body["sessionId"])
    assert victim_id in placed
    for sid in sids:
        http_json(f"{proxy.url}/session/{sid}", "DELETE")
    assert restarted.sessions() == []


def test_new_session_is_retried_only_when_the_backend_never_saw_it(stickyproxy, phantomjs):
    alive = phantomjs()
    dead = phantomjs()
    proxy = stickyproxy("--backend", dead.url, "--backend", alive.url,
                        "--check-interval", "60s")  # checks must not notice in time
    wait_up(proxy, 2)
    dead.kill()
    started = time.monotonic()
    for _ in range(4):  # some land on the dead one first: connection refused -> next backend
        status, body, headers = http_json(proxy.url + "/session", "POST", {"desiredCapabilities": {}})
        assert status == 200, body
        assert headers["X-Stickyproxy-Backend"] == "static-2"
    assert time.monotonic() - started < 10
    assert proxy.log(r'SESSION_RETRY backend=static-1 reason="connection refused"')
    assert len(alive.sessions()) == 4


def test_a_killed_backend_with_warm_connections_still_sends_new_sessions_elsewhere(
        stickyproxy, phantomjs):
    """New sessions reuse a connection answered in the last 2 s: a backend killed right after
    it answered must still lose no new session (its kept-alive connections break unanswered,
    the fresh connect is refused, the session goes to the other backend)."""
    alive = phantomjs()
    dead = phantomjs()
    proxy = stickyproxy("--backend", dead.url, "--backend", alive.url, "--check-interval", "60s")
    wait_up(proxy, 2)
    held = []
    for _ in range(2):  # fewest live sessions: one on each, then both connections kept alive
        status, body, headers = http_json(proxy.url + "/session", "POST", {"desiredCapabilities": {}})
        assert status == 200, body
        held.append((body["sessionId"], headers["X-Stickyproxy-Backend"]))
    assert {b for _, b in held} == {"static-1", "static-2"}
    for sid, _ in held:
        assert http_json(f"{proxy.url}/session/{sid}", "DELETE")[0] == 200
    dead.kill(signal.SIGKILL)
    for _ in range(4):
        status, body, headers = http_json(proxy.url + "/session", "POST", {"desiredCapabilities": {}})
        assert status == 200, body
        assert headers["X-Stickyproxy-Backend"] == "static-2"
    assert len(alive.sessions()) == 4


def test_no_backend_up_gives_session_not_created(stickyproxy, phantomjs):
    phantom = phantomjs()
    proxy = stickyproxy("--backend", phantom.url, "--check-interval", "200ms", "--fall", "1")
    wait_up(proxy, 1)
    phantom.kill()
    wait_for(lambda: proxy.stats()["backends_up"] == 0, 10, what="backend down")
    status, body, _ = http_json(proxy.url + "/session", "POST", {"desiredCapabilities": {}})
    assert status == 500
    assert body["value"]["error"] == "session not created"
    assert "static-1 down (connection refused)" in body["value"]["message"]
    status, body, _ = http_json(proxy.url + "/status")
    assert body["value"]["ready"] is False


def test_a_backend_that_starts_after_the_proxy_is_used_once_it_answers(stickyproxy, phantomjs):
    # docker-compose starts stickyproxy and its PhantomJS services together: the first checks
    # find nothing listening. With the default interval (10 s) and rise (2), counting those
    # failures against the backend would keep it out for 20 s after it is ready.
    port = free_port()
    proxy = stickyproxy("--backend", f"http://127.0.0.1:{port}")
    wait_for(lambda: proxy.stats()["backends"][0]["state"] == "down", 10, what="first check failed")
    phantomjs(port)
    wait_up(proxy, 1, timeout=8)  # the next checks come within 0.25-4 s while it starts
    status, body, _ = http_json(proxy.url + "/session", "POST", {"desiredCapabilities": {}})
    assert status == 200, body
    http_json(f"{proxy.url}/session/{body['sessionId']}", "DELETE")
