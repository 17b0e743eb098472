"""Table-driven tests of the W3C -> JSONWP bridge's translations: data in, data out, no sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import zlib
from typing import Any

import pytest

from stickyproxy import bridge
from stickyproxy.bridge import JSONWP_ELEMENT, W3C_ELEMENT, BridgeSession, Plan, Reply
from stickyproxy.webdriver import WebDriverError

E = "elem-1"
REF = {W3C_ELEMENT: E, JSONWP_ELEMENT: E}  # how the bridge answers an element


def ok(value: Any = None) -> tuple[int, dict]:
    return 200, {"sessionId": "s", "status": 0, "value": value}


def fail(code: int, message: str = "boom") -> tuple[int, dict]:
    inner = '{"errorMessage":"%s","request":{"url":"/x"}}' % message
    return 500, {"sessionId": "s", "status": code, "value": {"message": inner}}


def drive(step: Any, answers: dict[tuple[str, str], Any]) -> tuple[Reply, list]:
    """Run a step with `bridge.run` against canned backend answers; return the reply and
    the calls made. An answer may be a list, consumed in order for repeated calls."""
    made: list = []

    async def send(method: str, subpath: str, body: Any) -> Any:
        made.append((method, subpath, body))
        answer = answers[(method, subpath)]
        return answer.pop(0) if isinstance(answer, list) else answer

    return asyncio.run(bridge.run(step, send)), made


# --- dialects ------------------------------------------------------------------------------

SELENIUM4_PAYLOAD = {"capabilities": {"firstMatch": [{}], "alwaysMatch": {
    "browserName": "phantomjs", "pageLoadStrategy": "normal"}}}
SELENIUM3_PAYLOAD = {"capabilities": {"firstMatch": [{}], "alwaysMatch": {
    "browserName": "phantomjs"}}, "desiredCapabilities": {"browserName": "phantomjs"}}


@pytest.mark.parametrize("payload, dialect", [
    (SELENIUM4_PAYLOAD, "w3c"),
    (SELENIUM3_PAYLOAD, "jsonwp"),  # Selenium 3 speaks JSONWP to a JSONWP backend: no bridge
    ({"desiredCapabilities": {}}, "jsonwp"),
    ({}, "w3c"),
    (None, "w3c"),
])
def test_client_dialect(payload, dialect) -> None:
    assert bridge.client_dialect(payload) == dialect


@pytest.mark.parametrize("body, dialect", [
    ({"sessionId": "a", "status": 0, "value": {"browserName": "phantomjs"}}, "jsonwp"),
    ({"value": {"sessionId": "a", "capabilities": {}}}, "w3c"),
    ({"value": {"error": "session not created"}}, None),
    ("Internal Server Error", None),
])
def test_response_dialect(body, dialect) -> None:
    assert bridge.response_dialect(body) == dialect


# --- new session ---------------------------------------------------------------------------

@pytest.mark.parametrize("always, first, desired", [
    ({"browserName": "phantomjs"}, {}, {"browserName": "phantomjs"}),
    ({}, {}, {"browserName": "phantomjs"}),
    ({"browserVersion": "2.1", "platformName": "linux"}, {},
     {"browserName": "phantomjs", "version": "2.1", "platform": "LINUX"}),
    ({"acceptInsecureCerts": True, "pageLoadStrategy": "eager"}, {},
     {"browserName": "phantomjs", "acceptSslCerts": True, "pageLoadStrategy": "eager"}),
    ({"unhandledPromptBehavior": "accept and notify"}, {},
     {"browserName": "phantomjs", "unexpectedAlertBehaviour": "accept"}),
    ({"proxy": {"proxyType": "manual", "httpProxy": "127.0.0.1:3128"}}, {},
     {"browserName": "phantomjs", "proxy": {"proxyType": "manual", "httpProxy": "127.0.0.1:3128"}}),
    # Vendor extensions are dropped; GhostDriver's own keys pass, in either spelling.
    ({"goog:chromeOptions": {"args": []}, "se:cdp": "x", "moz:firefoxOptions": {}}, {},
     {"browserName": "phantomjs"}),
    ({"phantomjs:page.settings.userAgent": "UA", "phantomjs.page.customHeaders.X": "1"}, {},
     {"browserName": "phantomjs", "phantomjs.page.settings.userAgent": "UA",
      "phantomjs.page.customHeaders.X": "1"}),
    # timeouts are applied after creation; no JSONWP names for the rest.
    ({"timeouts": {"implicit": 5}, "setWindowRect": True, "strictFileInteractability": True},
     {}, {"browserName": "phantomjs"}),
    # firstMatch[0] merges over alwaysMatch
    ({"browserName": "phantomjs"}, {"pageLoadStrategy": "none"},
     {"browserName": "phantomjs", "pageLoadStrategy": "none"}),
])
def test_new_session_request(always, first, desired) -> None:
    payload = {"capabilities": {"alwaysMatch": always, "firstMatch": [first]}}
    out = bridge.new_session_request(payload)
    assert out["desiredCapabilities"] == desired
    # The client's W3C capabilities go along untouched: a W3C backend keeps using them.
    assert out["capabilities"] == payload["capabilities"]


GHOSTDRIVER_CAPS = {"browserName": "phantomjs", "version": "2.1.1", "driverName": "ghostdriver",
                    "driverVersion": "1.2.0", "platform": "linux-unknown-64bit",
                    "acceptSslCerts": False, "handlesAlerts": False,
                    "proxy": {"proxyType": "direct"}}


def test_new_session_response_success() -> None:
    payload = {"capabilities": {"alwaysMatch": {"timeouts": {"implicit": 1500}}}}
    status, body, sid = bridge.new_session_response(
        200, {"sessionId": "abc", "status": 0, "value": GHOSTDRIVER_CAPS}, payload)
    assert (status, sid) == (200, "abc")
    assert body["value"]["sessionId"] == "abc"
    caps = body["value"]["capabilities"]
    assert caps["browserName"] == "phantomjs"
    assert caps["browserVersion"] == "2.1.1"
    assert caps["platformName"] == "linux"
    assert caps["acceptInsecureCerts"] is False
    assert caps["timeouts"] == {"implicit": 1500, "pageLoad": 300000, "script": 30000}
    assert caps["unhandledPromptBehavior"] == "dismiss"
    assert caps["driverName"] == "ghostdriver"  # GhostDriver's own keys stay visible


@pytest.mark.parametrize("status, body, message", [
    (500, {"sessionId": None, "status": 33, "value": {"message": "no"}}, "no"),
    (500, {"sessionId": None, "status": 13, "value": {"message": "crashed"}}, "crashed"),
    (500, "Internal Server Error", "HTTP 500"),
    (200, {"status": 0, "value": {}}, "without a session id"),
    (404, "Variable Resource Not Found - {}", "invalid session id"),
])
def test_new_session_response_failure(status, body, message) -> None:
    http_status, answer, sid = bridge.new_session_response(status, body)
    assert (http_status, sid) == (500, None)
    assert answer["value"]["error"] == "session not created"
    assert message in answer["value"]["message"]


W3C_DEFAULT_SETUP = [("POST", "/timeouts", {"type": "implicit", "ms": 0}),
                     ("POST", "/timeouts", {"type": "page load", "ms": 300000}),
                     ("POST", "/timeouts", {"type": "script", "ms": 30000})]


def test_requested_timeouts_are_applied_after_creation() -> None:
    payload = {"capabilities": {"alwaysMatch": {"timeouts": {"implicit": 1500, "script": None}}}}
    session = BridgeSession.from_request(payload)
    setup = session.setup()
    reply, made = drive(setup, {("POST", "/timeouts"): ok({})})
    assert reply.status == 200
    # A null script timeout is what GhostDriver does already (never): not sent.
    assert made == [("POST", "/timeouts", {"type": "implicit", "ms": 1500}),
                    ("POST", "/timeouts", {"type": "page load", "ms": 300000})]
    assert session.timeouts == {"implicit": 1500, "pageLoad": 300000, "script": None}
    bad = {"capabilities": {"alwaysMatch": {"timeouts": {"implicit": -5, "pageLoad": None}}}}
    _, made = drive(BridgeSession.from_request(bad).setup(), {("POST", "/timeouts"): ok({})})
    assert made == W3C_DEFAULT_SETUP  # ignored, W3C defaults applied


# --- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("code, name, http", [
    (6, "invalid session id", 404),
    (7, "no such element", 404),
    (8, "no such frame", 404),
    (9, "unknown command", 404),
    (10, "stale element reference", 404),
    (11, "element not interactable", 400),
    (12, "invalid element state", 400),
    (13, "unknown error", 500),
    (15, "element not interactable", 400),
    (17, "javascript error", 500),
    (19, "invalid selector", 400),
    (21, "timeout", 500),
    (23, "no such window", 404),
    (24, "invalid cookie domain", 400),
    (25, "unable to set cookie", 500),
    (26, "unexpected alert open", 500),
    (27, "no such alert", 404),
    (28, "script timeout", 500),
    (32, "invalid selector", 400),
    (33, "session not created", 500),
    (34, "move target out of bounds", 500),
    (51, "invalid selector", 400),
    (52, "invalid selector", 400),
    (62, "no such cookie", 404),
    (99, "unknown error", 500),
])
def test_jsonwp_status_codes(code, name, http) -> None:
    reply = bridge.jsonwp_failure(fail(code, "it broke"))
    assert reply.status == http
    assert reply.body == {"value": {"error": name, "message": "it broke", "stacktrace": ""}}


@pytest.mark.parametrize("result, name, http", [
    ((404, "Variable Resource Not Found - {...}"), "invalid session id", 404),
    ((405, "Invalid Command Method - {...}"), "unknown command", 404),
    ((400, "Missing Command Parameter - {...}"), "invalid argument", 400),
    ((502, "<html>Bad Gateway</html>"), "unknown error", 500),
    ((200, "not json"), "unknown error", 500),
])
def test_ghostdriver_text_answers(result, name, http) -> None:
    reply = bridge.jsonwp_failure(result)
    assert (reply.body["value"]["error"], reply.status) == (name, http)


def test_success_is_not_a_failure() -> None:
    assert bridge.jsonwp_failure(ok([1])) is None


def test_no_error_status_above_500() -> None:
    # Selenium 3 clients treat HTTP > 500 as success.
    assert max(bridge.HTTP_STATUS.values()) <= 500
    assert all(bridge.HTTP_STATUS[name] <= 500 for name in bridge.JSONWP_ERRORS.values())


def test_plain_message_kept() -> None:
    reply = bridge.jsonwp_failure((500, {"status": 7, "value": {"message": "plain words"}}))
    assert reply.body["value"]["message"] == "plain words"


# --- element references --------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ({JSONWP_ELEMENT: E}, REF),
    ([{JSONWP_ELEMENT: E}, 3, "x"], [REF, 3, "x"]),
    ({"rows": [{"el": {JSONWP_ELEMENT: E}}]}, {"rows": [{"el": REF}]}),
    ({JSONWP_ELEMENT: E, "other": 1}, {JSONWP_ELEMENT: REF[JSONWP_ELEMENT], "other": 1}),
    (None, None),
])
def test_to_w3c(value, expected) -> None:
    assert bridge.to_w3c(value) == expected


@pytest.mark.parametrize("value, expected", [
    ({W3C_ELEMENT: E}, {JSONWP_ELEMENT: E}),
    ({JSONWP_ELEMENT: E}, {JSONWP_ELEMENT: E}),
    (REF, {JSONWP_ELEMENT: E}),
    ([{"a": [{W3C_ELEMENT: E}]}], [{"a": [{JSONWP_ELEMENT: E}]}]),
    ({}, {}),
])
def test_to_jsonwp(value, expected) -> None:
    assert bridge.to_jsonwp(value) == expected


# --- one backend call per command ----------------------------------------------------------

SCRIPT_BODY = {"script": "return arguments[0]", "args": [{W3C_ELEMENT: E}, [{W3C_ELEMENT: E}]]}

SIMPLE = [
    # W3C method, W3C subpath, W3C body, JSONWP call, JSONWP value, W3C value
    ("DELETE", "", None, ("DELETE", "", None), {}, {}),
    ("POST", "/url", {"url": "http://127.0.0.1/"}, ("POST", "/url", {"url": "http://127.0.0.1/"}),
     {}, None),
    ("GET", "/url", None, ("GET", "/url", None), "http://a/", "http://a/"),
    ("GET", "/title", None, ("GET", "/title", None), "T", "T"),
    ("GET", "/source", None, ("GET", "/source", None), "<html/>", "<html/>"),
    ("POST", "/back", {}, ("POST", "/back", {}), {}, None),
    ("POST", "/forward", {}, ("POST", "/forward", {}), {}, None),
    ("POST", "/refresh", {}, ("POST", "/refresh", {}), {}, None),
    ("GET", "/screenshot", None, ("GET", "/screenshot", None), "iVBOR", "iVBOR"),
    ("GET", "/window", None, ("GET", "/window_handle", None), "h1", "h1"),
    ("GET", "/window/handles", None, ("GET", "/window_handles", None), ["h1"], ["h1"]),
    ("POST", "/window", {"handle": "h2"}, ("POST", "/window", {"name": "h2"}), {}, None),
    ("POST", "/frame", {"id": None}, ("POST", "/frame", {"id": None}), {}, None),
    ("POST", "/frame", {"id": 2}, ("POST", "/frame", {"id": 2}), {}, None),
    ("POST", "/frame", {"id": {W3C_ELEMENT: E}}, ("POST", "/frame", {"id": {JSONWP_ELEMENT: E}}),
     {}, None),
    ("POST", "/element", {"using": "css selector", "value": "a"},
     ("POST", "/element", {"using": "css selector", "value": "a"}), {JSONWP_ELEMENT: E}, REF),
    ("POST", "/elements", {"using": "xpath", "value": "//a"},
     ("POST", "/elements", {"using": "xpath", "value": "//a"}), [{JSONWP_ELEMENT: E}], [REF]),
    ("POST", "/elements", {"using": "link text", "value": "x"},
     ("POST", "/elements", {"using": "link text", "value": "x"}), [], []),
    ("POST", f"/element/{E}/element", {"using": "partial link text", "value": "x"},
     ("POST", f"/element/{E}/element", {"using": "partial link text", "value": "x"}),
     {JSONWP_ELEMENT: E}, REF),
    ("POST", f"/element/{E}/elements", {"using": "tag name", "value": "li"},
     ("POST", f"/element/{E}/elements", {"using": "tag name", "value": "li"}), [], []),
    ("GET", "/element/active", None, ("POST", "/element/active", {}), {JSONWP_ELEMENT: E}, REF),
    ("POST", f"/element/{E}/click", {}, ("POST", f"/element/{E}/click", {}), {}, None),
    ("POST", f"/element/{E}/clear", {}, ("POST", f"/element/{E}/clear", {}), {}, None),
    ("POST", f"/element/{E}/value", {"text": "hi\n", "value": ["h", "i", "\n"]},
     ("POST", f"/element/{E}/value", {"value": ["h", "i", "\n"]}), None, None),
    ("GET", f"/element/{E}/text", None, ("GET", f"/element/{E}/text", None), "t", "t"),
    ("GET", f"/element/{E}/name", None, ("GET", f"/element/{E}/name", None), "a", "a"),
    ("GET", f"/element/{E}/selected", None, ("GET", f"/element/{E}/selected", None), True, True),
    ("GET", f"/element/{E}/enabled", None, ("GET", f"/element/{E}/enabled", None), False, False),
    ("GET", f"/element/{E}/displayed", None, ("GET", f"/element/{E}/displayed", None), True, True),
    ("GET", f"/element/{E}/css/color", None, ("GET", f"/element/{E}/css/color", None),
     "red", "red"),
    ("POST", "/execute/sync", SCRIPT_BODY,
     ("POST", "/execute", {"script": "return arguments[0]",
                           "args": [{JSONWP_ELEMENT: E}, [{JSONWP_ELEMENT: E}]]}),
     {"x": [{JSONWP_ELEMENT: E}]}, {"x": [REF]}),
    ("POST", "/execute/async", {"script": "arguments[0](1)", "args": []},
     ("POST", "/execute_async", {"script": "arguments[0](1)", "args": []}), 1, 1),
    ("POST", "/execute/sync", {"script": "return 1"},
     ("POST", "/execute", {"script": "return 1", "args": []}), 1, 1),
    # Selenium 4's atoms use ES2015 PhantomJS cannot parse: GhostDriver's own endpoints instead.
    ("POST", "/execute/sync", {"script": "/* isDisplayed */return (function(){}).apply(null, "
                               "arguments);", "args": [{W3C_ELEMENT: E}]},
     ("GET", f"/element/{E}/displayed", None), False, False),
    ("POST", "/execute/sync", {"script": "/* getAttribute */return (x).apply(null, arguments);",
                               "args": [{W3C_ELEMENT: E}, "data-x y"]},
     ("GET", f"/element/{E}/attribute/data-x%20y", None), "1", "1"),
    ("POST", "/execute/sync", {"script": "/* submitForm */var form = arguments[0];",
                               "args": [{W3C_ELEMENT: E}]},
     ("POST", f"/element/{E}/submit", {}), {}, None),
    ("DELETE", "/cookie", None, ("DELETE", "/cookie", None), {}, None),
    ("DELETE", "/cookie/a%20b", None, ("DELETE", "/cookie/a%20b", None), {}, None),
    ("POST", "/cookie", {"cookie": {"name": "a", "value": "b", "domain": "127.0.0.1",
                                    "sameSite": "Lax", "expiry": None, "httpOnly": True}},
     ("POST", "/cookie", {"cookie": {"name": "a", "value": "b", "domain": "127.0.0.1",
                                     "httponly": True, "path": "/"}}), {}, None),
]


@pytest.mark.parametrize("method, subpath, body, call, value, expected", SIMPLE,
                         ids=[f"{m} {p} {i}" for i, (m, p, *_) in enumerate(SIMPLE)])
def test_single_call_commands(method, subpath, body, call, value, expected) -> None:
    step = bridge.plan(method, subpath, body)
    assert isinstance(step, Plan)
    assert step.calls == (call,)
    reply, _ = drive(step, {call[:2]: ok(value)})
    assert reply == Reply(200, {"value": expected})


def test_element_ids_with_colons_pass_unchanged() -> None:
    step = bridge.plan("GET", "/element/:wdc:1795813165343/text")
    assert step.calls == (("GET", "/element/:wdc:1795813165343/text", None),)


# --- several backend calls per command -----------------------------------------------------

def test_element_rect_from_location_and_size() -> None:
    reply, made = drive(bridge.plan("GET", f"/element/{E}/rect"), {
        ("GET", f"/element/{E}/location"): ok({"x": 10, "y": 20, "toString": "function"}),
        ("GET", f"/element/{E}/size"): ok({"width": 30, "height": 40})})
    assert reply.body == {"value": {"x": 10, "y": 20, "width": 30, "height": 40}}
    assert [c[1] for c in made] == [f"/element/{E}/location", f"/element/{E}/size"]


def test_stops_at_first_failure() -> None:
    reply, made = drive(bridge.plan("GET", f"/element/{E}/rect"), {
        ("GET", f"/element/{E}/location"): fail(10, "Element does not exist in cache")})
    assert reply.status == 404
    assert reply.body["value"]["error"] == "stale element reference"
    assert len(made) == 1


def test_unexpected_backend_value_is_unknown_error() -> None:
    reply, _ = drive(bridge.plan("GET", f"/element/{E}/rect"), {
        ("GET", f"/element/{E}/location"): ok("weird"),
        ("GET", f"/element/{E}/size"): ok({})})
    assert (reply.status, reply.body["value"]["error"]) == (500, "unknown error")


def test_window_rect_get_set_maximize() -> None:
    answers = {("GET", "/window/current/position"): ok({"x": 0, "y": 0}),
               ("GET", "/window/current/size"): ok({"width": 800, "height": 600}),
               ("POST", "/window/current/size"): ok({}),
               ("POST", "/window/current/position"): ok({}),
               ("POST", "/window/current/maximize"): ok({})}
    rect = {"value": {"x": 0, "y": 0, "width": 800, "height": 600}}
    reply, made = drive(bridge.plan("GET", "/window/rect"), answers)
    assert reply.body == rect and len(made) == 2
    reply, made = drive(bridge.plan("POST", "/window/rect",
                                    {"x": None, "y": None, "width": 800, "height": 600}), answers)
    assert reply.body == rect
    assert made[0] == ("POST", "/window/current/size", {"width": 800, "height": 600})
    reply, made = drive(bridge.plan("POST", "/window/rect", {"x": 5, "y": 6}), answers)
    assert made[0] == ("POST", "/window/current/position", {"x": 5, "y": 6})
    reply, made = drive(bridge.plan("POST", "/window/maximize", {}), answers)
    assert made[0] == ("POST", "/window/current/maximize", {}) and reply.body == rect


def test_close_window_answers_remaining_handles() -> None:
    reply, made = drive(bridge.plan("DELETE", "/window"), {
        ("DELETE", "/window"): ok({}), ("GET", "/window_handles"): ok(["h1"])})
    assert reply.body == {"value": ["h1"]}


def test_new_window_opens_from_script_and_answers_the_new_handle() -> None:
    reply, made = drive(bridge.plan("POST", "/window/new", {"type": "tab"}), {
        ("GET", "/window_handles"): [ok(["h1"]), ok(["h1", "h2"])],
        ("POST", "/execute"): ok(None)})
    assert reply.body == {"value": {"handle": "h2", "type": "window"}}
    assert [c[1] for c in made] == ["/window_handles", "/execute", "/window_handles"]


@pytest.mark.parametrize("path, expected", [
    ([], [None]),
    ([0], [None]),
    ([0, 2], [None, 0]),
    ([1, 0, 3], [None, 1, 0]),
])
def test_parent_frame_goes_to_top_and_back_down(path, expected) -> None:
    reply, made = drive(bridge.plan("POST", "/frame/parent", {}), {
        ("POST", "/execute"): ok(path), ("POST", "/frame"): ok({})})
    assert reply == Reply(200, {"value": None})
    assert [c[2]["id"] for c in made[1:]] == expected


def test_attribute_and_property_via_script() -> None:
    step = bridge.plan("GET", f"/element/{E}/attribute/data-sku")
    assert step.calls[0][:2] == ("POST", "/execute")
    assert step.calls[0][2]["args"] == [{JSONWP_ELEMENT: E}, "data-sku"]
    assert "getAttribute" in step.calls[0][2]["script"]
    step = bridge.plan("GET", f"/element/{E}/property/checked")
    assert step.calls[0][2]["args"] == [{JSONWP_ELEMENT: E}, "checked"]
    reply, _ = drive(step, {("POST", "/execute"): ok(True)})
    assert reply.body == {"value": True}


def test_script_and_find_error_overrides() -> None:
    reply, _ = drive(bridge.plan("POST", "/execute/sync", {"script": "x(", "args": []}),
                     {("POST", "/execute"): fail(13, "SyntaxError")})
    assert (reply.status, reply.body["value"]["error"]) == (500, "javascript error")
    reply, _ = drive(bridge.plan("POST", "/element", {"using": "css selector", "value": "a[["}),
                     {("POST", "/element"): fail(12, "SyntaxError: DOM Exception 12")})
    assert (reply.status, reply.body["value"]["error"]) == (400, "invalid selector")
    # Elsewhere 12 keeps its meaning.
    reply, _ = drive(bridge.plan("POST", f"/element/{E}/clear", {}),
                     {("POST", f"/element/{E}/clear"): fail(12)})
    assert reply.body["value"]["error"] == "invalid element state"


# --- cookies -------------------------------------------------------------------------------

PJS_COOKIES = [{"domain": "127.0.0.1", "httponly": False, "name": "a", "path": "/",
                "secure": False, "value": "1", "expires": "Fri, 01 Jan 2100", "expiry": 4102444800.0},
               {"domain": "127.0.0.1", "httponly": True, "name": "b", "path": "/",
                "secure": False, "value": "2"}]


def test_get_cookies_normalised() -> None:
    reply, _ = drive(bridge.plan("GET", "/cookie"), {("GET", "/cookie"): ok(PJS_COOKIES)})
    assert reply.body["value"] == [
        {"name": "a", "value": "1", "path": "/", "domain": "127.0.0.1", "secure": False,
         "httpOnly": False, "expiry": 4102444800},
        {"name": "b", "value": "2", "path": "/", "domain": "127.0.0.1", "secure": False,
         "httpOnly": True}]


@pytest.mark.parametrize("name, status, value", [
    ("b", 200, "2"),
    ("zzz", 404, None),
])
def test_get_named_cookie(name, status, value) -> None:
    reply, _ = drive(bridge.plan("GET", f"/cookie/{name}"), {("GET", "/cookie"): ok(PJS_COOKIES)})
    assert reply.status == status
    if value is None:
        assert reply.body["value"]["error"] == "no such cookie"
    else:
        assert reply.body["value"]["value"] == value


def test_add_cookie_defaults_domain_to_current_page() -> None:
    reply, made = drive(bridge.plan("POST", "/cookie", {"cookie": {"name": "a", "value": "b"}}), {
        ("GET", "/url"): ok("http://127.0.0.1:8000/shop/index.html"),
        ("POST", "/cookie"): ok({})})
    assert reply.status == 200
    assert made[1] == ("POST", "/cookie", {"cookie": {"name": "a", "value": "b", "path": "/",
                                                      "domain": "127.0.0.1"}})
    reply, made = drive(bridge.plan("POST", "/cookie", {"cookie": {"name": "a", "value": "b"}}),
                        {("GET", "/url"): ok("about:blank")})
    assert reply.body["value"]["error"] == "invalid cookie domain"


# --- timeouts ------------------------------------------------------------------------------

def test_timeouts_one_call_per_type_and_remembered() -> None:
    session = BridgeSession()
    step = session.plan("POST", "/timeouts", {"implicit": 0, "pageLoad": 1000, "script": 200})
    reply, made = drive(step, {("POST", "/timeouts"): ok({})})
    assert reply == Reply(200, {"value": None})
    assert [c[2] for c in made] == [{"type": "implicit", "ms": 0},
                                    {"type": "page load", "ms": 1000},
                                    {"type": "script", "ms": 200}]
    assert session.plan("GET", "/timeouts") == Reply(
        200, {"value": {"implicit": 0, "pageLoad": 1000, "script": 200}})


def test_failed_timeouts_not_remembered() -> None:
    session = BridgeSession()
    drive(session.plan("POST", "/timeouts", {"implicit": 10}), {("POST", "/timeouts"): fail(13)})
    assert session.timeouts["implicit"] == 0


@pytest.mark.parametrize("body", [{"implicit": -1}, {"script": "1"}, {"pageLoad": None},
                                  {"implicit": True}, [1]])
def test_bad_timeouts(body) -> None:
    reply = bridge.plan("POST", "/timeouts", body)
    assert reply.status == 400 and reply.body["value"]["error"] == "invalid argument"


def test_huge_timeouts_are_clamped() -> None:
    step = bridge.plan("POST", "/timeouts", {"script": 10**12})
    assert step.calls == (("POST", "/timeouts", {"type": "script", "ms": 2**31 - 1}),)


# --- local answers and refusals ------------------------------------------------------------

@pytest.mark.parametrize("method, subpath", [
    ("GET", "/alert/text"), ("POST", "/alert/text"), ("POST", "/alert/accept"),
    ("POST", "/alert/dismiss"),
])
def test_alerts_are_never_open(method, subpath) -> None:
    reply = bridge.plan(method, subpath, {"text": "x"})
    assert reply.status == 404 and reply.body["value"]["error"] == "no such alert"


@pytest.mark.parametrize("method, subpath, named", [
    ("POST", "/print", "POST /session/{id}/print"),
    ("POST", "/window/minimize", "/window/minimize"),
    ("POST", "/window/fullscreen", "/window/fullscreen"),
    ("GET", f"/element/{E}/shadow", "/shadow"),
    ("GET", f"/element/{E}/computedrole", "/computedrole"),
    ("GET", f"/element/{E}/computedlabel", "/computedlabel"),
    ("POST", "/shadow/s1/element", "/shadow/s1/element"),
])
def test_refusals_name_the_command(method, subpath, named) -> None:
    reply = bridge.plan(method, subpath, {})
    assert reply.status == 500
    assert reply.body["value"]["error"] == "unsupported operation"
    assert named in reply.body["value"]["message"]


@pytest.mark.parametrize("method, subpath, body", [
    ("POST", "/url", {}),
    ("POST", "/url", {"url": 3}),
    ("POST", "/window", {}),
    ("POST", "/frame", {}),
    ("POST", "/frame", {"id": "name"}),
    ("POST", "/frame", {"id": -1}),
    ("POST", "/element", {"using": "css selector"}),
    ("POST", f"/element/{E}/value", {}),
    ("POST", "/execute/sync", {"script": 1, "args": []}),
    ("POST", "/execute/sync", {"script": "x", "args": {}}),
    ("POST", "/cookie", {"cookie": {"name": "a"}}),
    ("POST", "/window/rect", {"width": "big"}),
    ("POST", "/actions", {}),
    ("POST", "/actions", {"actions": [{"type": "pointer", "actions": [
        {"type": "pointerMove", "x": "a", "y": 0}]}]}),
])
def test_invalid_arguments(method, subpath, body) -> None:
    reply = bridge.plan(method, subpath, body)
    assert isinstance(reply, Reply)
    assert reply.status == 400 and reply.body["value"]["error"] == "invalid argument"


def test_trailing_slash_and_lowercase_method() -> None:
    assert bridge.plan("get", "/title/").calls == (("GET", "/title", None),)


# --- actions -------------------------------------------------------------------------------

def mouse(*actions: dict) -> dict:
    return {"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
            "actions": list(actions)}


def keys(*actions: dict) -> dict:
    return {"type": "key", "id": "key", "actions": list(actions)}


PAUSE = {"type": "pause", "duration": 0}
DOWN = {"type": "pointerDown", "button": 0}
UP = {"type": "pointerUp", "button": 0}
HTML_LOOKUP = ("POST", "/element", {"using": "xpath", "value": "/html"})


@pytest.mark.parametrize("sources, lookups, calls", [
    # ActionChains.move_to_element(e).click(): the element's own centre, then one click.
    ([mouse({"type": "pointerMove", "x": 0, "y": 0, "origin": {W3C_ELEMENT: E}}, DOWN, UP),
      keys(PAUSE, PAUSE, PAUSE)], [],
     [("POST", "/moveto", {"element": E}), ("POST", "/click", {"button": 0})]),
    # Offsets from the centre need the size: 100x20 -> centre (50, 10).
    ([mouse({"type": "pointerMove", "x": -40, "y": 5, "origin": {W3C_ELEMENT: E}})],
     [("GET", f"/element/{E}/size", None)],
     [("POST", "/moveto", {"element": E, "xoffset": 10, "yoffset": 15})]),
    # From the viewport: relative to <html>.
    ([mouse({"type": "pointerMove", "x": 0, "y": 7, "origin": "viewport"}, DOWN, UP)],
     [HTML_LOOKUP],
     [("POST", "/moveto", {"element": "root", "xoffset": 0, "yoffset": 7}),
      ("POST", "/click", {"button": 0})]),
    # From the pointer: GhostDriver's own relative move.
    ([mouse({"type": "pointerMove", "x": 3, "y": -4, "origin": "pointer"})], [],
     [("POST", "/moveto", {"xoffset": 3, "yoffset": -4})]),
    # Hold, then release separately; right button.
    ([mouse({"type": "pointerDown", "button": 2})], [], [("POST", "/buttondown", {"button": 2})]),
    ([mouse(DOWN, {"type": "pointerMove", "x": 1, "y": 1, "origin": "pointer"}, UP)], [],
     [("POST", "/buttondown", {"button": 0}), ("POST", "/moveto", {"xoffset": 1, "yoffset": 1}),
      ("POST", "/buttonup", {"button": 0})]),
    # Keys: keyDown values typed, a modifier's keyUp releases it, plain keyUps dropped.
    ([keys({"type": "keyDown", "value": "\ue008"}, {"type": "keyDown", "value": "a"},
           {"type": "keyUp", "value": "a"}, {"type": "keyUp", "value": "\ue008"})], [],
     [("POST", "/keys", {"value": ["\ue008"]}), ("POST", "/keys", {"value": ["a"]}),
      ("POST", "/keys", {"value": ["\ue008"]})]),
    # Only pauses: nothing to do.
    ([mouse(PAUSE), keys(PAUSE)], [], []),
])
def test_actions(sources, lookups, calls) -> None:
    step = bridge.plan("POST", "/actions", {"actions": sources})
    answers = {("GET", f"/element/{E}/size"): ok({"width": 100, "height": 20}),
               ("POST", "/element"): ok({JSONWP_ELEMENT: "root"})}
    for call in calls:
        answers.setdefault(call[:2], ok({}))
    if not calls:
        assert step == Reply(200, {"value": None})
        return
    reply, made = drive(step, answers)
    assert reply == Reply(200, {"value": None})
    assert made == lookups + calls


def test_release_actions_lets_go_of_held_buttons() -> None:
    session = BridgeSession()
    assert session.plan("DELETE", "/actions") == Reply(200, {"value": None})
    drive(session.plan("POST", "/actions", {"actions": [mouse(DOWN)]}),
          {("POST", "/buttondown"): ok({})})
    assert session.pressed == {0}
    reply, made = drive(session.plan("DELETE", "/actions"), {("POST", "/buttonup"): ok({})})
    assert made == [("POST", "/buttonup", {"button": 0})] and session.pressed == set()


@pytest.mark.parametrize("source, named", [
    ({"type": "wheel", "id": "w", "actions": [{"type": "scroll", "x": 0, "y": 0,
                                                "deltaX": 0, "deltaY": 5}]}, "wheel"),
    ({"type": "pointer", "id": "f", "parameters": {"pointerType": "touch"},
      "actions": [DOWN]}, "touch"),
    ({"type": "pointer", "id": "p", "parameters": {"pointerType": "pen"}, "actions": [DOWN]},
     "pen"),
    (mouse({"type": "pointerCancel"}), "pointerCancel"),
])
def test_actions_refused(source, named) -> None:
    reply = bridge.plan("POST", "/actions", {"actions": [source]})
    assert reply.body["value"]["error"] == "unsupported operation"
    assert named in reply.body["value"]["message"] and "/actions" in reply.body["value"]["message"]


# --- element screenshots -------------------------------------------------------------------

def make_png(pixels: list[list[tuple[int, ...]]], filters: list[int], color: int = 6) -> bytes:
    """A PNG whose row r uses filter filters[r % len(filters)] (encoder side of PNG filters)."""
    bpp = 4 if color == 6 else 3
    height, width = len(pixels), len(pixels[0])
    rows = [bytes(v for px in row for v in px[:bpp]) for row in pixels]
    out, prev = b"", bytes(width * bpp)
    for r, row in enumerate(rows):
        f = filters[r % len(filters)]
        enc = bytearray()
        for i, x in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            pred = [0, a, b, (a + b) >> 1, bridge._paeth(a, b, c)][f]
            enc.append((x - pred) & 0xFF)
        out += bytes([f]) + bytes(enc)
        prev = row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    idat = zlib.compress(out)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color,
                                                               0, 0, 0))
            + chunk(b"IDAT", idat[:10]) + chunk(b"IDAT", idat[10:]) + chunk(b"IEND", b""))


def read_png(png: bytes) -> list[list[tuple[int, ...]]]:
    width, height, _, color = struct.unpack(">IIBB", png[16:26])
    bpp = 4 if color == 6 else 3
    pos, idat = 8, b""
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IDAT":
            idat += png[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp + 1
    assert all(raw[r * stride] == 0 for r in range(height))
    return [[tuple(raw[r * stride + 1 + x * bpp:r * stride + 1 + (x + 1) * bpp])
             for x in range(width)] for r in range(height)]


def image(width: int, height: int, bpp: int = 4) -> list[list[tuple[int, ...]]]:
    return [[tuple((x * 37 + y * 11 + k * 53) % 256 for k in range(bpp)) for x in range(width)]
            for y in range(height)]


@pytest.mark.parametrize("filters", [[0], [1], [2], [3], [4], [0, 1, 2, 3, 4], [4, 3, 2, 1]])
@pytest.mark.parametrize("color", [6, 2])
def test_crop_png_every_filter(filters, color) -> None:
    pixels = image(13, 9, 4 if color == 6 else 3)
    png = make_png(pixels, filters, color)
    assert read_png(bridge.crop_png(png, 0, 0, 13, 9)) == pixels
    assert read_png(bridge.crop_png(png, 3, 2, 5, 4)) == [row[3:8] for row in pixels[2:6]]


@pytest.mark.parametrize("rect, size", [
    ((-2, -3, 5, 5), (3, 2)),   # clipped at the top-left
    ((10, 7, 10, 10), (3, 2)),  # clipped at the bottom-right
])
def test_crop_png_clips_to_the_image(rect, size) -> None:
    png = make_png(image(13, 9), [4])
    cropped = read_png(bridge.crop_png(png, *rect))
    assert (len(cropped[0]), len(cropped)) == size


@pytest.mark.parametrize("png, rect", [
    (b"GIF89a", (0, 0, 1, 1)),
    (make_png(image(4, 4), [0]), (10, 10, 2, 2)),
    (make_png(image(4, 4), [0]), (1, 1, 0, 0)),
])
def test_crop_png_rejects(png, rect) -> None:
    with pytest.raises(ValueError):
        bridge.crop_png(png, *rect)


def test_element_screenshot_crops_the_page() -> None:
    pixels = image(20, 10)
    page = base64.b64encode(make_png(pixels, [0, 4])).decode()
    reply, made = drive(bridge.plan("GET", f"/element/{E}/screenshot"), {
        ("GET", f"/element/{E}/location"): ok({"x": 4, "y": 3}),
        ("GET", f"/element/{E}/size"): ok({"width": 6, "height": 2}),
        ("GET", "/screenshot"): ok(page)})
    assert reply.status == 200
    assert read_png(base64.b64decode(reply.body["value"])) == [r[4:10] for r in pixels[3:5]]
    reply, _ = drive(bridge.plan("GET", f"/element/{E}/screenshot"), {
        ("GET", f"/element/{E}/location"): ok({"x": 400, "y": 3}),
        ("GET", f"/element/{E}/size"): ok({"width": 6, "height": 2}),
        ("GET", "/screenshot"): ok(page)})
    assert reply.body["value"]["error"] == "unable to capture screen"


# --- review fixes: each case failed before its fix -----------------------------------------

@pytest.mark.parametrize("timeouts, calls", [
    # A client that sets nothing gets W3C's defaults, not GhostDriver's (200 ms implicit wait,
    # scripts and page loads never time out).
    (None, W3C_DEFAULT_SETUP),
    ({"implicit": 0, "pageLoad": 300000, "script": 30000}, W3C_DEFAULT_SETUP),
    ({"script": 500}, [W3C_DEFAULT_SETUP[0], W3C_DEFAULT_SETUP[1],
                       ("POST", "/timeouts", {"type": "script", "ms": 500})]),
    # What GhostDriver uses already is not sent: a command per session is proxy CPU.
    ({"implicit": 200, "pageLoad": 10**12, "script": None}, []),
    ({"implicit": 200, "pageLoad": 2**31 - 1, "script": 2**31 - 1}, []),
])
def test_setup_makes_ghostdriver_timeouts_w3c(timeouts, calls) -> None:
    always = {"browserName": "phantomjs"} if timeouts is None else {"timeouts": timeouts}
    session = BridgeSession.from_request({"capabilities": {"alwaysMatch": always}})
    setup = session.setup()
    if not calls:
        assert setup is None
    else:
        reply, made = drive(setup, {("POST", "/timeouts"): ok({})})
        assert reply == Reply(200, {"value": None}) and made == calls
    # GET /timeouts answers what the backend now uses.
    expected = {**bridge.DEFAULT_TIMEOUTS, **(timeouts or {})}
    assert session.plan("GET", "/timeouts") == Reply(200, {"value": expected})


@pytest.mark.parametrize("what, script", [("attribute", bridge._ATTRIBUTE_SCRIPT),
                                          ("property", bridge._PROPERTY_SCRIPT)],
                         ids=["attribute", "property"])
def test_encoded_element_ids_are_decoded_into_script_arguments(what, script) -> None:
    # Java clients percent-encode path segments: `:wdc:1` arrives as `%3Awdc%3A1`.
    step = bridge.plan("GET", f"/element/%3Awdc%3A1/{what}/data%2Dx")
    assert step.calls == (("POST", "/execute", {"script": script,
                                                "args": [{JSONWP_ELEMENT: ":wdc:1"}, "data-x"]}),)
    # Paths go on as they came (GhostDriver decodes them itself).
    step = bridge.plan("GET", "/element/%3Awdc%3A1/rect")
    assert [c[1] for c in step.calls] == ["/element/%3Awdc%3A1/location",
                                          "/element/%3Awdc%3A1/size"]


def test_element_ids_from_bodies_cannot_leave_their_path() -> None:
    atom = {"script": "/* isDisplayed */return 1;", "args": [{W3C_ELEMENT: "../../x"}]}
    assert bridge.plan("POST", "/execute/sync", atom).calls == (
        ("GET", "/element/..%2F..%2Fx/displayed", None),)
    move = {"type": "pointerMove", "x": 1, "y": 1, "origin": {W3C_ELEMENT: "a/b"}}
    step = bridge.plan("POST", "/actions", {"actions": [mouse(move)]})
    assert step.calls == (("GET", "/element/a%2Fb/size", None),)


@pytest.mark.parametrize("method, subpath", [
    ("POST", "/se/file"), ("POST", "/se/files"), ("GET", "/whatever/else"),
    ("POST", "/goog/cdp/execute"), ("GET", "/print"),
])
def test_unknown_commands_are_unknown_command(method, subpath) -> None:
    reply = bridge.plan(method, subpath, {"file": "UEsDBA=="})
    assert reply.status == 404 and reply.body["value"]["error"] == "unknown command"
    # Selenium's Python client types a file's path when its upload fails with this text.
    assert f"Command not found: {method} /session/{{id}}{subpath}" in reply.body["value"]["message"]


def test_log_commands_map_to_ghostdriver_logs() -> None:
    entry = {"level": "INFO", "message": "hi (:1)", "timestamp": 1}
    reply, made = drive(bridge.plan("POST", "/se/log", {"type": "browser"}),
                        {("POST", "/log"): ok([entry])})
    assert made == [("POST", "/log", {"type": "browser"})] and reply.body == {"value": [entry]}
    reply, made = drive(bridge.plan("GET", "/se/log/types"),
                        {("GET", "/log/types"): ok(["har", "browser"])})
    assert made == [("GET", "/log/types", None)] and reply.body == {"value": ["har", "browser"]}
    reply = bridge.plan("POST", "/se/log", {})
    assert reply.status == 400 and reply.body["value"]["error"] == "invalid argument"


ON_E = {"type": "pointerMove", "x": 0, "y": 0, "origin": {W3C_ELEMENT: E}}
MOVE_TO_E = ("POST", "/moveto", {"element": E})


@pytest.mark.parametrize("actions, calls", [
    # ActionChains.double_click(e): down/up/down/up of one button is GhostDriver's
    # doubleclick (two clicks never fire `dblclick`).
    ([ON_E, DOWN, UP, DOWN, UP], [MOVE_TO_E, ("POST", "/doubleclick", {"button": 0})]),
    ([ON_E, DOWN, PAUSE, UP, PAUSE, DOWN, UP],
     [MOVE_TO_E, ("POST", "/doubleclick", {"button": 0})]),
    ([DOWN, UP, DOWN, UP, DOWN, UP], [("POST", "/doubleclick", {"button": 0}),
                                      ("POST", "/click", {"button": 0})]),
    # Not at the same place, or not the same button: two clicks.
    ([DOWN, UP, ON_E, DOWN, UP], [("POST", "/click", {"button": 0}), MOVE_TO_E,
                                  ("POST", "/click", {"button": 0})]),
    ([DOWN, UP, {"type": "pointerDown", "button": 2}, {"type": "pointerUp", "button": 2}],
     [("POST", "/click", {"button": 0}), ("POST", "/click", {"button": 2})]),
])
def test_double_click_is_one_doubleclick(actions, calls) -> None:
    step = bridge.plan("POST", "/actions", {"actions": [mouse(*actions)]})
    reply, made = drive(step, {(m, p): ok({}) for m, p, _ in calls})
    assert reply == Reply(200, {"value": None}) and made == calls


def test_pressing_a_held_button_again_does_nothing() -> None:
    session = BridgeSession(pressed={0})
    reply, made = drive(session.plan("POST", "/actions", {"actions": [mouse(DOWN, UP)]}),
                        {("POST", "/buttonup"): ok({})})
    assert made == [("POST", "/buttonup", {"button": 0})] and session.pressed == set()


def test_release_actions_lets_go_of_held_modifiers() -> None:
    session = BridgeSession()
    shift = {"type": "keyDown", "value": "\ue008"}
    right_ctrl = {"type": "keyDown", "value": "\ue051"}
    # Right-hand modifiers go as their left-hand twins (GhostDriver would type them); a
    # modifier already down is not sent again (GhostDriver toggles it on each /keys).
    step = session.plan("POST", "/actions", {"actions": [keys(shift, right_ctrl, shift)]})
    reply, made = drive(step, {("POST", "/keys"): ok({})})
    assert [c[2]["value"] for c in made] == [["\ue008"], ["\ue009"]]
    assert session.modifiers == {"\ue008", "\ue009"}
    reply, made = drive(session.plan("DELETE", "/actions"), {("POST", "/keys"): ok({})})
    assert made == [("POST", "/keys", {"value": ["\ue000"]})]  # GhostDriver's NULL: all up
    assert session.modifiers == set()
    assert session.plan("DELETE", "/actions") == Reply(200, {"value": None})
    # A keyUp of a modifier not down sends nothing (it would press it).
    assert session.plan("POST", "/actions", {"actions": [keys(
        {"type": "keyUp", "value": "\ue008"})]}) == Reply(200, {"value": None})
    # Element typing lets go of GhostDriver's modifiers: nothing left to release.
    drive(session.plan("POST", "/actions", {"actions": [keys(shift)]}), {("POST", "/keys"): ok({})})
    drive(session.plan("POST", f"/element/{E}/value", {"text": "a"}),
          {("POST", f"/element/{E}/value"): ok(None)})
    assert session.plan("DELETE", "/actions") == Reply(200, {"value": None})


@pytest.mark.parametrize("method, subpath, raw", [
    # Python's JSON (what the proxy parses bodies with) reads Infinity and NaN.
    ("POST", "/window/rect", '{"width": Infinity, "height": 600}'),
    ("POST", "/window/rect", '{"x": NaN, "y": 0}'),
    ("POST", "/window/rect", '{"width": -1, "height": 600}'),
    ("POST", "/window/rect", '{"width": 1e300, "height": 600}'),
    ("POST", "/actions", '{"actions": [{"type": "pointer", "id": "m", "actions": ['
                         '{"type": "pointerMove", "x": Infinity, "y": 0}]}]}'),
    ("POST", "/actions", '{"actions": [{"type": "pointer", "id": "m", "actions": ['
                         '{"type": "pointerMove", "x": 0, "y": NaN, "origin": "pointer"}]}]}'),
    ("POST", "/actions", '{"actions": [{"type": "pointer", "id": "m", "parameters": [],'
                         ' "actions": []}]}'),
    ("POST", "/actions", '{"actions": [{"type": "pointer", "id": "m", "parameters": "mouse",'
                         ' "actions": []}]}'),
    ("POST", "/actions", '{"actions": [{"type": "pointer", "id": "m", "parameters": '
                         '{"pointerType": "finger"}, "actions": []}]}'),
])
def test_odd_numbers_and_shapes_are_invalid_argument(method, subpath, raw) -> None:
    reply = bridge.plan(method, subpath, json.loads(raw))
    assert isinstance(reply, Reply)
    assert reply.status == 400 and reply.body["value"]["error"] == "invalid argument"


@pytest.mark.parametrize("capabilities", [
    "phantomjs", [], {"alwaysMatch": "phantomjs"}, {"alwaysMatch": [{"browserName": "x"}]},
    {"alwaysMatch": {}, "firstMatch": {}}, {"firstMatch": []}, {"firstMatch": ["x"]},
    {"firstMatch": [{}, 3]},
])
def test_malformed_new_session_capabilities_are_invalid_argument(capabilities) -> None:
    with pytest.raises(WebDriverError) as caught:
        bridge.new_session_request({"capabilities": capabilities})
    assert (caught.value.status, caught.value.error) == (400, "invalid argument")


def _corrupt(png: bytes, how: str) -> bytes:
    ihdr_end = 8 + 12 + 13
    if how == "truncated chunk":  # a chunk header cut short inside IHDR: struct.error
        return png[:8] + struct.pack(">I4s", 5, b"IHDR") + b"\x00\x00"
    if how == "bad deflate":  # IDAT that is no zlib stream: zlib.error
        return png[:ihdr_end] + struct.pack(">I4s", 4, b"IDAT") + b"junk" + b"\x00" * 4
    if how == "short pixels":  # a valid stream with too few rows: IndexError
        data = zlib.compress(b"\x00")
        return png[:ihdr_end] + struct.pack(">I4s", len(data), b"IDAT") + data + b"\x00" * 4
    if how == "not base64":
        return b"\x89PNG"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated chunk", "bad deflate", "short pixels", "not base64"])
def test_corrupt_backend_screenshot_is_unknown_error(how) -> None:
    png = make_png(image(20, 10), [0])
    page = base64.b64encode(_corrupt(png, how)).decode()
    if how == "not base64":
        page = page[:-1]  # bad padding: binascii.Error
    reply, _ = drive(bridge.plan("GET", f"/element/{E}/screenshot"), {
        ("GET", f"/element/{E}/location"): ok({"x": 0, "y": 0}),
        ("GET", f"/element/{E}/size"): ok({"width": 6, "height": 2}),
        ("GET", "/screenshot"): ok(page)})
    assert reply.status == 500 and reply.body["value"]["error"] == "unknown error"
    assert "not a valid base64 PNG" in reply.body["value"]["message"]


def test_any_odd_backend_value_is_unknown_error() -> None:
    def combine(values: list) -> Reply:
        return ok(values[0][5])  # an IndexError, as a short list from the backend gives

    plan = Plan("GET /session/{id}/x", (("GET", "/x", None),), combine)
    assert plan.reply([ok([1])]).body["value"]["error"] == "unknown error"
    # JSON's 1e999 is infinity: int() of it overflows.
    reply, _ = drive(bridge.plan("POST", "/frame/parent"), {("POST", "/execute"): ok([1e999, 0])})
    assert reply.body["value"]["error"] == "unknown error"
