"""The bridge end to end: the real Selenium 4 client drives a real PhantomJS through a real
stickyproxy, which translates its W3C commands to GhostDriver's JSON Wire Protocol."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any, Iterator

import pytest

aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("selenium", minversion="4.26")  # ClientConfig

pytestmark = pytest.mark.functional

from aiohttp import web  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    ElementNotInteractableException,
    InvalidArgumentException,
    InvalidCookieDomainException,
    InvalidElementStateException,
    InvalidSelectorException,
    InvalidSessionIdException,
    JavascriptException,
    NoAlertPresentException,
    NoSuchCookieException,
    NoSuchElementException,
    NoSuchFrameException,
    NoSuchWindowException,
    StaleElementReferenceException,
    TimeoutException,
    UnableToSetCookieException,
    WebDriverException,
)
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.actions import interaction  # noqa: E402
from selenium.webdriver.common.actions.action_builder import ActionBuilder  # noqa: E402
from selenium.webdriver.common.actions.pointer_input import PointerInput  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.common.options import ArgOptions  # noqa: E402
from selenium.webdriver.common.print_page_options import PrintOptions  # noqa: E402
from selenium.webdriver.common.timeouts import Timeouts  # noqa: E402
from selenium.webdriver.remote.client_config import ClientConfig  # noqa: E402
from selenium.webdriver.remote.command import Command  # noqa: E402
from selenium.webdriver.remote.remote_connection import RemoteConnection  # noqa: E402

from conftest import Proxy, close_pipes, start_proxy, stop_processes, wait_for, wait_up  # noqa: E402
from stickyproxy.providers.processes import free_port as _free_port  # noqa: E402
from stickyproxy import bridge  # noqa: E402

SITE = Path(__file__).parent / "site"


class PhantomJSOptions(ArgOptions):
    """Selenium 4 has no PhantomJS options; Remote accepts any ArgOptions with a browserName."""

    @property
    def default_capabilities(self) -> dict:
        return {"browserName": "phantomjs"}


@pytest.fixture(scope="module")
def bridged_phantom(shared_phantoms) -> str:
    """A real PhantomJS (GhostDriver) on 127.0.0.1, the suite's shared one."""
    return shared_phantoms[3].url


SLOW_PAGE_SECONDS = 2.0

# Pages only the bridge's tests use: every mouse event on a button, logged in order; a file field.
EVENTS_PAGE = """<!DOCTYPE html><html><head><title>events</title></head><body>
<button id="target" style="width: 160px; height: 32px">press me</button>
<p id="events"></p>
<script>
  var target = document.getElementById('target'), log = document.getElementById('events');
  ['mousedown', 'mouseup', 'click', 'dblclick'].forEach(function (kind) {
    target.addEventListener(kind, function () {
      log.textContent += (log.textContent ? ' ' : '') + kind;
    });
  });
  target.ondblclick = function () { document.title = 'double-clicked'; };
</script></body></html>"""
UPLOAD_PAGE = """<!DOCTYPE html><html><head><title>upload</title></head><body>
<form><input id="upload" type="file" name="upload"> <input id="note" type="text"></form>
</body></html>"""


def site_app() -> web.Application:
    """The static test site, plus /slow: a page that takes SLOW_PAGE_SECONDS to answer, and
    /events.html and /upload.html."""

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(SLOW_PAGE_SECONDS)
        return web.Response(text="<html><title>slow</title></html>", content_type="text/html")

    def page(html: str):
        async def handler(request: web.Request) -> web.Response:
            return web.Response(text=html, content_type="text/html")
        return handler

    async def no_store(request: web.Request, response: web.StreamResponse) -> None:
        # PhantomJS keeps one page cache for all its sessions. CI once caught an empty
        # index.html in it (url right, source `<html><head></head><body></body></html>`), and
        # every later load in every session got that page from the cache: nothing is kept.
        response.headers["Cache-Control"] = "no-store"
        response.headers.pop("Last-Modified", None)
        response.headers.pop("ETag", None)

    app = web.Application()
    app.on_response_prepare.append(no_store)
    app.router.add_get("/slow", slow)
    app.router.add_get("/events.html", page(EVENTS_PAGE))
    app.router.add_get("/upload.html", page(UPLOAD_PAGE))
    app.router.add_static("/", SITE)
    return app


