"""A Selenium 3 client, run by the tests under the Selenium 3 virtualenv.

Argument: one JSON object:
  proxy      base URL of stickyproxy (the client uses <proxy>/wd/hub, as Selenium 3 users do)
  page       URL of tests/pages/index.html
  sessions   how many sessions, run `concurrency` at a time
  cookie     true: send a unique Cookie header per session (the HAProxy `balance hdr(Cookie)` trick)
  hold       true: open every session first, print {"held": [ids]}, wait for a line on stdin,
             then run the workload in all of them at once
  abandon    true: never quit (a client that crashed or forgot)
  repeat     run the workload this many times per session (default 1)
Prints one JSON line: {"results": [{"id", "ok", "error", "seconds", "title", "items"}]}.
"""

import json
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from selenium import webdriver
from selenium.webdriver.common.desired_capabilities import DesiredCapabilities
from selenium.webdriver.remote.remote_connection import RemoteConnection

args = json.loads(sys.argv[1])
hub = args["proxy"].rstrip("/") + "/wd/hub"


def connection():
    if not args.get("cookie"):
        return RemoteConnection(hub, keep_alive=True)
    cookie = "SESSION=" + uuid.uuid4().hex

    class CookieConnection(RemoteConnection):  # the patch users of the HAProxy recipe apply
        @classmethod
        def get_remote_connection_headers(cls, parsed_url, keep_alive=False):
            headers = RemoteConnection.get_remote_connection_headers(parsed_url, keep_alive)
            headers["Cookie"] = cookie
            return headers

    return CookieConnection(hub, keep_alive=True)


def open_session():
    return webdriver.Remote(command_executor=connection(),
                            desired_capabilities=DesiredCapabilities.PHANTOMJS.copy())


def workload(driver):
    driver.get(args["page"])
    title = driver.title
    items = [e.text for e in driver.find_elements_by_css_selector(".item")]
    driver.find_element_by_id("next").click()
    assert driver.find_element_by_id("text").text == "you followed the link"
    assert driver.execute_script("return 1 + 2") == 3
    return title, items


def run(driver=None):
    started = time.monotonic()
    result = {"id": None, "ok": False, "error": None}
    try:
        driver = driver or open_session()
        result["id"] = driver.session_id
        for _ in range(args.get("repeat", 1)):
            result["title"], result["items"] = workload(driver)
        if not args.get("abandon"):
            driver.quit()
        result["ok"] = True
    except Exception as exc:  # reported to the test, which decides what was expected
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


def main():
    count, concurrency = args.get("sessions", 1), args.get("concurrency", 1)
    if args.get("hold"):
        with ThreadPoolExecutor(count) as pool:
            drivers = list(pool.map(lambda _: open_session(), range(count)))
        print(json.dumps({"held": [d.session_id for d in drivers]}), flush=True)
        sys.stdin.readline()
        with ThreadPoolExecutor(count) as pool:
            results = list(pool.map(run, drivers))
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda _: run(), range(count)))
    print(json.dumps({"results": results}), flush=True)


main()
