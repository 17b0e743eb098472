"""Two stickyproxy replicas with one --session-key behind a plain round-robin HAProxy (no
stickiness) over a shared PhantomJS pool: every session works, its commands are served by both
replicas, and a replica killed and restarted mid-session changes nothing for the clients."""

from __future__ import annotations

import shutil
import signal
import subprocess

import pytest

from conftest import close_pipes, http_json, start_proxy, wait_for, wait_up
from stickyproxy.providers.processes import free_port

pytestmark = pytest.mark.functional

KEY = "replica-shared-secret"


class Replica:
    """One stickyproxy on fixed ports, so it can be killed and started again in place."""

    def __init__(self, backends):
        self.port, self.stats_port = free_port(), free_port()
        self.backends = backends
        self.proxy = None
        self.generations = []

    def start(self):
        args = [a for url in self.backends for a in ("--backend", url)]
        self.proxy = start_proxy(*args, "--session-key", KEY, "--check-interval", "500ms",
                                 listen=f"127.0.0.1:{self.port}",
                                 stats=f"127.0.0.1:{self.stats_port}")
        self.generations.append(self.proxy)
        return self

    def stop(self):
        for proxy in self.generations:
            proxy.shutdown()
            proxy.pump.join(5)
            close_pipes(proxy.proc)


@pytest.fixture
def haproxy(tmp_path):
    binary = shutil.which("haproxy")
    assert binary, "haproxy missing: scripts/test installs Debian's haproxy"
    started = []

    def start(servers):
        port = free_port()
        config = tmp_path / "haproxy.cfg"
        lines = ["global", "  maxconn 500", "defaults", "  mode http", "  timeout connect 2s",
                 "  timeout client 60s", "  timeout server 60s", "  retries 3",
                 "  option redispatch",
                 # balance every request, not every server connection: no stickiness at all
                 "  option http-server-close", "frontend webdriver", f"  bind 127.0.0.1:{port}",
                 "  default_backend replicas", "backend replicas", "  balance roundrobin",
                 "  option httpchk GET /healthz"]
        for name, (port_, stats_port) in servers.items():
            lines.append(f"  server {name} 127.0.0.1:{port_} check port {stats_port} "
                         "inter 300ms fall 1 rise 1")
        config.write_text("\n".join(lines) + "\n")
        proc = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _status(url) == 200, 15, what="haproxy up")
        return url

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(10)


def logged(a, b, event):
    return {line.split("session=")[1].split()[0]
            for r in (a, b) for proxy in r.generations for line in proxy.log(event)}


def _status(url):
    try:
        return http_json(url + "/status", timeout=2)[0]
    except OSError:
        return None


def test_round_robin_replicas_and_a_replica_restart(shared_phantoms, haproxy, pages, selenium3_client):
    backends = [p.url for p in shared_phantoms]
    a, b = Replica(backends), Replica(backends)
    try:
        a.start(), b.start()
        wait_up(a.proxy, 4), wait_up(b.proxy, 4)
        lb = haproxy({"a": (a.port, a.stats_port), "b": (b.port, b.stats_port)})

        # Three rounds of the workload: ~24 commands a session, so global round robin cannot
        # plausibly leave one session's commands all on one replica (about 2**-23).
        client = selenium3_client("sessions3.py", proxy=lb, page=pages + "/index.html",
                                  sessions=12, hold=True, repeat=3)
        held = client.read_json()["held"]
        # Every session was created by one replica and learned by the other on first use.
        wait_for(lambda: logged(a, b, "SESSION_CREATED") == set(held), 10, what="created logged")

        # Kill replica a (no goodbye), then bring it back on the same ports, mid-session.
        a.proxy.proc.send_signal(signal.SIGKILL)
        a.proxy.proc.wait(10)
        a.start()
        wait_up(a.proxy, 4)
        wait_for(lambda: _status(lb) == 200, 10, what="lb sees a again")

        client.send()
        results = client.finish()["results"]
        assert all(r["ok"] for r in results), [r for r in results if not r["ok"]]
        # Each one was served by a replica that did not create it, too.
        # Each one was served by a replica that did not create it, too.
        wait_for(lambda: logged(a, b, "SESSION_LEARNED") >= set(held), 10, what="learned logged")
        backend_ids = {sid[33:] for sid in held}  # quit reached every backend session
        assert not any(set(p.sessions()) & backend_ids for p in shared_phantoms)
    finally:
        a.stop(), b.stop()


def test_forged_and_foreign_ids_are_refused(stickyproxy, shared_phantoms):
    proxy = stickyproxy("--backend", shared_phantoms[0].url, "--session-key", KEY,
                        "--check-interval", "1s")
    other = stickyproxy("--backend", shared_phantoms[0].url, "--session-key", "another-key",
                        "--check-interval", "1s")
    wait_up(proxy, 1), wait_up(other, 1)
    status, body, _ = http_json(proxy.url + "/session", "POST", {"desiredCapabilities": {}})
    public = body["sessionId"]
    backend_sid = public[33:]
    assert backend_sid in shared_phantoms[0].sessions()  # the backend knows it by its own id
    assert http_json(f"{proxy.url}/session/{public}/url")[1]["sessionId"] == public
    for forged in (backend_sid, public[:20] + "0" * 13 + backend_sid):
        status, body, _ = http_json(f"{proxy.url}/session/{forged}/url")
        assert status == 404 and body["value"]["error"] == "invalid session id"
    status, body, _ = http_json(f"{other.url}/session/{public}/url")  # a different key
    assert status == 404
    assert http_json(f"{proxy.url}/session/{public}", "DELETE")[0] == 200
    assert backend_sid not in shared_phantoms[0].sessions()
    # An ended session's signed id is not learned again (pinned, counted and reaped twice).
    status, body, _ = http_json(f"{proxy.url}/session/{public}/url")
    assert status == 404 and "ended on backend static-1: client_delete" in body["value"]["message"]
    assert proxy.stats()["sessions_active"] == 0


def test_a_body_over_a_megabyte_reaches_phantomjs_with_the_session_id_rewritten(stickyproxy,
                                                                                shared_phantoms):
    """With a key, the client's id is turned into the backend's in bodies too: read whole and
    sent with its new length (GhostDriver answers a chunked request body 404)."""
    proxy = stickyproxy("--backend", shared_phantoms[0].url, "--session-key", KEY,
                        "--check-interval", "1s")
    wait_up(proxy, 1)
    public = http_json(proxy.url + "/session", "POST", {"desiredCapabilities": {}})[1]["sessionId"]
    big = "x" * (3 << 20) + public  # (its id inside is rewritten, the length changes)
    status, body, _ = http_json(f"{proxy.url}/session/{public}/execute", "POST",
                                {"script": "return arguments[0].length;", "args": [big]},
                                timeout=60)
    assert status == 200 and body["value"] == (3 << 20) + len(public) - 33
    assert http_json(f"{proxy.url}/session/{public}", "DELETE")[0] == 200
