"""Issue 8 end to end: a real stickyproxy over real PhantomJS while Selenium 3 sessions run.

- The dashboard (`GET /` on the stats port) is opened in a real headless Chromium, driven by the
  Selenium 4 client and Debian's chromedriver: each backend's row and state are read as a person
  sees them, the page refreshes itself while the live session count changes, and a screenshot is
  kept in test-artifacts/dashboard.png.
- `/metrics` parses with prometheus_client's parser, and its counters agree with `/stats` and with
  the SESSION_CREATED / SESSION_ENDED / ACCESS log lines of the same run.
- `--log-format json`: every line is one JSON object with the same vocabulary.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, http_json, wait_for, wait_up
from stickyproxy.providers.processes import free_port

pytestmark = pytest.mark.functional

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = ROOT / "test-artifacts"
GREEN = "rgba(30, 142, 62, 1)"  # dashboard.py: td.up
AMBER = "rgba(224, 160, 0, 1)"  # td.drain
RED = "rgba(198, 40, 40, 1)"  # td.down


@pytest.fixture
def chromium():
    """A real headless Chromium under Selenium 4 (Debian's chromium and chromedriver)."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("Debian chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--window-size=1500,820"):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield browser
    finally:
        browser.quit()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def seen(browser) -> dict[str, dict[str, str]]:
    """What a person reads in the backends table: per backend, its state cell's text and colour
    and its live session count; plus the live-sessions tile."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    try:  # the page replaces itself every 2 s: an element of the last load is gone; read again
        if browser.execute_script("return document.readyState") != "complete":
            return {}  # mid-refresh: half a page
        rows = {}
        for tr in browser.find_elements(By.CSS_SELECTOR, "table.backends tbody tr[data-backend]"):
            state = tr.find_element(By.CSS_SELECTOR, "td.state")
            rows[tr.get_attribute("data-backend")] = {
                "state": state.text.split("\n")[0],
                "colour": state.value_of_css_property("background-color"),
                "live": tr.find_element(By.CSS_SELECTOR, "td.sessions b.live").text,
            }
        tile = browser.find_element(By.CSS_SELECTOR, '[data-tile="live sessions"] b').text
        return {"rows": rows, "live": tile} if rows else {}
    except WebDriverException:  # stale element, node gone, or the next load not there yet
        return {}


def test_dashboard_metrics_and_logs_agree_while_sessions_run(stickyproxy, selenium3_client,
                                                            pages, chromium):
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens: down at its first check
    proxy = stickyproxy("--local", "2", "--backend", nobody, "--access-log",
                        "--admin-token", "t0ken")
    wait_up(proxy, 2)
    wait_for(lambda: proxy.backend("static-1")["state"] == "down", 20, what="static-1 down")
    chromium.get(proxy.stats_url + "/")
    before = wait_for(lambda: (v := seen(chromium)) and v, 20, what="the dashboard")
    assert before["rows"].pop("static-1") == {"state": "DOWN", "colour": RED, "live": "0"}
    assert set(before["rows"]) == {"local-1", "local-2"}
    for row in before["rows"].values():
        assert row["state"] == "UP" and row["colour"] == GREEN and row["live"] == "0"
    assert before["live"] == "0"

    client = selenium3_client("sessions3.py", proxy=proxy.url, page=pages + "/index.html",
                              sessions=3, hold=True)
    held = client.read_json()["held"]
    assert len(held) == 3
    # No reload from us: the page refreshes itself and shows the sessions now running.
    during = wait_for(lambda: (v := seen(chromium)) and v["live"] == "3" and v, 20,
                      what="the dashboard to show 3 live sessions")
    assert sorted(int(r["live"]) for r in during["rows"].values()) == [0, 1, 2]  # fewest-first
    assert chromium.title.endswith("3 sessions")
    # Drained by hand: amber, and its sessions go on.
    drained = max(during["rows"], key=lambda b: int(during["rows"][b]["live"]))
    status, _, _ = http_json(f"{proxy.stats_url}/admin/backends/{drained}/drain", "POST",
                             headers={"Authorization": "Bearer t0ken"})
    assert status == 200
    wait_for(lambda: (v := seen(chromium)) and v["rows"][drained]["state"] == "DRAIN"
             and v["rows"][drained]["colour"] == AMBER, 20, what="the drained row in amber")
    ARTIFACTS.mkdir(exist_ok=True)
    assert chromium.save_screenshot(str(ARTIFACTS / "dashboard.png"))

    client.send()
    results = client.finish()["results"]
    assert all(r["ok"] for r in results), results
    after = wait_for(lambda: (v := seen(chromium)) and v["live"] == "0" and v, 20,
                     what="the dashboard to show the sessions gone")
    assert {b: r["state"] for b, r in after["rows"].items()} == {
        "static-1": "DOWN", **{b: ("DRAIN" if b == drained else "UP") for b in after["rows"]
                               if b != "static-1"}}

    # The same run, three ways: /stats, /metrics, the log lines.
    stats = proxy.stats()
    metrics = scrape(proxy.stats_url)
    created = wait_for(lambda: len(proxy.log(r"SESSION_CREATED ")) == 3
                       and proxy.log(r"SESSION_CREATED "), 10, what="3 SESSION_CREATED lines")
    ended = wait_for(lambda: len(proxy.log(r"SESSION_ENDED ")) == 3
                     and proxy.log(r"SESSION_ENDED "), 10, what="3 SESSION_ENDED lines")
    assert {re.search(r"session=(\S+)", line).group(1) for line in created} == set(held)
    created_by_backend = Counter(re.search(r"backend=(\S+)", line).group(1) for line in created)
    ended_by_reason = Counter(re.search(r"reason=(\S+)", line).group(1) for line in ended)
    assert ended_by_reason == {"client_delete": 3}
    assert stats["sessions_total"] == 3 and stats["sessions_active"] == 0
    for row in stats["backends"]:
        b = row["id"]
        if b == "static-1":
            assert sample(metrics, "stickyproxy_backend_up", backend=b) == 0
            assert sample(metrics, "stickyproxy_backend_state", backend=b, state="down") == 1
            continue
        assert row["sessions_total"] == created_by_backend[b]
        assert sample(metrics, "stickyproxy_sessions_created_total", backend=b) == \
            row["sessions_total"]
        assert sample(metrics, "stickyproxy_sessions_active", backend=b) == 0
        assert sample(metrics, "stickyproxy_requests_total", backend=b) == row["requests_total"]
        assert sample(metrics, "stickyproxy_backend_errors_total", backend=b) == \
            row["errors_total"] == 0
        assert sample(metrics, "stickyproxy_backend_up", backend=b) == 1
        assert sample(metrics, "stickyproxy_backend_memory_bytes", backend=b) > 0
        assert sample(metrics, "stickyproxy_backend_memory_limit_bytes", backend=b) == \
            row["memory"]["limit_bytes"]
    for reason, count in stats["refused"].items():
        assert sample(metrics, "stickyproxy_requests_refused_total", reason=reason) == count
    for reason, count in stats["sessions_ended"].items():
        assert sample(metrics, "stickyproxy_sessions_ended_total", reason=reason) == count \
            == ended_by_reason[reason]

    # Every request through the proxy: one ACCESS line and one histogram observation.
    access = proxy.log(r" ACCESS ")
    kinds = Counter("new_session" if " method=POST " in line and line.rstrip().split(
        " path=")[1].split()[0].rstrip("/").endswith("/session") else "command"
        for line in access)
    assert kinds["new_session"] == 3
    for kind in ("new_session", "command"):
        assert sample(metrics, "stickyproxy_request_duration_seconds_count", kind=kind) == \
            kinds[kind]
        assert sample(metrics, "stickyproxy_proxy_overhead_seconds_count", kind=kind) == \
            kinds[kind]
    # Forwarded commands are what the backends counted: new sessions + every command.
    assert sum(r["requests_total"] for r in stats["backends"]) == len(access)
    fields = [dict(re.findall(r"(\w+)=(\S+)", line.split(" ACCESS ", 1)[1])) for line in access]
    assert all(f["status"] == "200" and float(f["ms"]) >= 0 for f in fields)
    assert {f["session"] for f in fields} == set(held)
    assert {f["backend"] for f in fields} == set(created_by_backend)
    # Overhead is a small part of the time: the backends did the work.
    overhead = sum(sample(metrics, "stickyproxy_proxy_overhead_seconds_sum", kind=k)
                   for k in ("new_session", "command"))
    total = sum(sample(metrics, "stickyproxy_request_duration_seconds_sum", kind=k)
                for k in ("new_session", "command"))
    assert 0 < overhead < total / 2
    assert sample(metrics, "stickyproxy_health_check_duration_seconds_count", result="ok") >= 2


def test_json_logs_carry_the_same_vocabulary(stickyproxy, shared_phantoms, selenium3_client,
                                              pages):
    proxy = stickyproxy("--backend", shared_phantoms[0].url, "--log-format", "json",
                        "--access-log", "--check-interval", "1s")
    wait_up(proxy, 1)
    out = selenium3_client("sessions3.py", proxy=proxy.url, page=pages + "/index.html",
                           sessions=1).finish()
    assert out["results"][0]["ok"], out
    sid = out["results"][0]["id"]
    wait_for(lambda: proxy.log(r'"event": "SESSION_ENDED"'), 10, what="SESSION_ENDED")
    events = [json.loads(line) for line in list(proxy.lines)]  # every line is JSON
    by_event = Counter(e["event"] for e in events)
    assert by_event["READY"] == 1 and by_event["BACKEND_UP"] == 1
    created = next(e for e in events if e["event"] == "SESSION_CREATED")
    ended = next(e for e in events if e["event"] == "SESSION_ENDED")
    assert created["session"] == ended["session"] == sid and created["backend"] == "static-1"
    assert ended["reason"] == "client_delete" and ended["level"] == "info"
    access = [e for e in events if e["event"] == "ACCESS"]
    assert access and all(e["logger"] == "stickyproxy.access" for e in access)
    assert {e["session"] for e in access} == {sid}
    assert all(e["status"] == "200" and float(e["ms"]) >= 0 for e in access)


def test_the_dashboard_is_served_without_the_browser(stickyproxy, shared_phantoms):
    """What the browser test needs, checked cheaply on every machine: HTML, refreshing, no cache."""
    proxy = stickyproxy("--backend", shared_phantoms[1].url)
    wait_up(proxy, 1)
    with urllib.request.urlopen(proxy.stats_url + "/", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/html")
        assert resp.headers["Cache-Control"] == "no-store"
        page = resp.read().decode()
    assert 'data-backend="static-1"' in page and '<meta http-equiv="refresh"' in page
