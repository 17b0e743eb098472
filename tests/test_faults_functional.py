"""Fault injection under load with real PhantomJS and real Selenium 3 clients: a backend killed
(-9) or frozen (SIGSTOP) while 50 sessions run. The sessions elsewhere finish, the victim's get a
clear error within the check window, nothing hangs, and stats agree with the log lines."""

from __future__ import annotations

import collections
import re
import signal

import pytest

from conftest import wait_for, wait_up

pytestmark = pytest.mark.functional


def run_with_victim(stickyproxy, phantomjs, pages, selenium3_client, fault, sessions, extra=()):
    phantoms = [phantomjs() for _ in range(4)]
    proxy = stickyproxy(*[a for p in phantoms for a in ("--backend", p.url)],
                        "--check-interval", "300ms", "--check-timeout", "1s", "--fall", "2",
                        *extra)
    wait_up(proxy, 4)
    client = selenium3_client("sessions3.py", proxy=proxy.url, page=pages + "/index.html",
                              sessions=sessions, hold=True)
    held = client.read_json(180)["held"]
    victim = phantoms[1]
    doomed = set(victim.sessions()) & set(held)
    victim_id = next(b["id"] for b in proxy.stats()["backends"] if b["url"] == victim.url)
    try:
        fault(victim)
        client.send()
        results = {r["id"]: r for r in client.finish(180)["results"]}
    finally:
        victim.proc.send_signal(signal.SIGCONT)
    return proxy, phantoms, victim_id, doomed, results


def check_counts_match_logs(proxy):
    stats = proxy.stats()
    ended = collections.Counter(re.search(r"reason=(\w+)", line).group(1)
                                for line in proxy.log(r"SESSION_ENDED "))
    assert {k: v for k, v in stats["sessions_ended"].items() if v} == dict(ended)
    assert stats["errors_total"] == len(proxy.log(r"PROXY_ERROR ")) + len(proxy.log(r"SESSION_RETRY "))
    assert stats["sessions_total"] == len(proxy.log(r"SESSION_CREATED "))


def test_kill_9_under_load(stickyproxy, phantomjs, pages, selenium3_client):
    proxy, phantoms, victim_id, doomed, results = run_with_victim(
        stickyproxy, phantomjs, pages, selenium3_client, lambda p: p.kill(signal.SIGKILL), 50)
    assert 10 <= len(doomed) <= 15  # 50 placed evenly over 4
    for sid, r in results.items():
        if sid in doomed:
            assert not r["ok"] and f"its backend {victim_id} is unavailable" in r["error"], r
            assert r["seconds"] < 15, r  # an error at once (refused), never a hang
        else:
            assert r["ok"], r
    wait_for(lambda: proxy.backend(victim_id)["state"] == "down", 10, what="victim down")
    check_counts_match_logs(proxy)
    assert proxy.stats()["sessions_ended"]["client_delete"] == 50 - len(doomed)


def test_sigstop_under_load(stickyproxy, phantomjs, pages, selenium3_client):
    proxy, phantoms, victim_id, doomed, results = run_with_victim(
        stickyproxy, phantomjs, pages, selenium3_client,
        lambda p: p.proc.send_signal(signal.SIGSTOP), 20, ("--backend-timeout", "3s"))
    assert doomed
    for sid, r in results.items():
        if sid in doomed:
            assert not r["ok"] and f"its backend {victim_id} is unavailable" in r["error"], r
            assert "no answer within 3s" in r["error"] or "down" in r["error"], r
            assert r["seconds"] < 20, r
        else:
            assert r["ok"], r
    assert proxy.backend(victim_id)["last_check"]["result"] in ("timeout", "ok")
    check_counts_match_logs(proxy)
