"""Real Selenium 3 clients through a real stickyproxy over real PhantomJS servers."""

from __future__ import annotations

import collections
import http.server
import json
import threading

import pytest

from conftest import http_json, wait_for, wait_up

pytestmark = pytest.mark.functional


@pytest.fixture
def proxy4(stickyproxy, shared_phantoms):
    args = [a for p in shared_phantoms for a in ("--backend", p.url)]
    proxy = stickyproxy(*args, "--check-interval", "1s")
    wait_up(proxy, 4)
    yield proxy
    wait_for(lambda: proxy.stats()["sessions_active"] == 0, 30, what="sessions to end")


def test_many_concurrent_selenium3_sessions_complete_and_spread_evenly(proxy4, pages, shared_phantoms,
                                                                      selenium3_client):
    client = selenium3_client("sessions3.py", proxy=proxy4.url, page=pages + "/index.html",
                              sessions=16, hold=True)
    held = client.read_json()["held"]
    assert len(set(held)) == 16

    # While all 16 are open: exactly 4 on each backend, and each backend really holds the
    # sessions stickyproxy says it does (asked directly, not through the proxy).
    stats = proxy4.stats()
    assert sorted(b["sessions_active"] for b in stats["backends"]) == [4, 4, 4, 4]
    on_backend = {p.url: set(p.sessions()) & set(held) for p in shared_phantoms}
    assert sorted(len(s) for s in on_backend.values()) == [4, 4, 4, 4]
    for b in stats["backends"]:
        assert len(on_backend[b["url"]]) == b["sessions_active"]

    client.send()
    results = client.finish()["results"]
    failures = [r for r in results if not r["ok"]]
    assert not failures, failures
    assert all(r["title"] == "stickyproxy test page" and r["items"] == ["one", "two", "three"]
               for r in results)
    stats = proxy4.stats()
    assert stats["sessions_active"] == 0
    assert stats["sessions_ended"]["client_delete"] >= 16
    assert stats["errors_total"] == 0
    # Every session was deleted on its backend, nothing leaked there.
    assert all(not (set(p.sessions()) & set(held)) for p in shared_phantoms)
    assert len(proxy4.log(r"SESSION_CREATED")) == 16


def test_cookie_header_clients_keep_working_and_hash_consistently(proxy4, pages, selenium3_client):
    client = selenium3_client("sessions3.py", proxy=proxy4.url, page=pages + "/index.html",
                              sessions=12, concurrency=6, cookie=True)
    results = client.finish()["results"]
    assert all(r["ok"] for r in results), results

    # The same Cookie value always lands on the same backend (rendezvous hash), another value
    # may land elsewhere: place a few new sessions by hand with fixed cookies.
    placed = collections.defaultdict(set)
    for cookie in ["SESSION=a", "SESSION=b", "SESSION=c", "SESSION=d", "SESSION=e"] * 2:
        status, body, headers = http_json(proxy4.url + "/wd/hub/session", "POST",
                                          {"desiredCapabilities": {}}, {"Cookie": cookie})
        assert status == 200, body
        placed[cookie].add(headers["X-Stickyproxy-Backend"])
        http_json(f"{proxy4.url}/wd/hub/session/{body['sessionId']}", "DELETE")
    assert all(len(backends) == 1 for backends in placed.values()), placed
    assert len(set().union(*placed.values())) > 1  # five keys over four backends spread


def test_both_path_prefixes_route_and_every_answer_names_its_backend(proxy4):
    status, body, headers = http_json(proxy4.url + "/session", "POST", {"desiredCapabilities": {}})
    assert status == 200
    sid, backend = body["sessionId"], headers["X-Stickyproxy-Backend"]
    for prefix in ("", "/wd/hub"):
        status, body, headers = http_json(f"{proxy4.url}{prefix}/session/{sid}/url", "GET")
        assert status == 200 and body["value"] == "about:blank"
        assert headers["X-Stickyproxy-Backend"] == backend
    status, _, headers = http_json(f"{proxy4.url}/session/{sid}", "DELETE")
    assert status == 200 and headers["X-Stickyproxy-Backend"] == backend

    # The pin is gone: the next command is refused by the proxy, saying why.
    status, body, _ = http_json(f"{proxy4.url}/session/{sid}/url")
    assert status == 404
    assert body["value"]["error"] == "invalid session id"
    assert "client_delete" in body["value"]["message"]


def test_unknown_session_and_unknown_route_get_webdriver_errors(proxy4):
    status, body, _ = http_json(proxy4.url + "/wd/hub/session/not-a-session/title")
    assert status == 404 and body["value"]["error"] == "invalid session id"
    status, body, _ = http_json(proxy4.url + "/session/..%2Fetc/title")
    assert status == 400 and body["value"]["error"] == "invalid argument"  # refused, not routed
    status, body, _ = http_json(proxy4.url + "/shutdown", "POST", {})
    assert status == 404 and body["value"]["error"] == "unknown command"
    status, body, _ = http_json(proxy4.url + "/session", "POST", b"{not json")
    assert status == 400 and body["value"]["error"] == "invalid argument"
    status, body, _ = http_json(proxy4.url + "/session", "POST", [1, 2])
    assert status == 400 and body["value"]["error"] == "invalid argument"


