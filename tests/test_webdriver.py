import json

import pytest

from hypothesis import example, given, settings
from hypothesis import strategies as st

from stickyproxy.webdriver import (Kind, WebDriverError, check_target, classify, route,
                                   session_id_of)


@pytest.mark.parametrize("method, path, kind, sid, rest", [
    ("POST", "/session", Kind.NEW_SESSION, "", ""),
    ("POST", "/wd/hub/session", Kind.NEW_SESSION, "", ""),
    ("POST", "/wd/hub/session/", Kind.NEW_SESSION, "", ""),
    ("GET", "/session", Kind.UNKNOWN, "", ""),
    ("DELETE", "/session/abc-123", Kind.DELETE_SESSION, "abc-123", ""),
    ("DELETE", "/session/abc/window", Kind.SESSION, "abc", "/window"),
    ("GET", "/wd/hub/session/abc/element/e1/text", Kind.SESSION, "abc", "/element/e1/text"),
    ("GET", "/status", Kind.STATUS, "", ""),
    ("GET", "/wd/hub/status", Kind.STATUS, "", ""),
    ("GET", "/wd/hubx/status", Kind.UNKNOWN, "", ""),
    ("GET", "/", Kind.UNKNOWN, "", ""),
])
def test_classify(method, path, kind, sid, rest):
    route = classify(method, path)
    assert (route.kind, route.session_id, route.rest) == (kind, sid, rest)


@pytest.mark.parametrize("path", [
    "/session/../status", "/session/%2e%2e/x", "/session/a%2Fb/url", "/session/.hidden/url",
    "/session/" + "a" * 200 + "/url", "/session/a b/url"])
def test_paths_that_are_not_session_ids_are_invalid_sessions(path):
    with pytest.raises(WebDriverError) as err:
        classify("GET", path)
    assert err.value.status == 404 and err.value.error == "invalid session id"


@pytest.mark.parametrize("answer, sid", [
    ({"sessionId": "abc", "status": 0, "value": {}}, "abc"),  # JSONWP
    ({"value": {"sessionId": "def", "capabilities": {}}}, "def"),  # W3C
    ({"value": {"capabilities": {}}}, None),
    ({"sessionId": None, "value": {"sessionId": "x/y"}}, None),
    ([], None),
    ("abc", None),
])
def test_session_id_of_new_session_answers(answer, sid):
    assert session_id_of(answer) == sid


def test_errors_render_as_w3c_and_never_above_500():
    for err in (WebDriverError.invalid_session("s", "gone"), WebDriverError.session_not_created("x"),
                WebDriverError.invalid_argument("x"), WebDriverError.backend_unavailable("s", "b", "x"),
                WebDriverError.timeout("x"), WebDriverError.unknown_command("GET", "/x")):
        body = json.loads(err.body())
        assert set(body) == {"value"} and {"error", "message"} <= set(body["value"])
        assert 400 <= err.status <= 500  # Selenium 3 reads >500 as success


@pytest.mark.parametrize("always", [
    "not an object", {"goog:chromeOptions": "x"}, {"goog:chromeOptions": {"args": 5}},
    {"goog:chromeOptions": {"args": "--headless"}}])
def test_malformed_chrome_options_are_sent_as_they_came_for_chromedriver_to_refuse(always):
    from stickyproxy.webdriver import with_chrome_args

    payload = {"capabilities": {"alwaysMatch": always}}
    assert with_chrome_args(payload, ("--no-sandbox",)) is payload


def test_chrome_args_are_added_where_the_client_gave_none():
    from stickyproxy.webdriver import with_chrome_args
    payload = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": {"args": ["--headless=old"]}},
                                "firstMatch": [{}]}}
    out = with_chrome_args(payload, ("--headless=new", "--no-sandbox"))
    assert out["capabilities"]["alwaysMatch"]["goog:chromeOptions"]["args"] == [
        "--headless=old", "--no-sandbox"]  # the client's own choice wins
    assert payload["capabilities"]["alwaysMatch"]["goog:chromeOptions"]["args"] == ["--headless=old"]
    assert with_chrome_args({"desiredCapabilities": {}}, ("--x",)) == {"desiredCapabilities": {}}


@pytest.mark.parametrize("method, target, status", [
    ("GET", "http://elsewhere/status", 400),
    ("CONNECT", "elsewhere:443", 400),
    ("PUT", "/session/abc/url", 405),
    ("TRACE", "/status", 405),
    ("GET", "/session/abc/../../status", 400),
    ("GET", "/session/abc/%2E%2E/x", 400),
    ("GET", "/session/abc%2fdef/url", 400),
    ("GET", "/session/abc/url%00", 400),
    ("GET", "/session/abc\\..\\x", 400),
    ("GET", "/./status", 400),
])
def test_targets_no_webdriver_client_sends_are_refused(method, target, status):
    from stickyproxy.webdriver import check_target
    with pytest.raises(WebDriverError) as err:
        check_target(method, target)
    assert err.value.status == status


@pytest.mark.parametrize("method, target", [
    ("GET", "/status"), ("POST", "/wd/hub/session"), ("DELETE", "/session/a.b-c_d"),
    ("GET", "/session/abc/element/0.1234-5/text?x=1"), ("POST", "/session/abc/execute/sync")])
def test_webdriver_targets_pass(method, target):
    from stickyproxy.webdriver import check_target
    check_target(method, target)


# route(): the fast path for usual session commands must answer exactly as check_target +
# classify do, for any target (including every refusal).
_SEGMENTS = st.sampled_from(["session", "wd", "hub", "abc", "a.b", ".", "..", "%2e", "%2F", "x-1",
                             "url", "element", "", "a\\\\b", "?q=1", "UPPER", "_"])


@settings(max_examples=400, deadline=None)
@example(method="DELETE", prefix="/wd/hub/session", segments=["abc", ""])
@example(method="GET", prefix="/session", segments=["a.b", "url"])
@example(method="POST", prefix="/session", segments=["abc", "url?x=1"])
@example(method="GET", prefix="/session", segments=["abc", "%2e"])
@given(method=st.sampled_from(["GET", "POST", "DELETE", "PUT"]),
       prefix=st.sampled_from(["", "/wd/hub", "/session", "/wd/hub/session", "http://x"]),
       segments=st.lists(_SEGMENTS, max_size=5))
def test_route_fast_path_agrees_with_check_target_and_classify(method, prefix, segments):
    target = prefix + "/" + "/".join(segments)
    try:
        check_target(method, target)
        expected = classify(method, target.split("?", 1)[0])
    except WebDriverError as err:
        expected = (err.status, err.error)
    try:
        got = route(method, target)
    except WebDriverError as err:
        got = (err.status, err.error)
    assert got == expected