class _Servers:
    """The test site's aiohttp app in a loop on a thread: Selenium's client is blocking."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-site",
                                       daemon=True)
        self.runners: list[web.AppRunner] = []

    async def _start_app(self, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    def start(self) -> str:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self._start_app(site_app()), self.loop).result(30)

    def stop(self) -> None:
        async def cleanup() -> None:
            for runner in self.runners:
                await runner.cleanup()
        asyncio.run_coroutine_threadsafe(cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    servers = _Servers()
    try:
        yield servers.start()
    finally:
        servers.stop()


@pytest.fixture(scope="module")
def proxy(bridged_phantom: str) -> Iterator[Proxy]:
    proxy = start_proxy("--backend", bridged_phantom, "--check-interval", "500ms")
    try:
        wait_up(proxy, 1)
        yield proxy
    finally:
        proxy.shutdown()
        proxy.pump.join(5)
        close_pipes(proxy.proc)


@pytest.fixture(scope="module")
def endpoint(proxy) -> str:
    """Where Selenium 4 connects: a real stickyproxy in front of one PhantomJS."""
    return proxy.url


def new_driver(endpoint: str) -> webdriver.Remote:
    # A RemoteConnection built from a ClientConfig: passing the URL string makes Selenium
    # (4.3x+) warn about its own deprecated remote_server_addr argument.
    connection = RemoteConnection(client_config=ClientConfig(remote_server_addr=endpoint,
                                                             timeout=60))
    return webdriver.Remote(command_executor=connection, options=PhantomJSOptions())


@pytest.fixture(scope="module")
def driver(endpoint: str) -> Iterator[webdriver.Remote]:
    drv = new_driver(endpoint)
    try:
        yield drv
    finally:
        drv.quit()


def _settled(driver: webdriver.Remote, navigate, marker: str) -> None:
    """Navigate, then wait as a PhantomJS user must until the new document is there with the
    element `marker`: GhostDriver may answer a get or refresh before the new page has replaced
    the old one (seen in CI). A wait that fails says what the browser shows instead."""
    driver.execute_script("window.__replaced = false;")
    navigate()
    try:
        wait_for(lambda: driver.execute_script(
            "return window.__replaced !== false && document.readyState === 'complete'"
            " && !!document.getElementById(arguments[0]);", marker),
            20, what=f"a new document with #{marker}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the browser shows url={driver.current_url!r} "
                             f"title={driver.title!r} windows={len(driver.window_handles)} "
                             f"source={driver.page_source[:300]!r}") from None


@pytest.fixture
def browser(endpoint, site) -> Iterator[webdriver.Remote]:
    """A session of its own for each test (one test's windows, frames, dialogs or mouse state
    cannot leak into the next), on the test site's front page."""
    drv = new_driver(endpoint)
    try:
        drv.set_window_size(1024, 768)
        drv.timeouts = Timeouts(implicit_wait=0, page_load=30, script=5)
        _settled(drv, lambda: drv.get(site + "/index.html"), "heading")
        drv.delete_all_cookies()  # PhantomJS keeps one cookie jar for all its sessions
        yield drv
    finally:
        drv.quit()


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _first_pixel(png: bytes) -> tuple[int, ...]:
    """The top-left pixel of a PNG written by bridge.crop_png (rows use filter 0)."""
    pos, idat, color = 8, b"", 6
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        data = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            color = data[9]
        elif kind == b"IDAT":
            idat += data
        pos += 12 + length
    raw = zlib.decompress(idat)
    assert raw[0] == 0
    return tuple(raw[1:1 + (4 if color == 6 else 3)])


# --- the scraping script -------------------------------------------------------------------

def test_new_session_answers_w3c_capabilities(driver) -> None:
    caps = driver.capabilities
    assert caps["browserName"] == "phantomjs"
    assert caps["browserVersion"].startswith("2.")
    assert caps["platformName"] == "linux"
    assert set(caps["timeouts"]) == {"implicit", "pageLoad", "script"}