def test_status_answers_for_the_service(proxy4):
    status, body, _ = http_json(proxy4.url + "/status")
    assert status == 200 and body["value"]["ready"] is True
    assert "4 of 4" in body["value"]["message"]
    status, body, _ = http_json(proxy4.stats_url + "/healthz")
    assert status == 200 and body["ok"] is True


def test_stats_schema(proxy4):
    stats = proxy4.stats()
    assert stats["version"] == 1
    for key in ("sessions_active", "sessions_total", "requests_total", "errors_total", "backends"):
        assert key in stats
    for b in stats["backends"]:
        for key in ("id", "url", "state", "sessions_active", "sessions_total", "requests_total",
                    "errors_total", "last_check"):
            assert key in b, key
        assert b["state"] == "up"
        assert b["last_check"]["ok"] is True and b["last_check"]["result"] == "ok"
        assert b["dialect"] == "jsonwp"


def test_large_bodies_stream_through_both_ways(proxy4):
    status, body, headers = http_json(proxy4.url + "/session", "POST", {"desiredCapabilities": {}})
    sid = body["sessionId"]
    big = "x" * (3 << 20)  # above the 1 MiB the proxy buffers: both directions stream
    status, body, headers = http_json(f"{proxy4.url}/session/{sid}/execute", "POST",
                                      {"script": "return arguments[0] + arguments[0].length;",
                                       "args": [big]}, timeout=60)
    assert status == 200
    assert body["value"] == big + str(len(big))
    assert headers["X-Stickyproxy-Backend"]
    http_json(f"{proxy4.url}/session/{sid}", "DELETE")


class _Numbering(http.server.BaseHTTPRequestHandler):
    """A WebDriver server that numbers its sessions 1, 2, ... A fake: no real backend here
    reuses ids (PhantomJS, chromedriver and Grid give UUIDs), but a home-made one may."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _answer(self, value, sid=None) -> None:
        body = json.dumps({"sessionId": sid, "status": 0, "value": value}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/status":
            return self._answer({"ready": True})
        sid = self.path.split("/")[2]  # /session/<id>/title
        self._answer(self.server.name if sid in self.server.live else "gone", sid)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.made += 1
        sid = str(self.server.made)
        self.server.live.add(sid)
        self._answer({}, sid)

    def do_DELETE(self) -> None:
        sid = self.path.split("/")[2]
        self.server.live.discard(sid)
        self.server.deleted.append(sid)
        self._answer(None, sid)


@pytest.fixture
def numbering_backends():
    servers = []
    for name in ("one", "two"):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Numbering)
        server.name, server.made, server.live, server.deleted = name, 0, set(), []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_session_id_another_backend_already_gave_is_refused_not_pinned_over(
        stickyproxy, numbering_backends):
    """Both backends answer the first new session with id 1. The second one's would take the
    first's route: it is deleted where it was made and its client told, and the first session
    still reaches its own backend."""
    proxy = stickyproxy(*[a for s in numbering_backends for a in
                          ("--backend", f"http://127.0.0.1:{s.server_address[1]}")])
    wait_up(proxy, 2)
    status, body, headers = http_json(proxy.url + "/session", "POST", {"desiredCapabilities": {}})
    assert status == 200 and body["sessionId"] == "1"
    first = next(s for s in numbering_backends if s.live)
    second = next(s for s in numbering_backends if s is not first)
    status, body, _ = http_json(proxy.url + "/session", "POST", {"desiredCapabilities": {}})
    assert status == 500 and body["value"]["error"] == "session not created", body
    first_id = next(b["id"] for b in proxy.stats()["backends"]
                    if b["url"] == f"http://127.0.0.1:{first.server_address[1]}")
    assert f"session id 1, which a live session on backend {first_id} has" in body["value"]["message"]
    wait_for(lambda: second.deleted == ["1"], 10, what="the clashing session deleted")
    assert http_json(proxy.url + "/session/1/title")[1]["value"] == first.name
    assert len(proxy.log(r'SESSION_NOT_CREATED .*session=1 reason="id in use')) == 1
    assert proxy.stats()["sessions_active"] == 1
    # the next one from the same backend has an id of its own, and is served
    status, body, _ = http_json(proxy.url + "/session", "POST", {"desiredCapabilities": {}})
    assert status == 200 and body["sessionId"] == "2" and second.live == {"2"}
    assert http_json(proxy.url + "/session/2/title")[1]["value"] == second.name
    for sid in ("1", "2"):
        assert http_json(proxy.url + f"/session/{sid}", "DELETE")[0] == 200
    assert first.live == set() and second.live == set()
