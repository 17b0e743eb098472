"""DNS discovery against a DNS server the test runs on loopback (dnslib), over real PhantomJS:
scaling the record set up adds a backend (used after its health check), scaling it down drains
the one that left without failing its live session, then retires it once empty."""

from __future__ import annotations

import threading

import pytest
from dnslib import QTYPE, RR, SRV
from dnslib.server import BaseResolver, DNSServer

from conftest import http_json, wait_for, wait_up

pytestmark = pytest.mark.functional

NAME = "_webdriver._tcp.pool.test"


class Records(BaseResolver):
    """SRV records for NAME that the test changes while the proxy runs."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.lock = threading.Lock()

    def resolve(self, request, handler):
        reply = request.reply()
        if str(request.q.qname).rstrip(".") == NAME and request.q.qtype == QTYPE.SRV:
            with self.lock:
                for port in self.ports:
                    reply.add_answer(RR(request.q.qname, QTYPE.SRV, ttl=1,
                                        rdata=SRV(0, 0, port, "127.0.0.1")))
        return reply


@pytest.fixture
def dns_server():
    records = Records()
    server = DNSServer(records, port=0, address="127.0.0.1")
    server.start_thread()
    yield records, server.server.server_address[1]
    server.stop()
    server.server.server_close()


def test_scaling_the_record_set_up_and_down(stickyproxy, phantomjs, dns_server):
    records, port = dns_server
    phantoms = [phantomjs() for _ in range(3)]
    records.ports = [p.port for p in phantoms[:2]]
    proxy = stickyproxy("--backend-dns", NAME, "--dns-server", f"127.0.0.1:{port}",
                        "--dns-interval", "300ms", "--check-interval", "300ms")
    wait_up(proxy, 2)
    ids = {b["url"]: b["id"] for b in proxy.stats()["backends"]}
    assert set(ids) == {p.url for p in phantoms[:2]}

    sessions = {}
    for _ in range(2):
        status, body, headers = http_json(proxy.url + "/session", "POST", {"desiredCapabilities": {}})
        sessions[headers["X-Stickyproxy-Backend"]] = body["sessionId"]
    assert len(sessions) == 2

    # Up: a third address appears, is checked, and takes the next new session (fewest live).
    records.ports = [p.port for p in phantoms]
    wait_up(proxy, 3)
    status, body, headers = http_json(proxy.url + "/session", "POST", {"desiredCapabilities": {}})
    third = f"dns-{NAME}-127.0.0.1:{phantoms[2].port}"
    assert headers["X-Stickyproxy-Backend"] == third
    http_json(f"{proxy.url}/session/{body['sessionId']}", "DELETE")

    # Down: the first address leaves with a live session: it drains, the session goes on.
    leaving = ids[phantoms[0].url]
    records.ports = [p.port for p in phantoms[1:]]
    wait_for(lambda: proxy.backend(leaving)["admin"] == "drain", 10, what="gone address drains")
    assert proxy.backend(leaving)["drain_reason"] == "gone from dns"
    for _ in range(3):
        status, body, headers = http_json(proxy.url + "/session", "POST", {"desiredCapabilities": {}})
        assert headers["X-Stickyproxy-Backend"] != leaving
        http_json(f"{proxy.url}/session/{body['sessionId']}", "DELETE")
    assert http_json(f"{proxy.url}/session/{sessions[leaving]}/url")[0] == 200
    http_json(f"{proxy.url}/session/{sessions[leaving]}", "DELETE")
    wait_for(lambda: leaving not in {b["id"] for b in proxy.stats()["backends"]}, 10,
             what="drained address retired")
    assert proxy.log(rf"BACKEND_RETIRED backend={leaving}")
    assert proxy.stats()["sessions_ended"]["backend_down"] == 0  # no session was cut short
    http_json(f"{proxy.url}/session/{sessions[ids[phantoms[1].url]]}", "DELETE")