def test_capabilities_reach_ghostdriver(endpoint, site) -> None:
    options = PhantomJSOptions()
    # GhostDriver's atoms sniff the user agent: it must still say AppleWebKit.
    agent = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/538.1 (KHTML, like Gecko) stickyproxy-test/1.0"
    options.set_capability("phantomjs:page.settings.userAgent", agent)
    options.timeouts = {"implicit": 2000, "script": 7000}
    drv = webdriver.Remote(command_executor=RemoteConnection(
        client_config=ClientConfig(remote_server_addr=endpoint, timeout=60)), options=options)
    try:
        assert drv.capabilities["timeouts"]["implicit"] == 2000
        t = drv.timeouts
        assert (t.implicit_wait, t.script) == (2, 7)
        drv.get(site + "/dynamic.html")
        assert drv.execute_script("return navigator.userAgent") == agent
        # The implicit wait asked for at creation is in force: #late appears after 400 ms.
        assert drv.find_element(By.ID, "late").text == "arrived late"
    finally:
        drv.quit()


def test_scrape_products_with_css_xpath_and_link_text(browser, site) -> None:
    assert browser.title == "Bridge test shop"
    assert browser.current_url == site + "/index.html"
    products = browser.find_elements(By.CSS_SELECTOR, "li.product")
    scraped = [(p.get_attribute("data-sku"), p.find_element(By.TAG_NAME, "a").text,
                float(p.find_element(By.CLASS_NAME, "price").text)) for p in products]
    assert scraped == [("A1", "Anvil", 12.5), ("B2", "Bucket", 3.2), ("C3", "Chisel", 7.05)]
    by_xpath = browser.find_element(By.XPATH, "//li[@data-sku='B2']/a")
    assert by_xpath.get_attribute("href") == site + "/product-b.html"  # property: absolute
    assert by_xpath.get_dom_attribute("href") == "product-b.html"  # attribute: as written
    assert by_xpath.tag_name == "a"
    assert browser.find_element(By.ID, "heading").text == "Products"
    assert "Chisel" in browser.page_source
    browser.find_element(By.PARTIAL_LINK_TEXT, "Chis").click()
    assert browser.find_element(By.ID, "product").text == "Product c"
    browser.back()
    assert browser.title == "Bridge test shop"
    browser.forward()
    assert browser.title == "Product c"
    _settled(browser, browser.refresh, "product")
    browser.find_element(By.LINK_TEXT, "back").click()
    assert browser.find_element(By.ID, "heading").is_displayed()


def test_element_state_and_geometry(browser) -> None:
    assert browser.find_element(By.ID, "agree").is_selected()
    assert browser.find_element(By.ID, "agree").get_attribute("checked") == "true"
    assert browser.find_element(By.ID, "agree").get_dom_attribute("checked") == "true"
    assert browser.find_element(By.ID, "agree").get_property("checked") is True
    locked = browser.find_element(By.ID, "locked")
    assert not locked.is_enabled()
    assert locked.get_property("value") == "fixed"
    assert not browser.find_element(By.ID, "secret").is_displayed()
    banner = browser.find_element(By.ID, "banner")
    assert banner.rect == {"x": 10, "y": 10, "width": 120, "height": 40}
    assert banner.location == {"x": 10, "y": 10} and banner.size == {"width": 120, "height": 40}
    assert banner.value_of_css_property("background-color") in ("rgb(255, 0, 0)",
                                                                "rgba(255, 0, 0, 1)")
    heading = browser.find_element(By.ID, "heading")
    assert browser.execute_script("return arguments[0];", heading) == heading


def test_form_typing_and_submit(browser, site) -> None:
    browser.find_element(By.ID, "to-form").click()
    name = browser.find_element(By.NAME, "name")
    assert name.get_attribute("value") == "placeholder"
    name.clear()
    name.send_keys("Ada Lovelace")
    browser.find_element(By.ID, "qty").send_keys("3")
    browser.find_element(By.ID, "notes").send_keys("fragile, handle with care")
    browser.find_element(By.ID, "gift").click()
    assert browser.find_element(By.ID, "gift").is_selected()
    browser.find_element(By.ID, "qty").submit()
    assert browser.title == "Order received"
    assert browser.find_element(By.ID, "got-name").text == "Ada Lovelace"
    assert browser.find_element(By.ID, "got-qty").text == "3"
    assert browser.find_element(By.ID, "got-notes").text == "fragile, handle with care"
    assert browser.find_element(By.ID, "got-gift").text == "yes"
    assert browser.current_url.startswith(site + "/result.html?")


