"""Capacity, the queue, idle reaping, recycling, the admin API and graceful shutdown, with real
PhantomJS servers and real Selenium 3 clients."""

from __future__ import annotations

import json
import signal
import socket

import pytest

from conftest import http_json, wait_for, wait_up

pytestmark = pytest.mark.functional

NEW = {"desiredCapabilities": {}}


def new_session(proxy, timeout=30):
    status, body, headers = http_json(proxy.url + "/wd/hub/session", "POST", NEW, timeout=timeout)
    assert status == 200, body
    return body["sessionId"], headers["X-Stickyproxy-Backend"]


def test_capacity_and_the_queue(stickyproxy, phantomjs, pages, selenium3_client):
    phantoms = [phantomjs(), phantomjs()]
    proxy = stickyproxy(*[a for p in phantoms for a in ("--backend", p.url)],
                        "--max-sessions", "2", "--check-interval", "500ms")
    wait_up(proxy, 2)
    results = selenium3_client("sessions3.py", proxy=proxy.url, page=pages + "/index.html",
                               sessions=8, concurrency=8).finish()["results"]
    assert all(r["ok"] for r in results), results
    stats = proxy.stats()
    assert [b["sessions_peak"] for b in stats["backends"]] == [2, 2]  # at most 4 live at once
    assert sum(b["sessions_total"] for b in stats["backends"]) == 8
    assert stats["queue"]["waited_total"] >= 4 and stats["queue"]["length"] == 0
    assert stats["queue"]["timeouts_total"] == 0


def test_queue_timeout_and_a_client_that_leaves_the_queue(stickyproxy, phantomjs):
    phantom = phantomjs()
    proxy = stickyproxy("--backend", phantom.url, "--max-sessions", "1", "--queue-timeout", "1s",
                        "--check-interval", "500ms")
    wait_up(proxy, 1)
    held, _ = new_session(proxy)

    status, body, _ = http_json(proxy.url + "/session", "POST", NEW)
    assert status == 500 and body["value"]["error"] == "session not created"
    assert "stayed full for 1s" in body["value"]["message"]
    assert proxy.stats()["queue"]["timeouts_total"] == 1

    # A client that queues and then disconnects leaves the queue at once.
    proxy_long = stickyproxy("--backend", phantom.url, "--max-sessions", "1",
                             "--queue-timeout", "60s", "--check-interval", "500ms")
    wait_up(proxy_long, 1)
    held2, _ = new_session(proxy_long)
    payload = json.dumps(NEW).encode()
    client = socket.create_connection(("127.0.0.1", proxy_long.port))
    client.sendall(b"POST /session HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%b" % (len(payload), payload))
    wait_for(lambda: proxy_long.stats()["queue"]["length"] == 1, 10, what="client queued")
    client.close()
    wait_for(lambda: proxy_long.stats()["queue"]["length"] == 0, 10, what="client left the queue")
    assert proxy_long.stats()["queue"]["abandoned_total"] == 1
    # The slot it would have had is not used behind anyone's back.
    http_json(f"{proxy_long.url}/session/{held2}", "DELETE")
    http_json(f"{proxy.url}/session/{held}", "DELETE")
    assert phantom.sessions() == []
    assert proxy_long.stats()["sessions_total"] == 1


def test_abandoned_session_is_deleted_on_its_backend_after_the_idle_timeout(
        stickyproxy, phantomjs, pages, selenium3_client):
    phantom = phantomjs()
    proxy = stickyproxy("--backend", phantom.url, "--session-idle-timeout", "1s",
                        "--check-interval", "500ms")
    wait_up(proxy, 1)
    results = selenium3_client("sessions3.py", proxy=proxy.url, page=pages + "/index.html",
                               sessions=1, abandon=True).finish()["results"]
    sid = results[0]["id"]
    assert results[0]["ok"] and sid in phantom.sessions()  # the client left it open
    wait_for(lambda: sid not in phantom.sessions(), 10, what="idle session deleted on the backend")
    assert proxy.stats()["sessions_ended"]["idle"] == 1
    assert proxy.log(rf"SESSION_ENDED session={sid} backend=static-1 reason=idle")
    status, body, _ = http_json(f"{proxy.url}/wd/hub/session/{sid}/title")
    assert status == 404 and "idle" in body["value"]["message"]
    assert "no command for 1s" in body["value"]["message"]


