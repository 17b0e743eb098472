"""The current Selenium 4 client runs the same scraping script through stickyproxy against
PhantomJS (bridged to JSONWP) and against a local chromedriver/Chromium pool (W3C, passed
through), with sessions pinned like any other."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from selenium import webdriver
from selenium.webdriver.common.options import ArgOptions
from selenium.webdriver.remote.client_config import ClientConfig
from selenium.webdriver.remote.remote_connection import RemoteConnection

from conftest import wait_for, wait_up
from scraping import check, scrape

pytestmark = pytest.mark.functional


class PhantomJSOptions(ArgOptions):
    @property
    def default_capabilities(self) -> dict:
        return {"browserName": "phantomjs"}


def remote(url: str, options) -> webdriver.Remote:
    connection = RemoteConnection(client_config=ClientConfig(remote_server_addr=url, timeout=120))
    return webdriver.Remote(command_executor=connection, options=options)


@pytest.fixture(params=["phantomjs", "chromium"])
def target(request, stickyproxy, shared_phantoms):
    if request.param == "phantomjs":
        proxy = stickyproxy(*[a for p in shared_phantoms[:2] for a in ("--backend", p.url)],
                            "--check-interval", "500ms")
        options = PhantomJSOptions
    else:
        if not shutil.which("chromedriver"):
            pytest.fail("chromedriver missing: scripts/test installs Debian's chromium-driver")
        proxy = stickyproxy("--local", "2", "--local-browser", "chromium", "--check-interval", "500ms")
        options = webdriver.ChromeOptions  # plain: the local pool adds the headless flags
    wait_up(proxy, 2)
    return request.param, proxy, options


def test_same_scraping_script_on_both_backends(target, shop):
    kind, proxy, options = target
    with ThreadPoolExecutor(2) as pool:  # two clients at once: each session stays on its backend
        drivers = list(pool.map(lambda _: remote(proxy.url, options()), range(2)))
        stats = proxy.stats()
        assert sorted(b["sessions_active"] for b in stats["backends"]) == [1, 1]
        assert {b["dialect"] for b in stats["backends"]} == {"jsonwp" if kind == "phantomjs" else "w3c"}
        try:
            outs = list(pool.map(lambda d: scrape(d, shop), drivers))
        finally:
            for d in drivers:
                d.quit()
    for out in outs:
        check(out, shop)
        if kind == "chromium":
            assert out["alert_text"] == "hello"
    wait_for(lambda: proxy.stats()["sessions_active"] == 0, 10, what="sessions ended")
    stats = proxy.stats()
    assert stats["sessions_ended"]["client_delete"] == 2 and stats["errors_total"] == 0
    assert all(b["sessions_total"] == 1 for b in stats["backends"])
