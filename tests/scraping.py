"""One realistic scraping script for the Selenium 4 client, run unchanged against PhantomJS
(through the bridge) and Chromium (passed through), both behind a real stickyproxy.

It returns what it read; the tests check it. The one place the browsers differ is dialogs:
Chromium blocks on alert() until the script accepts it, PhantomJS never blocks (GhostDriver has
no dialog support), so Selenium sees no alert there.
"""

from __future__ import annotations

from selenium.common.exceptions import NoAlertPresentException, NoSuchElementException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def scrape(driver, site: str) -> dict:
    out: dict = {}
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(5)
    driver.get(site + "/index.html")
    out["title"] = driver.title
    products = driver.find_elements(By.CSS_SELECTOR, "li.product")
    out["skus"] = [p.get_attribute("data-sku") for p in products]
    out["prices"] = [e.text for e in driver.find_elements(By.XPATH, "//span[@class='price']")]
    out["agree"] = driver.find_element(By.ID, "agree").is_selected()
    out["locked_enabled"] = driver.find_element(By.ID, "locked").is_enabled()
    out["secret_displayed"] = driver.find_element(By.ID, "secret").is_displayed()
    try:
        driver.find_element(By.ID, "no-such-thing")
        out["missing"] = "found"
    except NoSuchElementException:
        out["missing"] = "NoSuchElementException"

    driver.find_element(By.LINK_TEXT, "Bucket").click()
    out["product_title"] = driver.title
    driver.back()
    out["back_title"] = driver.title

    # A form: type, submit, read what the next page shows.
    driver.find_element(By.PARTIAL_LINK_TEXT, "Order").click()
    name = driver.find_element(By.ID, "name")
    name.clear()
    name.send_keys("Ada Lovelace")
    driver.find_element(By.ID, "qty").send_keys("3")
    driver.find_element(By.ID, "gift").click()
    driver.find_element(By.ID, "order").submit()
    # Selenium 4 submits by script on a W3C browser and does not wait for the next page (a real
    # scraper waits for what it reads next, as here).
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.ID, "got-name"))
    out["order"] = {k: driver.find_element(By.ID, f"got-{k}").text for k in ("name", "qty", "gift")}

    # Content built by JavaScript, some of it late; sync and async scripts.
    driver.get(site + "/dynamic.html")
    out["rows"] = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#board .row")]
    out["total"] = driver.execute_script("return window.total;")
    board = driver.find_element(By.ID, "board")
    out["rows_by_script"] = driver.execute_script(
        "return arguments[0].querySelectorAll('.row').length;", board)
    out["async"] = driver.execute_async_script(
        "var done = arguments[arguments.length - 1]; setTimeout(function () { done(6 * 7); }, 50);")
    driver.implicitly_wait(5)
    out["late"] = driver.find_element(By.ID, "late").text
    driver.implicitly_wait(0)

    # A dialog.
    driver.find_element(By.ID, "alert").click()
    try:
        alert = driver.switch_to.alert
        out["alert_text"] = alert.text
        alert.accept()
    except NoAlertPresentException:
        out["alert_text"] = None
    out["after_alert"] = driver.find_element(By.ID, "dialog-result").text

    # Cookies: one set by the page, one by us.
    driver.add_cookie({"name": "basket", "value": "3-items"})
    out["cookies"] = sorted(c["name"] for c in driver.get_cookies())
    out["basket"] = driver.get_cookie("basket")["value"]

    # An iframe.
    driver.get(site + "/frames.html")
    driver.switch_to.frame(driver.find_element(By.ID, "catalogue"))
    out["inner"] = driver.find_element(By.ID, "inner-text").text
    driver.switch_to.default_content()
    out["outer"] = driver.find_element(By.ID, "outer").text

    # A second window.
    driver.get(site + "/index.html")
    first = driver.current_window_handle
    driver.find_element(By.ID, "popup").click()
    handles = [h for h in driver.window_handles if h != first]
    driver.switch_to.window(handles[0])
    out["popup_title"] = driver.title
    driver.close()
    driver.switch_to.window(first)
    out["windows_after_close"] = len(driver.window_handles)

    out["screenshot_png"] = driver.get_screenshot_as_png()[:8] == b"\x89PNG\r\n\x1a\n"
    banner = driver.find_element(By.ID, "banner")
    out["banner_rect"] = {k: banner.rect[k] for k in ("x", "y", "width", "height")}
    out["banner_png"] = banner.screenshot_as_png[:8] == b"\x89PNG\r\n\x1a\n"
    return out


def check(out: dict, site: str) -> None:
    """What both browsers must have read."""
    assert out["title"] == "Bridge test shop"
    assert out["skus"] == ["A1", "B2", "C3"]
    assert out["prices"] == ["12.50", "3.20", "7.05"]
    assert (out["agree"], out["locked_enabled"], out["secret_displayed"]) == (True, False, False)
    assert out["missing"] == "NoSuchElementException"
    assert out["back_title"] == "Bridge test shop" and out["product_title"] != out["back_title"]
    assert out["order"] == {"name": "Ada Lovelace", "qty": "3", "gift": "yes"}
    assert out["rows"] == ["Anvil: 12.50", "Bucket: 3.20", "Chisel: 7.05"]
    assert abs(out["total"] - 22.75) < 1e-9 and out["rows_by_script"] == 3 and out["async"] == 42
    assert out["late"] == "arrived late"
    assert out["after_alert"] == "after alert"
    assert out["alert_text"] in ("hello", None)
    assert {"basket", "visited"} <= set(out["cookies"]) and out["basket"] == "3-items"
    assert (out["inner"], out["outer"]) == ("inside the frame", "outer page")
    assert out["windows_after_close"] == 1 and out["popup_title"]
    assert out["screenshot_png"] and out["banner_png"]
    assert out["banner_rect"] == {"x": 10, "y": 10, "width": 120, "height": 40}