def test_idle_reaping_and_max_age_both_off(stickyproxy, phantomjs):
    # 0 turns each limit off; with both off the proxy once failed to start at all.
    phantom = phantomjs()
    proxy = stickyproxy("--backend", phantom.url, "--session-idle-timeout", "0",
                        "--session-max-age", "0")
    wait_up(proxy, 1)
    sid, _ = new_session(proxy)
    assert http_json(f"{proxy.url}/session/{sid}/title")[0] == 200
    assert http_json(f"{proxy.url}/session/{sid}", "DELETE")[0] == 200
    ended = proxy.stats()["sessions_ended"]
    assert ended["client_delete"] == 1 and sum(ended.values()) == 1


def test_recycling_restarts_every_backend_without_failing_a_session(stickyproxy, pages,
                                                                    selenium3_client):
    proxy = stickyproxy("--local", "2", "--recycle-after-sessions", "3",
                        "--check-interval", "300ms")
    wait_up(proxy, 2)
    first_pids = {b["id"]: b["pid"] for b in proxy.stats()["backends"]}
    results = selenium3_client("sessions3.py", proxy=proxy.url, page=pages + "/index.html",
                               sessions=14, concurrency=2).finish()["results"]
    assert all(r["ok"] for r in results), [r for r in results if not r["ok"]]

    def originals_replaced():
        stats = proxy.stats()
        ids = {b["id"] for b in stats["backends"]}
        return not ids & set(first_pids) and stats["backends_up"] == 2 and stats

    stats = wait_for(originals_replaced, 30, what="both original backends recycled")
    assert stats["recycled_total"] >= 2  # local-1 and local-2 were replaced...
    assert not {b["pid"] for b in stats["backends"]} & set(first_pids.values())  # ...by new processes
    for backend_id in first_pids:
        assert proxy.log(rf'BACKEND_DRAINING backend={backend_id} reason="recycling: created \d+ sessions')
        assert proxy.log(rf"BACKEND_RECYCLED backend={backend_id}")
    assert stats["sessions_ended"]["client_delete"] == 14
    assert sum(stats["sessions_ended"].values()) == 14


def test_a_fresh_process_per_session_new_sessions_wait_for_the_replacements(stickyproxy):
    """--recycle-after-sessions 1: each backend drains after its first session and a new one
    starts. A new session that came while the only backends up were draining failed at once
    ("no backend can take a new session"), though their replacements were starting: it waits
    for one now, and each session gets a process of its own."""
    proxy = stickyproxy("--local", "1", "--recycle-after-sessions", "1", "--max-recycling", "10",
                        "--check-interval", "300ms", "--queue-timeout", "60s")
    wait_up(proxy, 1)
    held = [new_session(proxy, timeout=90) for _ in range(3)]  # all live: none is recycled yet
    assert len({backend for _, backend in held}) == 3, held
    pids = {b["id"]: b["pid"] for b in proxy.stats()["backends"]}
    assert len({pids[backend] for _, backend in held}) == 3
    assert proxy.stats()["queue"]["waited_total"] >= 1  # (it waited, it did not fail)
    for sid, _ in held:
        assert http_json(f"{proxy.url}/wd/hub/session/{sid}", "DELETE")[0] == 200