def test_content_built_by_javascript_and_scripts(browser) -> None:
    browser.find_element(By.ID, "to-dynamic").click()
    rows = browser.find_elements(By.CSS_SELECTOR, "#board .row")
    assert [r.text for r in rows] == ["Anvil: 12.50", "Bucket: 3.20", "Chisel: 7.05"]
    assert browser.execute_script("return window.total") == pytest.approx(22.75)
    # Elements travel both ways through scripts, nested in lists and objects.
    got = browser.execute_script(
        "return {rows: document.querySelectorAll('.row').length, first: arguments[0][0],"
        " all: [arguments[1].el]};", [rows[0]], {"el": rows[1]})
    assert got["rows"] == 3 and got["first"] == rows[0] and got["all"] == [rows[1]]
    prices = browser.execute_script(
        "return Array.prototype.map.call(arguments[0], function (r) {"
        " return parseFloat(r.getAttribute('data-price')); });", rows)
    assert prices == [12.5, 3.2, 7.05]
    result = browser.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "setTimeout(function () { done({sum: arguments.length, el: document.body}); }, 50);")
    assert result["el"] == browser.find_element(By.TAG_NAME, "body")
    browser.implicitly_wait(3)
    assert browser.find_element(By.ID, "late").text == "arrived late"
    active = browser.switch_to.active_element
    assert active == browser.find_element(By.TAG_NAME, "body")


def test_timeouts_round_trip(browser) -> None:
    browser.implicitly_wait(1.5)
    browser.set_script_timeout(4)
    browser.set_page_load_timeout(20)
    t = browser.timeouts
    assert (t.implicit_wait, t.script, t.page_load) == (1.5, 4, 20)
    browser.implicitly_wait(0)
    started = time.monotonic()
    with pytest.raises(NoSuchElementException):
        browser.find_element(By.ID, "never-there")
    assert time.monotonic() - started < 1.0


def test_screenshots(browser) -> None:
    page = browser.get_screenshot_as_png()
    width, height = _png_size(page)
    assert width >= 1024 and height > 0
    banner = browser.find_element(By.ID, "banner").screenshot_as_png
    assert _png_size(banner) == (120, 40)
    # The crop holds the banner's red, not a neighbour's pixels.
    assert browser.find_element(By.ID, "banner").screenshot_as_base64 == \
        base64.b64encode(banner).decode()
    assert _first_pixel(banner)[:3] == (255, 0, 0)


def test_cookies(browser, site) -> None:
    browser.add_cookie({"name": "basket", "value": "A1,C3", "path": "/"})
    browser.find_element(By.ID, "to-dynamic").click()  # this page sets visited=dynamic
    names = {c["name"]: c["value"] for c in browser.get_cookies()}
    assert names == {"basket": "A1,C3", "visited": "dynamic"}
    cookie = browser.get_cookie("basket")
    assert cookie["value"] == "A1,C3" and cookie["path"] == "/" and "httpOnly" in cookie
    assert browser.get_cookie("nope") is None  # `no such cookie` answered, None to the caller
    browser.delete_cookie("basket")
    assert [c["name"] for c in browser.get_cookies()] == ["visited"]
    browser.delete_all_cookies()
    assert browser.get_cookies() == []
    expiry = int(time.time()) + 3600
    browser.add_cookie({"name": "session", "value": "s3cr3t", "httpOnly": True, "secure": False,
                        "expiry": expiry, "sameSite": "Strict"})
    cookie = browser.get_cookie("session")
    assert cookie["httpOnly"] is True and cookie["domain"].endswith("127.0.0.1")
    assert abs(cookie["expiry"] - expiry) <= 1
    assert browser.execute_script("return document.cookie").find("s3cr3t") < 0  # httpOnly


def test_frames(browser) -> None:
    browser.find_element(By.ID, "to-frames").click()
    browser.switch_to.frame(browser.find_element(By.ID, "catalogue"))
    assert browser.find_element(By.ID, "inner-text").text == "inside the frame"
    browser.switch_to.frame(0)
    assert browser.find_element(By.ID, "nested-text").text == "two levels down"
    browser.switch_to.parent_frame()
    assert browser.find_element(By.ID, "inner-text").text == "inside the frame"
    browser.switch_to.parent_frame()
    assert browser.find_element(By.ID, "outer").text == "outer page"
    browser.switch_to.frame("catalogue")
    browser.switch_to.default_content()
    assert browser.find_element(By.ID, "outer").text == "outer page"
    with pytest.raises(NoSuchFrameException):
        browser.switch_to.frame(7)


