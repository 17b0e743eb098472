"""Authentication on the WebDriver port, with real PhantomJS and a real Selenium 3 client."""

from __future__ import annotations

import base64

import pytest

from conftest import http_json, wait_up
from stickyproxy.auth import hash_password

pytestmark = pytest.mark.functional

NEW = {"desiredCapabilities": {}}
TOKEN = "t0ken-Zq8"


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def users_file(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"alice:{hash_password('wonderland', 1000)}\nbob:{hash_password('builder', 1000)}\n")
    return str(path)


def test_token_required_and_checked(stickyproxy, shared_phantoms, pages, selenium3_client):
    proxy = stickyproxy("--backend", shared_phantoms[0].url, "--auth-token", TOKEN,
                        "--check-interval", "1s")
    wait_up(proxy, 1)
    status, body, headers = http_json(proxy.url + "/session", "POST", NEW)
    assert status == 401 and "Basic" in headers["WWW-Authenticate"] and "Bearer" in headers["WWW-Authenticate"]
    assert "authentication required (no credentials)" in body["value"]["message"]
    status, body, _ = http_json(proxy.url + "/session", "POST", NEW, {"Authorization": "Bearer nope"})
    assert status == 401 and "wrong token" in body["value"]["message"]
    assert http_json(proxy.url + "/status")[0] == 200  # for load balancers' health checks

    status, body, _ = http_json(proxy.url + "/session", "POST", NEW, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    sid = body["sessionId"]
    assert http_json(f"{proxy.url}/session/{sid}/url")[0] == 401  # every command, not only new ones
    assert http_json(f"{proxy.url}/session/{sid}/url", headers=basic("anyone", TOKEN))[0] == 200
    http_json(f"{proxy.url}/session/{sid}", "DELETE", headers={"Authorization": f"Bearer {TOKEN}"})

    # Selenium 3 can only send Basic credentials, from the URL.
    authed = proxy.url.replace("http://", f"http://selenium:{TOKEN}@")
    results = selenium3_client("sessions3.py", proxy=authed, page=pages + "/index.html",
                               sessions=2, concurrency=2).finish()["results"]
    assert all(r["ok"] for r in results), results

    assert proxy.stats()["refused"]["auth"] == 3
    assert len(proxy.log("REFUSED reason=auth")) == 3
    assert not any(TOKEN in line for line in proxy.lines)  # credentials are never logged


def test_sessions_belong_to_the_user_that_created_them(stickyproxy, shared_phantoms, users_file):
    proxy = stickyproxy("--backend", shared_phantoms[0].url, "--auth-users", users_file,
                        "--check-interval", "1s")
    wait_up(proxy, 1)
    alice, bob = basic("alice", "wonderland"), basic("bob", "builder")
    assert http_json(proxy.url + "/session", "POST", NEW, basic("alice", "builder"))[0] == 401
    status, body, _ = http_json(proxy.url + "/session", "POST", NEW, alice)
    assert status == 200
    sid = body["sessionId"]
    status, body, _ = http_json(f"{proxy.url}/session/{sid}/url", headers=bob)
    assert status == 404 and body["value"]["error"] == "invalid session id"
    assert http_json(f"{proxy.url}/session/{sid}", "DELETE", headers=bob)[0] == 404
    assert http_json(f"{proxy.url}/session/{sid}/url", headers=alice)[0] == 200
    assert http_json(f"{proxy.url}/session/{sid}", "DELETE", headers=alice)[0] == 200


def test_a_flood_of_wrong_passwords_is_bounded_and_known_users_go_on(stickyproxy,
                                                                      shared_phantoms,
                                                                      users_file):
    """Each password check is slow on purpose (PBKDF2, ~40 ms of the event loop): a flood of
    wrong ones, which needs no credentials, stalled every client. Past a few checks a second
    the answer is 429 'retry shortly' without hashing; a user already logged in is not held."""
    proxy = stickyproxy("--backend", shared_phantoms[0].url, "--auth-users", users_file,
                        "--check-interval", "1s")
    wait_up(proxy, 1)
    alice = basic("alice", "wonderland")
    status, body, _ = http_json(proxy.url + "/session", "POST", NEW, alice)
    assert status == 200
    sid = body["sessionId"]
    statuses = [http_json(f"{proxy.url}/session/{sid}/url", headers=basic("mallory", f"guess{i}"))
                for i in range(30)]
    assert {s for s, _, _ in statuses} <= {401, 429}
    refused_busy = [h for s, _, h in statuses if s == 429]
    assert refused_busy and all(h["Retry-After"] == "1" for h in refused_busy)
    # (30 requests take well under the 6 s that would let 30 checks through the budget)
    assert sum(s == 401 for s, _, _ in statuses) < 20
    assert http_json(f"{proxy.url}/session/{sid}/url", headers=alice)[0] == 200  # remembered
    assert http_json(f"{proxy.url}/session/{sid}", "DELETE", headers=alice)[0] == 200


def test_bad_users_file_stops_start_up(tmp_path):
    import subprocess
    import sys
    path = tmp_path / "users"
    path.write_text("alice:plaintext\n")
    run = subprocess.run([sys.executable, "-m", "stickyproxy", "serve", "--backend", "http://127.0.0.1:9",
                          "--listen", "127.0.0.1:0", "--stats-listen", "127.0.0.1:0",
                          "--auth-users", str(path)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "--auth-users" in run.stderr and "line 1" in run.stderr


def test_new_session_rate_per_address(stickyproxy, shared_phantoms):
    proxy = stickyproxy("--backend", shared_phantoms[0].url, "--new-session-rate", "2/m",
                        "--check-interval", "1s")
    wait_up(proxy, 1)
    sids = []
    for _ in range(2):
        status, body, _ = http_json(proxy.url + "/session", "POST", NEW)
        assert status == 200
        sids.append(body["sessionId"])
    status, body, headers = http_json(proxy.url + "/session", "POST", NEW)
    assert status == 429 and body["value"]["error"] == "session not created"
    assert int(headers["Retry-After"]) >= 1
    assert proxy.stats()["refused"]["rate"] == 1
    for sid in sids:  # commands of live sessions are never rate limited
        assert http_json(f"{proxy.url}/session/{sid}/url")[0] == 200
        http_json(f"{proxy.url}/session/{sid}", "DELETE")


def test_connections_beyond_the_limit_are_turned_away(stickyproxy, shared_phantoms):
    import socket
    proxy = stickyproxy("--backend", shared_phantoms[0].url, "--max-connections", "2",
                        "--check-interval", "1s")
    wait_up(proxy, 1)
    held = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(2)]
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as extra:
            answer = b""
            while chunk := extra.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 429") and b'"error": "unknown error"' in answer
        assert proxy.stats()["refused"]["connections"] == 1
    finally:
        for sock in held:
            sock.close()
    # Once they are gone, new connections are served again.
    from conftest import wait_for
    wait_for(lambda: http_json(proxy.url + "/status")[0] == 200, 10, what="served again")