def test_admin_api(stickyproxy, phantomjs):
    phantoms = [phantomjs(), phantomjs()]
    proxy = stickyproxy(*[a for p in phantoms for a in ("--backend", p.url)],
                        "--admin-token", "s3cret", "--check-interval", "500ms")
    wait_up(proxy, 2)
    admin = proxy.stats_url + "/admin"
    assert http_json(admin + "/sessions")[0] == 401
    status, _, headers = http_json(admin + "/sessions", headers={"Authorization": "Bearer nope"})
    assert status == 401 and "Bearer" in headers["WWW-Authenticate"]
    auth = {"Authorization": "Bearer s3cret"}

    sid, backend = new_session(proxy)
    status, body, _ = http_json(admin + "/sessions", headers=auth)
    assert status == 200 and [s["id"] for s in body["sessions"]] == [sid]

    # Drain: no new sessions there, its live one still served.
    status, body, _ = http_json(f"{admin}/backends/{backend}/drain", "POST", b"", auth)
    assert status == 200 and body["admin"] == "drain"
    for _ in range(3):
        other, placed = new_session(proxy)
        assert placed != backend
        http_json(f"{proxy.url}/session/{other}", "DELETE")
    assert http_json(f"{proxy.url}/session/{sid}/url")[0] == 200
    assert http_json(f"{admin}/backends/{backend}/undrain", "POST", b"", auth)[1]["admin"] == "ready"

    # Delete a session: gone from its backend, ended with reason admin.
    status, body, _ = http_json(f"{admin}/sessions/{sid}", "DELETE", headers=auth)
    assert status == 200
    owner = next(p for p in phantoms if p.url == proxy.backend(backend)["url"])
    wait_for(lambda: sid not in owner.sessions(), 10, what="admin delete reached the backend")
    assert proxy.stats()["sessions_ended"]["admin"] == 1
    assert http_json(f"{admin}/sessions/{sid}", "DELETE", headers=auth)[0] == 404


def test_admin_api_is_off_without_a_token(stickyproxy, phantomjs):
    proxy = stickyproxy("--backend", phantomjs().url)
    status, body, _ = http_json(proxy.stats_url + "/admin/sessions")
    assert status == 403 and "--admin-token" in body["error"]


def test_sigterm_lets_live_sessions_finish_then_leaves_nothing_behind(
        stickyproxy, phantomjs, pages, selenium3_client):
    phantoms = [phantomjs(), phantomjs()]
    proxy = stickyproxy(*[a for p in phantoms for a in ("--backend", p.url)],
                        "--drain-timeout", "60s", "--check-interval", "500ms")
    wait_up(proxy, 2)
    client = selenium3_client("sessions3.py", proxy=proxy.url, page=pages + "/index.html",
                              sessions=4, hold=True)
    held = client.read_json()["held"]
    proxy.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: proxy.log("DRAINING sessions=4"), 10, what="draining")
    status, body, _ = http_json(proxy.url + "/session", "POST", NEW)
    assert status == 500 and "shutting down" in body["value"]["message"]
    client.send()
    results = client.finish()["results"]
    assert all(r["ok"] for r in results), results  # the live sessions finished normally
    assert proxy.proc.wait(30) == 0
    assert all(p.sessions() == [] for p in phantoms)
    assert set(held) == {r["id"] for r in results}


def test_sigterm_deletes_sessions_still_open_at_the_drain_timeout(stickyproxy, phantomjs):
    phantom = phantomjs()
    proxy = stickyproxy("--backend", phantom.url, "--drain-timeout", "500ms",
                        "--check-interval", "500ms")
    wait_up(proxy, 1)
    sids = [new_session(proxy)[0] for _ in range(2)]
    assert set(sids) <= set(phantom.sessions())
    assert proxy.stop(signal.SIGTERM) == 0
    assert phantom.sessions() == []
    assert len(proxy.log(r'SESSION_ENDED .* reason=shutdown detail="still open 500ms after '
                         r'SIGTERM"')) == 2


def test_a_second_signal_deletes_the_sessions_at_once_and_says_so(stickyproxy, phantomjs):
    phantom = phantomjs()
    proxy = stickyproxy("--backend", phantom.url, "--drain-timeout", "60s",
                        "--check-interval", "500ms")
    wait_up(proxy, 1)
    new_session(proxy)
    proxy.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: proxy.log("DRAINING sessions=1"), 10, what="draining")
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(30) == 0
    assert phantom.sessions() == []
    assert proxy.log(r'SESSION_ENDED .* reason=shutdown detail="still open at a second signal, '
                     r'[0-9mhs]+ after the first"')  # (it used to say "1m after SIGTERM")