def test_windows(browser) -> None:
    main = browser.current_window_handle
    browser.find_element(By.ID, "popup").click()
    wait_for(lambda: len(browser.window_handles) == 2, 5, what="the help window")
    other = next(h for h in browser.window_handles if h != main)
    browser.switch_to.window(other)
    assert browser.find_element(By.ID, "help").text == "Call us on 555-0100"
    browser.close()
    browser.switch_to.window(main)
    assert browser.window_handles == [main]
    browser.set_window_rect(width=800, height=600)
    assert browser.get_window_size() == {"width": 800, "height": 600}
    assert browser.get_window_position() == {"x": 0, "y": 0}
    browser.maximize_window()
    assert browser.get_window_rect()["width"] > 800
    created = browser.switch_to.new_window("window")
    assert created is None and len(browser.window_handles) == 2
    with pytest.raises(NoSuchWindowException):
        browser.switch_to.window("no-such-window")


def test_alerts_never_block(browser) -> None:
    browser.find_element(By.ID, "to-dynamic").click()
    browser.find_element(By.ID, "alert").click()
    assert browser.find_element(By.ID, "dialog-result").text == "after alert"
    browser.find_element(By.ID, "confirm").click()
    assert browser.find_element(By.ID, "dialog-result").text == "confirm:false"
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.accept()


def _reload_pointer_page(browser) -> tuple:
    _settled(browser, browser.refresh, "hover-target")
    return tuple(browser.find_element(By.ID, i) for i in ("hover-target", "pointer-log"))


def test_simple_actions_map_to_moveto_and_click(browser) -> None:
    target = browser.find_element(By.ID, "hover-target")
    log = browser.find_element(By.ID, "pointer-log")
    ActionChains(browser).move_to_element(target).click().perform()
    assert log.text == "clicked"
    target, log = _reload_pointer_page(browser)
    ActionChains(browser).click_and_hold(target).perform()
    assert log.text == "pressed"
    ActionChains(browser).release().perform()
    assert log.text == "clicked"
    target, log = _reload_pointer_page(browser)
    chain = ActionChains(browser).click_and_hold(target)
    chain.perform()
    assert log.text == "pressed"
    chain.reset_actions()  # DELETE /actions lets go of the held button
    assert log.text == "clicked"
    _, log = _reload_pointer_page(browser)
    rect = browser.find_element(By.ID, "hover-target").rect
    builder = ActionBuilder(browser)
    builder.pointer_action.move_to_location(rect["x"] + 5, rect["y"] + 5).click()
    builder.perform()
    assert log.text == "clicked"
    target, log = _reload_pointer_page(browser)
    ActionChains(browser).click(target).perform()
    assert log.text == "clicked"
    target, log = _reload_pointer_page(browser)
    ActionChains(browser).move_to_element_with_offset(target, -70, 0).click().perform()  # from centre
    assert log.text == "clicked"
    ActionChains(browser).move_to_element_with_offset(target, 0, 40).click().perform()  # below it
    assert log.text == "clicked"
    _, log = _reload_pointer_page(browser)
    ActionChains(browser).move_to_element_with_offset(
        browser.find_element(By.ID, "hover-target"), 0, 40).click().perform()
    assert log.text == "idle"
    link = browser.find_element(By.ID, "to-form")
    centre = (link.rect["x"] + link.rect["width"] // 2, link.rect["y"] + link.rect["height"] // 2)
    ActionChains(browser).move_to_element(link).move_by_offset(  # relative to the pointer
        rect["x"] + 3 - centre[0], rect["y"] + 3 - centre[1]).click().perform()
    assert log.text == "clicked"
    browser.find_element(By.ID, "to-form").click()
    browser.find_element(By.ID, "qty").click()
    ActionChains(browser).send_keys("42").perform()
    assert browser.find_element(By.ID, "qty").get_property("value") == "42"


# --- every error mapping, from a real failing command --------------------------------------

def test_missing_element_raises_no_such_element(browser) -> None:
    with pytest.raises(NoSuchElementException):
        browser.find_element(By.CSS_SELECTOR, "#does-not-exist")
    heading = browser.find_element(By.ID, "heading")
    with pytest.raises(NoSuchElementException):
        heading.find_element(By.XPATH, ".//table")
    assert heading.find_elements(By.TAG_NAME, "table") == []


def test_stale_element(browser) -> None:
    browser.find_element(By.ID, "to-dynamic").click()
    doomed = browser.find_element(By.ID, "doomed")
    browser.find_element(By.ID, "remove").click()
    with pytest.raises(StaleElementReferenceException):
        doomed.click()
    heading_gone = browser.find_element(By.ID, "board")
    browser.get(browser.current_url)
    with pytest.raises(StaleElementReferenceException):
        heading_gone.text


def test_element_state_errors(browser) -> None:
    with pytest.raises(ElementNotInteractableException):  # GhostDriver 11: not visible
        browser.find_element(By.ID, "secret").click()
    with pytest.raises(InvalidElementStateException):  # GhostDriver 12: disabled
        browser.find_element(By.ID, "locked").clear()


def test_bad_selectors(browser) -> None:
    with pytest.raises(InvalidSelectorException):
        browser.find_element(By.CSS_SELECTOR, "li[[")
    with pytest.raises(InvalidSelectorException):
        browser.find_element(By.XPATH, "//li[")


def test_script_errors_and_timeouts(browser) -> None:
    with pytest.raises(JavascriptException, match="no_such_function"):
        browser.execute_script("return no_such_function();")
    with pytest.raises(JavascriptException):
        browser.execute_async_script("throw new Error('async boom');")
    browser.set_script_timeout(0.3)
    with pytest.raises(TimeoutException, match="(?i)timed out"):
        browser.execute_async_script("var done = arguments[0];")  # never calls back


def test_page_load_timeout(browser, site) -> None:
    browser.set_page_load_timeout(0.5)
    try:
        with pytest.raises(TimeoutException):
            browser.get(site + "/slow")
    finally:
        browser.set_page_load_timeout(30)


def test_bad_arguments_and_cookies(browser) -> None:
    with pytest.raises(InvalidArgumentException):
        browser.execute("setTimeouts", {"implicit": -1})
    with pytest.raises(InvalidCookieDomainException):  # a domain this page is not on
        browser.add_cookie({"name": "x", "value": "y", "domain": "example.invalid"})
    with pytest.raises(UnableToSetCookieException):  # GhostDriver 25
        browser.add_cookie({"name": "", "value": "y", "domain": ""})
    with pytest.raises(NoSuchCookieException):
        browser.execute("getCookie", {"name": "absent"})


def test_refused_commands_name_themselves(browser) -> None:
    with pytest.raises(WebDriverException, match=r"unsupported operation|POST /session/\{id\}/print"):
        browser.print_page(PrintOptions())
    with pytest.raises(WebDriverException, match="minimize"):
        browser.minimize_window()
    with pytest.raises(WebDriverException, match="wheel"):
        ActionChains(browser).scroll_by_amount(0, 100).perform()
    with pytest.raises(WebDriverException, match="touch pointers"):
        touch = ActionBuilder(browser, mouse=PointerInput(interaction.POINTER_TOUCH, "finger"))
        touch.pointer_action.click()
        touch.perform()


def test_ended_session_is_invalid(endpoint) -> None:
    drv = new_driver(endpoint)
    drv.quit()
    with pytest.raises(InvalidSessionIdException):
        drv.title


# --- review fixes: each failed before its fix ----------------------------------------------

# A client that sets no timeouts gets W3C's (implicit 0, page load 300 s, script 30 s), not
# GhostDriver's own (200 ms implicit wait, scripts and page loads never time out).

def test_w3c_default_implicit_wait_without_asking(endpoint, site) -> None:
    drv = new_driver(endpoint)
    try:
        t = drv.timeouts
        assert (t.implicit_wait, t.page_load, t.script) == (0, 300, 30)
        _settled(drv, lambda: drv.get(site + "/index.html"), "heading")
        # GhostDriver's 200 ms implicit wait would find an element added 120 ms later.
        drv.execute_script("setTimeout(function () { var p = document.createElement('p');"
                           " p.id = 'soon'; document.body.appendChild(p); }, 120);")
        with pytest.raises(NoSuchElementException):
            drv.find_element(By.ID, "soon")
    finally:
        drv.quit()


def test_w3c_default_script_timeout_without_asking(endpoint) -> None:
    drv = new_driver(endpoint)  # its HTTP client gives up after 60 s
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutException):
            drv.execute_async_script("var done = arguments[0];")  # never calls back
        assert 29 <= time.monotonic() - started < 50
    finally:
        drv.quit()


def test_send_keys_of_a_local_file_path_selects_the_file(browser, site) -> None:
    """Selenium uploads a path that exists locally (POST /se/file) and, told the command is
    not found, types the path instead; GhostDriver then selects that file."""
    _settled(browser, lambda: browser.get(site + "/upload.html"), "upload")
    here = Path(__file__).resolve()
    field = browser.find_element(By.ID, "upload")
    field.send_keys(str(here))
    assert browser.execute_script(
        "var f = arguments[0].files; return f.length ? f[0].name : null;", field) == here.name


def test_double_click_fires_dblclick(browser, site) -> None:
    _settled(browser, lambda: browser.get(site + "/events.html"), "target")
    ActionChains(browser).double_click(browser.find_element(By.ID, "target")).perform()
    assert browser.find_element(By.ID, "events").text == \
        "mousedown mouseup click mousedown mouseup click dblclick"
    assert browser.title == "double-clicked"


def test_release_actions_lets_go_of_modifier_keys(browser, site) -> None:
    _settled(browser, lambda: browser.get(site + "/upload.html"), "note")
    note = browser.find_element(By.ID, "note")
    note.click()
    chain = ActionChains(browser).key_down(Keys.SHIFT)
    chain.perform()
    ActionChains(browser).send_keys("a").perform()
    chain.reset_actions()  # DELETE /actions: shift goes up
    ActionChains(browser).send_keys("b").perform()
    assert note.get_property("value") == "Ab"


def test_odd_input_is_invalid_argument_end_to_end(endpoint, browser) -> None:
    with pytest.raises(InvalidArgumentException):  # Python's json sends Infinity
        browser.set_window_rect(width=float("inf"), height=600)
    status, body = _http("POST", endpoint + "/session",
                         {"capabilities": {"alwaysMatch": "phantomjs"}})
    assert (status, body["value"]["error"]) == (400, "invalid argument")


def test_logs_through_selenium_extensions(browser) -> None:
    browser.execute_script("console.log('hello from the page');")
    assert set(browser.execute(Command.GET_AVAILABLE_LOG_TYPES)["value"]) >= {"browser", "har"}
    entries = browser.execute(Command.GET_LOG, {"type": "browser"})["value"]
    assert any("hello from the page" in e["message"] for e in entries)


# --- the new-session payload on a W3C backend ----------------------------------------------

def _http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


@pytest.fixture
def chromedriver() -> Iterator[str]:
    binary = shutil.which("chromedriver")
    if binary is None:
        pytest.skip("chromedriver not installed (Debian: chromium chromium-driver)")
    port = _free_port()
    proc = subprocess.Popen([binary, f"--port={port}", "--allowed-ips=127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"chromedriver exited with {proc.returncode}")
        try:
            return _http("GET", url + "/status")[0] == 200
        except OSError:
            return False

    try:
        wait_for(up, 15, what="chromedriver /status")
        yield url
    finally:
        stop_processes([proc])


def test_bridged_new_session_payload_keeps_a_w3c_backend_w3c(chromedriver) -> None:
    """The proxy sends `new_session_request(payload)` to whatever backend it picked; a W3C
    backend ignores the added desiredCapabilities and answers W3C, so no bridge is set up."""
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    payload = {"capabilities": {"firstMatch": [{}], "alwaysMatch": options.to_capabilities()}}
    assert bridge.client_dialect(payload) == "w3c"
    status, body = _http("POST", chromedriver + "/session", bridge.new_session_request(payload))
    assert status == 200, body
    try:
        assert bridge.response_dialect(body) == "w3c"
        assert body["value"]["capabilities"]["browserName"] in ("chrome", "chrome-headless-shell")
    finally:
        _http("DELETE", f"{chromedriver}/session/{body['value']['sessionId']}")
