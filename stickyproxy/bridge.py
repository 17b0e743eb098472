"""The W3C -> JSON Wire Protocol bridge: Selenium 4 clients driving PhantomJS (issue 6).

Owns the translation only: which dialect each side speaks, how a W3C new session becomes a
GhostDriver one, and how each W3C command becomes one or more JSONWP calls whose answers are
folded back into one W3C answer. It does no I/O: `run` takes the caller's `send` coroutine, so
the proxy owns sockets, session pinning, id rewriting and timeouts. Same-dialect traffic never
comes here (the proxy passes it through untouched); see docs/bridge.md for the command table.

GhostDriver facts this module relies on (PhantomJS 2.1.1 / GhostDriver 1.2.0, checked against
a real process): errors come as HTTP 500 with `{"status": N, "value": {"message": "<JSON with
errorMessage>"}}`; unknown commands as HTTP 405 text/plain, unknown sessions as HTTP 404
text/plain; `GET /element/active` answers the bogus element "active" (only POST works); there
is no GET /timeouts, no /frame/parent, no alert endpoint (alert/confirm/prompt never block:
they return undefined/false/null at once, `handlesAlerts` is false) and no element screenshot.
A new GhostDriver session waits 200 ms implicitly and never times out scripts or page loads
(session.js `_timeouts`: 200 / 2^31-1 / 2^31-1 ms); one `script` timeout serves execute and
execute_async. `POST /doubleclick` is the only way to a `dblclick` event (two clicks give
none). A percent-encoded element id (`%3Awdc%3A1`) works in a path and in an `{"ELEMENT": id}`
argument alike (the atoms decode ids), but a cookie name in a path is not decoded. A path
typed into an `<input type=file>` selects that file when it exists on the backend's host.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence, Union
from urllib.parse import quote, unquote, urlsplit

from .webdriver import WebDriverError

W3C_ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
JSONWP_ELEMENT = "ELEMENT"

# One backend call, relative to the pinned backend session: ("GET", "/element/:wdc:1/size", None).
# An empty subpath is the session itself (DELETE "" ends it).
Call = tuple[str, str, Union[dict, None]]
# What `send` returns: the backend's HTTP status and its body, parsed JSON or raw text.
Result = tuple[int, Any]
Send = Callable[[str, str, Union[dict, None]], Awaitable[Result]]


@dataclass(frozen=True)
class Reply:
    """The final W3C answer to the client: HTTP status and JSON body."""

    status: int
    body: dict


@dataclass(frozen=True)
class Plan:
    """Backend calls to run in order on the pinned backend, and how to answer from them.

    `combine` gets the JSONWP `value` of every call (all succeeded) and returns the W3C Reply,
    or a further Plan when the next calls depend on what came back (frame/parent, actions).
    `errors` overrides the W3C error name per JSONWP status for this command: GhostDriver
    reports a throwing script as 13 (unknown error) and a bad CSS selector as 12 (invalid
    element state); W3C wants `javascript error` and `invalid selector` there.
    """

    command: str
    calls: tuple[Call, ...]
    combine: Callable[[list[Any]], "Reply | Plan"]
    errors: Mapping[int, str] = field(default_factory=dict)
    # combine is CPU work worth a thread (cropping a PNG in pure Python); `run` offloads it.
    heavy: bool = False

    def failure(self, result: Result) -> Reply | None:
        """The W3C error for one backend result, or None when it succeeded."""
        return jsonwp_failure(result, self.errors)

    def reply(self, results: Sequence[Result]) -> Reply | Plan:
        """Fold the results of `calls` (possibly cut short by a failure) into the answer."""
        for result in results:
            failed = self.failure(result)
            if failed is not None:
                return failed
        if len(results) != len(self.calls):
            return error("unknown error", f"{self.command}: backend answered {len(results)} "
                         f"of {len(self.calls)} calls")
        try:
            return self.combine([body.get("value") for _, body in results])
        except (LookupError, TypeError, ValueError, AttributeError, ArithmeticError) as exc:
            # A backend answer of an unexpected shape is the backend's fault: answered, not a crash.
            return error("unknown error", f"{self.command}: unexpected backend answer ({exc!r})")


Step = Union[Plan, Reply]


# --- errors --------------------------------------------------------------------------------

# W3C error name -> HTTP status (WebDriver spec, "Errors" table). Nothing above 500: Selenium 3
# clients treat any status > 500 as a success with a body to decode.
HTTP_STATUS = {
    "element click intercepted": 400,
    "element not interactable": 400,
    "insecure certificate": 400,
    "invalid argument": 400,
    "invalid cookie domain": 400,
    "invalid element state": 400,
    "invalid selector": 400,
    "invalid session id": 404,
    "javascript error": 500,
    "move target out of bounds": 500,
    "no such alert": 404,
    "no such cookie": 404,
    "no such element": 404,
    "no such frame": 404,
    "no such window": 404,
    "no such shadow root": 404,
    "script timeout": 500,
    "session not created": 500,
    "stale element reference": 404,
    "timeout": 500,
    "unable to set cookie": 500,
    "unable to capture screen": 500,
    "unexpected alert open": 500,
    "unknown command": 404,
    "unknown error": 500,
    "unknown method": 405,
    "unsupported operation": 500,
}

# JSONWP status code -> W3C error name (Selenium's ErrorCodes.java; 11 and 15 are the
# PhantomJS-era "element not visible" / "element not selectable").
JSONWP_ERRORS = {
    6: "invalid session id",
    7: "no such element",
    8: "no such frame",
    9: "unknown command",
    10: "stale element reference",
    11: "element not interactable",
    12: "invalid element state",
    13: "unknown error",
    15: "element not interactable",
    17: "javascript error",
    19: "invalid selector",
    21: "timeout",
    23: "no such window",
    24: "invalid cookie domain",
    25: "unable to set cookie",
    26: "unexpected alert open",
    27: "no such alert",
    28: "script timeout",
    29: "invalid argument",  # "invalid element coordinates"
    32: "invalid selector",
    33: "session not created",
    34: "move target out of bounds",
    51: "invalid selector",
    52: "invalid selector",
    60: "element not interactable",
    61: "invalid argument",
    62: "no such cookie",
    63: "unable to capture screen",
    64: "element click intercepted",
    65: "no such shadow root",
}


def error(name: str, message: str) -> Reply:
    """A W3C error answer with the HTTP status the spec fixes for `name`."""
    return Reply(HTTP_STATUS.get(name, 500),
                 {"value": {"error": name, "message": message, "stacktrace": ""}})


def refusal(command: str, why: str = "") -> Reply:
    """`unsupported operation` for a W3C command with no JSONWP equivalent on GhostDriver."""
    message = f"{command} is not supported by the W3C-to-JSONWP bridge (PhantomJS/GhostDriver)"
    return error("unsupported operation", f"{message}: {why}" if why else message)


def unknown_command(command: str) -> Reply:
    """`unknown command` (404) for a path that is no W3C command the bridge knows. Worded as
    Selenium's own servers word it: Selenium's Python client falls back to typing a file's
    path when its upload (POST /se/file) fails with "Command not found: POST "."""
    return error("unknown command", f"Command not found: {command} (no such command in the "
                 "W3C-to-JSONWP bridge for PhantomJS/GhostDriver)")


def _message(value: Any) -> str:
    # GhostDriver nests a JSON document (errorMessage + the whole request) inside `message`.
    if isinstance(value, dict):
        message = value.get("message", "")
        if isinstance(message, str) and message.startswith("{"):
            try:
                inner = json.loads(message)
            except ValueError:
                return message
            if isinstance(inner, dict) and "errorMessage" in inner:
                return str(inner["errorMessage"])
        return str(message)
    return "" if value is None else str(value)


def jsonwp_failure(result: Result, overrides: Mapping[int, str] = {}) -> Reply | None:
    """Translate one JSONWP answer into a W3C error; None when it is a success."""
    http_status, body = result
    if isinstance(body, dict) and isinstance(body.get("status"), int):
        code = body["status"]
        if code == 0:
            return None
        name = overrides.get(code) or JSONWP_ERRORS.get(code, "unknown error")
        return error(name, _message(body.get("value")))
    text = body if isinstance(body, str) else json.dumps(body)
    first_line = text.split(" - ", 1)[0][:200]
    # GhostDriver's text/plain answers: 404 "Variable Resource Not Found" (unknown session),
    # 405 "Invalid Command Method", 400 "Missing Command Parameter".
    if http_status == 404:
        return error("invalid session id", f"backend does not know this session ({first_line})")
    if http_status == 405:
        return error("unknown command", f"backend refused the command ({first_line})")
    if http_status == 400:
        return error("invalid argument", f"backend rejected the parameters ({first_line})")
    if 200 <= http_status < 300 and isinstance(body, dict):
        return None  # a JSON answer without `status`: take it as success
    return error("unknown error", f"backend answered HTTP {http_status} ({first_line})")


# --- dialects and new session --------------------------------------------------------------

def client_dialect(payload: Any) -> str:
    """"jsonwp" when the new-session payload has `desiredCapabilities` (Selenium 3 sends it,
    alongside `capabilities`), else "w3c" (Selenium 4 sends only `capabilities`)."""
    if isinstance(payload, dict) and isinstance(payload.get("desiredCapabilities"), dict):
        return "jsonwp"
    return "w3c"


def response_dialect(body: Any) -> str | None:
    """The backend's dialect from a successful new-session answer: JSONWP has a top-level
    `sessionId` and integer `status`; W3C has `value.sessionId`. None when it is neither."""
    if not isinstance(body, dict):
        return None
    if "sessionId" in body and isinstance(body.get("status"), int):
        return "jsonwp"
    value = body.get("value")
    if isinstance(value, dict) and "sessionId" in value:
        return "w3c"
    return None


def w3c_capabilities(payload: Any) -> dict:
    """The merged W3C capabilities of a new-session payload: alwaysMatch + firstMatch[0].

    Raises WebDriverError `invalid argument` where W3C "process capabilities" does: a
    `capabilities`, `alwaysMatch` or firstMatch entry that is not an object, a firstMatch
    that is not a non-empty list. Absent (or null) ones count as empty."""
    caps = payload.get("capabilities") if isinstance(payload, dict) else None
    if caps is None:
        return {}
    if not isinstance(caps, dict):
        raise WebDriverError.invalid_argument("new session: capabilities must be an object")
    always = caps.get("alwaysMatch")
    if always is None:
        always = {}
    elif not isinstance(always, dict):
        raise WebDriverError.invalid_argument("new session: alwaysMatch must be an object")
    first = caps.get("firstMatch")
    if first is None:
        first = [{}]
    elif not (isinstance(first, list) and first and all(isinstance(f, dict) for f in first)):
        raise WebDriverError.invalid_argument(
            "new session: firstMatch must be a non-empty list of objects")
    return {**always, **first[0]}


_PROMPT_BEHAVIOUR = {"accept and notify": "accept", "dismiss and notify": "dismiss"}


def new_session_request(payload: dict) -> dict:
    """The payload to send for a W3C client's new session: the client's own `capabilities`
    (a W3C backend keeps using them) plus `desiredCapabilities` for a JSONWP one, as Selenium 3
    clients did. Sent to any backend, its answer then tells the backend's dialect. Malformed
    capabilities raise WebDriverError `invalid argument` (see `w3c_capabilities`)."""
    desired: dict[str, Any] = {}
    for key, value in w3c_capabilities(payload).items():
        if key == "browserVersion":
            desired["version"] = value
        elif key == "platformName":
            desired["platform"] = str(value).upper()
        elif key == "acceptInsecureCerts":
            desired["acceptSslCerts"] = value
        elif key == "unhandledPromptBehavior":
            desired["unexpectedAlertBehaviour"] = _PROMPT_BEHAVIOUR.get(value, value)
        elif key in ("timeouts", "setWindowRect", "strictFileInteractability"):
            continue  # timeouts are applied after creation (BridgeSession.setup); others: no JSONWP name
        elif key.startswith("phantomjs:"):
            # W3C-legal spelling of GhostDriver's own keys: "phantomjs:page.settings.userAgent"
            # is "phantomjs.page.settings.userAgent" (strict W3C intermediaries reject the latter).
            desired["phantomjs." + key[len("phantomjs:"):]] = value
        elif ":" in key:
            continue  # vendor extensions (goog:, moz:, se:...) mean nothing to GhostDriver
        else:
            # browserName, pageLoadStrategy, proxy and GhostDriver's own
            # "phantomjs.page.settings.*" / "phantomjs.page.customHeaders.*" keys.
            desired[key] = value
    desired.setdefault("browserName", "phantomjs")
    out = {key: value for key, value in payload.items() if key != "desiredCapabilities"}
    out["desiredCapabilities"] = desired
    return out


DEFAULT_TIMEOUTS = {"implicit": 0, "pageLoad": 300000, "script": 30000}


def new_session_response(status: int, body: Any, payload: dict | None = None
                         ) -> tuple[int, dict, str | None]:
    """A JSONWP new-session answer as W3C: (HTTP status, body, backend session id or None).

    `payload` is the client's W3C request, used to report the timeouts it asked for."""
    failed = jsonwp_failure((status, body), {13: "session not created"})
    if failed is None and not (isinstance(body, dict) and body.get("sessionId")):
        failed = error("session not created", "backend answered without a session id")
    if failed is not None:
        value = failed.body["value"]
        if value["error"] != "session not created":
            value["message"] = f"{value['error']}: {value['message']}"
            value["error"] = "session not created"
        return 500, failed.body, None
    session_id = str(body["sessionId"])
    raw = body.get("value") if isinstance(body.get("value"), dict) else {}
    requested = BridgeSession.from_request(payload).timeouts
    caps = dict(raw)
    caps.update({
        "browserName": raw.get("browserName", "phantomjs"),
        "browserVersion": str(raw.get("version", "")),
        "platformName": str(raw.get("platform", "")).split("-")[0].lower() or "any",
        "acceptInsecureCerts": bool(raw.get("acceptSslCerts", False)),
        "pageLoadStrategy": "normal",
        "proxy": raw.get("proxy") or {},
        "setWindowRect": True,
        "strictFileInteractability": False,
        "timeouts": requested,
        # PhantomJS never opens a blocking dialog: alert returns, confirm false, prompt null.
        "unhandledPromptBehavior": "dismiss",
    })
    return 200, {"value": {"sessionId": session_id, "capabilities": caps}}, session_id


# --- element references --------------------------------------------------------------------

def _element_id(value: Any) -> str | None:
    if isinstance(value, dict) and value and set(value) <= {W3C_ELEMENT, JSONWP_ELEMENT}:
        ref = value.get(W3C_ELEMENT, value.get(JSONWP_ELEMENT))
        if isinstance(ref, str):
            return ref
    return None


def to_jsonwp(value: Any) -> Any:
    """Element references accepted under either key (recursively) become `{"ELEMENT": id}`."""
    ref = _element_id(value)
    if ref is not None:
        return {JSONWP_ELEMENT: ref}
    if isinstance(value, dict):
        return {key: to_jsonwp(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_jsonwp(item) for item in value]
    return value


def to_w3c(value: Any) -> Any:
    """Element references answered under both keys (recursively), as Selenium 3's server did."""
    ref = _element_id(value)
    if ref is not None:
        return {W3C_ELEMENT: ref, JSONWP_ELEMENT: ref}
    if isinstance(value, dict):
        return {key: to_w3c(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_w3c(item) for item in value]
    return value


# --- planning ------------------------------------------------------------------------------

def ok(value: Any = None) -> Reply:
    return Reply(200, {"value": to_w3c(value)})


def _void(values: list[Any]) -> Reply:
    return ok(None)


def _last(values: list[Any]) -> Reply:
    return ok(values[-1])


def _single(command: str, method: str, subpath: str, body: dict | None = None,
            errors: Mapping[int, str] = {}) -> Plan:
    return Plan(command, ((method, subpath, body),), _last, errors)


# A throwing script is "unknown error" (13) in GhostDriver, a W3C client wants JavascriptException.
_SCRIPT_ERRORS = {13: "javascript error"}
# A malformed CSS selector is "invalid element state" (12, DOM SyntaxError) in GhostDriver.
_FIND_ERRORS = {12: "invalid selector"}

# W3C "Get Element Attribute": the attribute itself, "true" for a present boolean attribute.
_ATTRIBUTE_SCRIPT = (
    "var e = arguments[0], n = arguments[1];"
    "if (!e.hasAttribute(n)) { return null; }"
    "var b = ['allowfullscreen','allowpaymentrequest','allowusermedia','async','autofocus',"
    "'autoplay','checked','compact','complete','controls','declare','default','defaultchecked',"
    "'defaultselected','defer','disabled','ended','formnovalidate','hidden','indeterminate',"
    "'iscontenteditable','ismap','itemscope','loop','multiple','muted','nohref','nomodule',"
    "'noresize','noshade','novalidate','nowrap','open','paused','playsinline','pubdate',"
    "'readonly','required','reversed','scoped','seamless','seeking','selected','truespeed',"
    "'typemustmatch','willvalidate'];"
    "return b.indexOf(n.toLowerCase()) >= 0 ? 'true' : e.getAttribute(n);"
)
_PROPERTY_SCRIPT = "var v = arguments[0][arguments[1]]; return v === undefined ? null : v;"
# Indexes of the frames from the top window down to the current one (GhostDriver has no
# /frame/parent: the bridge goes to the top and back down all but the last step).
_FRAME_PATH_SCRIPT = (
    "var path = [], w = window;"
    "while (w !== w.parent) {"
    "  var p = w.parent, i = 0;"
    "  while (i < p.frames.length && p.frames[i] !== w) { i++; }"
    "  path.unshift(i); w = p;"
    "}"
    "return path;"
)
# Selenium 4's Python client sends these atoms through execute/sync; they use ES2015+ (Map,
# `property` as identifier) that PhantomJS's JavaScriptCore rejects, so the bridge routes
# them to GhostDriver's own endpoints, which implement the same Selenium 2 semantics.
_ATOM_IS_DISPLAYED = "/* isDisplayed */"
_ATOM_GET_ATTRIBUTE = "/* getAttribute */"
_ATOM_SUBMIT = "/* submitForm */"

# JSONWP's setTimeout-based script timeout: larger values overflow to "fire at once".
_MAX_TIMEOUT_MS = 2**31 - 1
_TIMEOUT_TYPES = {"implicit": "implicit", "pageLoad": "page load", "script": "script"}
# What a new GhostDriver session uses until told otherwise (session.js `_timeouts`, checked in
# the PhantomJS 2.1.1 binary and on a real process: a missing element takes ~240 ms to fail,
# an async script that never calls back never fails). Not W3C's: see `BridgeSession.setup`.
GHOSTDRIVER_TIMEOUTS = {"implicit": 200, "pageLoad": _MAX_TIMEOUT_MS, "script": _MAX_TIMEOUT_MS}


def _valid_timeout(key: str, ms: Any) -> bool:
    if ms is None:
        return key == "script"
    return isinstance(ms, int) and not isinstance(ms, bool) and 0 <= ms <= 2**53 - 1


def _jsonwp_ms(ms: int | None) -> int:
    """A valid W3C timeout as GhostDriver takes it: null (never) and anything longer than its
    timers hold become the longest they hold."""
    return _MAX_TIMEOUT_MS if ms is None else min(ms, _MAX_TIMEOUT_MS)


@dataclass
class BridgeSession:
    """What the bridge must remember about one bridged session: the timeouts (GhostDriver
    has no GET /timeouts) and the mouse buttons and modifier keys held down (for DELETE
    /actions). Created by the proxy when a W3C client got a JSONWP backend; mutated only when
    a plan succeeds."""

    timeouts: dict = field(default_factory=lambda: dict(DEFAULT_TIMEOUTS))
    pressed: set = field(default_factory=set)  # mouse buttons left down by POST /actions
    modifiers: set = field(default_factory=set)  # modifier keys left down by POST /actions

    @classmethod
    def from_request(cls, payload: dict | None) -> "BridgeSession":
        session = cls()
        requested = w3c_capabilities(payload or {}).get("timeouts")
        if isinstance(requested, dict):
            session.timeouts.update({k: v for k, v in requested.items()
                                     if k in _TIMEOUT_TYPES and _valid_timeout(k, v)})
        return session

    def setup(self) -> Step | None:
        """Calls to run (with `run`) right after the backend created the session, so that its
        timeouts are the W3C ones the client expects (asked for in its capabilities, else W3C's
        defaults) and GET /timeouts tells the truth. GhostDriver's own defaults differ from
        W3C's (200 ms implicit wait, scripts and page loads never time out), so a client that
        sets nothing still needs them sent; each timeout already what GhostDriver uses is not
        (a command per session is proxy CPU). None when there is nothing to do."""
        changed = {k: v for k, v in self.timeouts.items()
                   if _jsonwp_ms(v) != GHOSTDRIVER_TIMEOUTS[k]}
        return self._set_timeouts(changed) if changed else None

    def plan(self, method: str, subpath: str, body: Any = None) -> Step:
        return plan(method, subpath, body, self)

    def _set_timeouts(self, body: Any) -> Plan | Reply:
        if not isinstance(body, dict):
            return error("invalid argument", "timeouts: expected a JSON object")
        calls = []
        accepted = {}
        for key, jsonwp_type in _TIMEOUT_TYPES.items():
            if key not in body:
                continue
            ms = body[key]
            if not _valid_timeout(key, ms):
                return error("invalid argument", f"timeouts: {key} must be an integer >= 0")
            accepted[key] = ms
            calls.append(("POST", "/timeouts", {"type": jsonwp_type, "ms": _jsonwp_ms(ms)}))
        if not calls:
            return ok(None)

        def combine(values: list[Any]) -> Reply:
            self.timeouts.update(accepted)
            return ok(None)

        return Plan("POST /timeouts", tuple(calls), combine)


def _value_arg(body: Any, key: str) -> Any:
    return body.get(key) if isinstance(body, dict) else None


def plan(method: str, subpath: str, body: Any = None, session: BridgeSession | None = None
         ) -> Step:
    """What to do with one W3C command on a bridged session.

    `subpath` is what follows `/session/{id}` ("" for the session itself, "/element",
    "/element/abc/rect"). Returns a Plan to run (see `run`), or a Reply to send at once:
    a refusal (`unsupported operation`, naming the command), an invalid-argument error, or a
    locally known answer (GET /timeouts, alerts)."""
    session = session if session is not None else BridgeSession()
    method = method.upper()
    path = subpath.rstrip("/")
    segs = path.strip("/").split("/") if path.strip("/") else []
    command = f"{method} /session/{{id}}{path}"

    match method, segs:
        case "DELETE", []:
            return _single(command, "DELETE", "", None)
        case "GET", ["url" | "title" | "source" | "screenshot"]:
            return _single(command, "GET", path)
        case "POST", ["url"]:
            url = _value_arg(body, "url")
            if not isinstance(url, str):
                return error("invalid argument", "url: expected a string")
            return Plan(command, (("POST", "/url", {"url": url}),), _void)
        case "POST", ["back" | "forward" | "refresh"]:
            return Plan(command, (("POST", path, {}),), _void)

        # windows
        case "GET", ["window"]:
            return _single(command, "GET", "/window_handle")
        case "GET", ["window", "handles"]:
            return _single(command, "GET", "/window_handles")
        case "POST", ["window"]:
            handle = _value_arg(body, "handle")
            if not isinstance(handle, str):
                return error("invalid argument", "switch to window: expected a string handle")
            return Plan(command, (("POST", "/window", {"name": handle}),), _void)
        case "DELETE", ["window"]:
            # W3C answers the handles left open.
            return Plan(command, (("DELETE", "/window", None), ("GET", "/window_handles", None)),
                        _last)
        case "GET", ["window", "rect"]:
            return _window_rect(command, ())
        case "POST", ["window", "rect"]:
            return _set_window_rect(command, body)
        case "POST", ["window", "maximize"]:
            return _window_rect(command, (("POST", "/window/current/maximize", {}),))
        case "POST", ["window", "new"]:
            return _new_window(command)

        # frames
        case "POST", ["frame"]:
            if not isinstance(body, dict) or "id" not in body:
                return error("invalid argument", "switch to frame: missing id")
            target = body["id"]
            if not (target is None or _element_id(target) is not None
                    or (isinstance(target, int) and not isinstance(target, bool)
                        and 0 <= target <= 65535)):
                return error("invalid argument", "switch to frame: id must be null, an index "
                             "or an element reference")
            return Plan(command, (("POST", "/frame", {"id": to_jsonwp(target)}),), _void)
        case "POST", ["frame", "parent"]:
            return _parent_frame(command)

        # elements
        case "POST", ["element" | "elements"]:
            return _find(command, path, body)
        case "GET", ["element", "active"]:
            return _single(command, "POST", "/element/active", {})
        case "POST", ["element", eid, "element" | "elements"]:
            return _find(command, path, body)
        case "POST", ["element", eid, "click" | "clear"]:
            return Plan(command, (("POST", path, {}),), _void)
        case "POST", ["element", eid, "value"]:
            return _send_keys(command, path, body, session)
        case "GET", ["element", eid, "text" | "name" | "selected" | "enabled" | "displayed"]:
            return _single(command, "GET", path)
        case "GET", ["element", eid, "css", _]:
            return _single(command, "GET", path)
        # Path segments come percent-encoded (Java clients send `:wdc:1` as `%3Awdc%3A1`):
        # what goes from the path into a body is decoded; paths go on as they came.
        case "GET", ["element", eid, "attribute", name]:
            return _script(command, "/execute", _ATTRIBUTE_SCRIPT,
                           [{JSONWP_ELEMENT: unquote(eid)}, unquote(name)])
        case "GET", ["element", eid, "property", name]:
            return _script(command, "/execute", _PROPERTY_SCRIPT,
                           [{JSONWP_ELEMENT: unquote(eid)}, unquote(name)])
        case "GET", ["element", eid, "rect"]:
            return Plan(command, (("GET", f"/element/{eid}/location", None),
                                  ("GET", f"/element/{eid}/size", None)), _rect)
        case "GET", ["element", eid, "screenshot"]:
            return Plan(command, (("GET", f"/element/{eid}/location", None),
                                  ("GET", f"/element/{eid}/size", None),
                                  ("GET", "/screenshot", None)), _element_screenshot,
                        heavy=True)

        # scripts
        case "POST", ["execute", "sync"]:
            return _execute(command, body, "/execute")
        case "POST", ["execute", "async"]:
            return _execute(command, body, "/execute_async")

        # cookies
        case "GET", ["cookie"]:
            return Plan(command, (("GET", "/cookie", None),),
                        lambda values: ok([_cookie(c) for c in values[0] or []]))
        case "GET", ["cookie", name]:
            return Plan(command, (("GET", "/cookie", None),),
                        lambda values: _named_cookie(values[0], unquote(name)))
        case "POST", ["cookie"]:
            return _add_cookie(command, body)
        case "DELETE", ["cookie"]:
            return Plan(command, (("DELETE", "/cookie", None),), _void)
        case "DELETE", ["cookie", name]:
            return Plan(command, (("DELETE", path, None),), _void)

        # timeouts
        case "POST", ["timeouts"]:
            return session._set_timeouts(body)
        case "GET", ["timeouts"]:
            return ok(dict(session.timeouts))

        # alerts: GhostDriver never holds a dialog open, so there is never one to act on.
        case ("GET" | "POST"), ["alert", "text"]:
            return _no_alert()
        case "POST", ["alert", "accept" | "dismiss"]:
            return _no_alert()

        # actions
        case "POST", ["actions"]:
            return _actions(command, body, session)
        case "DELETE", ["actions"]:
            return _release_actions(command, session)

        # Selenium's logs: GhostDriver keeps "browser" (console, page errors) and "har".
        case "POST", ["se", "log"]:
            kind = _value_arg(body, "type")
            if not isinstance(kind, str):
                return error("invalid argument", "get log: expected a string 'type'")
            return _single(command, "POST", "/log", {"type": kind})
        case "GET", ["se", "log", "types"]:
            return _single(command, "GET", "/log/types")

    if _refused_w3c_command(method, segs):
        return refusal(command)
    return unknown_command(command)


def _refused_w3c_command(method: str, segs: list[str]) -> bool:
    """A W3C command `plan` has no way to do on GhostDriver (`unsupported operation`); any
    other path it does not know is no command at all (`unknown command`)."""
    match method, segs:
        case "POST", ["print"] | ["window", "minimize" | "fullscreen"]:
            return True
        case "GET", ["element", _, "shadow" | "computedrole" | "computedlabel"]:
            return True
        case "POST", ["shadow", _, "element" | "elements"]:
            return True
    return False


def _no_alert() -> Reply:
    return error("no such alert", "PhantomJS never keeps a user prompt open: alert() "
                 "returns at once, confirm() returns false and prompt() null")


def _find(command: str, path: str, body: Any) -> Step:
    using, value = _value_arg(body, "using"), _value_arg(body, "value")
    if not isinstance(using, str) or not isinstance(value, str):
        return error("invalid argument", "find element: expected string 'using' and 'value'")
    return _single(command, "POST", path, {"using": using, "value": value}, _FIND_ERRORS)


def _send_keys(command: str, path: str, body: Any, session: BridgeSession) -> Step:
    text = _value_arg(body, "text")
    if isinstance(text, str):
        keys = list(text)
    elif isinstance(_value_arg(body, "value"), list):
        keys = list("".join(str(k) for k in body["value"]))
    else:
        return error("invalid argument", "send keys: expected a string 'text'")

    def typed(values: list[Any]) -> Reply:
        session.modifiers = set()  # GhostDriver lets go of all modifiers after element typing
        return ok(None)

    return Plan(command, (("POST", path, {"value": keys}),), typed)


def _script(command: str, endpoint: str, script: str, args: list) -> Plan:
    return _single(command, "POST", endpoint, {"script": script, "args": args}, _SCRIPT_ERRORS)


def _execute(command: str, body: Any, endpoint: str) -> Step:
    script = _value_arg(body, "script")
    args = _value_arg(body, "args") if isinstance(body, dict) and "args" in body else []
    if not isinstance(script, str) or not isinstance(args, list):
        return error("invalid argument", "execute: expected string 'script' and list 'args'")
    args = to_jsonwp(args)
    target = _element_id(args[0]) if args else None
    if endpoint == "/execute" and target is not None:
        element = _element_path(target)
        if script.startswith(_ATOM_IS_DISPLAYED):
            return _single(command, "GET", f"{element}/displayed")
        if script.startswith(_ATOM_GET_ATTRIBUTE) and len(args) > 1 and isinstance(args[1], str):
            return _single(command, "GET", f"{element}/attribute/{quote(args[1], safe='')}")
        if script.startswith(_ATOM_SUBMIT):
            # GhostDriver's own submit waits for the page load the submission starts.
            return Plan(command, (("POST", f"{element}/submit", {}),), _void)
    return _script(command, endpoint, script, args)


def _rect(values: list[Any]) -> Reply:
    location, size = values
    return ok({"x": location["x"], "y": location["y"],
               "width": size["width"], "height": size["height"]})


def _window_rect(command: str, before: tuple[Call, ...]) -> Plan:
    def combine(values: list[Any]) -> Reply:
        position, size = values[-2:]
        return ok({"x": position["x"], "y": position["y"],
                   "width": size["width"], "height": size["height"]})

    calls = before + (("GET", "/window/current/position", None),
                      ("GET", "/window/current/size", None))
    return Plan(command, calls, combine)


def _number(value: Any, low: float, high: float) -> bool:
    """A JSON number in [low, high]. Python's JSON reads Infinity and NaN, which W3C never
    sends and int() cannot take."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and low <= value <= high)


# W3C "Set Window Rect": width/height 0..2^31-1, x/y -2^31..2^31-1.
_RECT_RANGE = {"x": (-2**31, 2**31 - 1), "y": (-2**31, 2**31 - 1),
               "width": (0, 2**31 - 1), "height": (0, 2**31 - 1)}


def _set_window_rect(command: str, body: Any) -> Step:
    if not isinstance(body, dict):
        return error("invalid argument", "set window rect: expected a JSON object")
    for key, (low, high) in _RECT_RANGE.items():
        value = body.get(key)
        if value is not None and not _number(value, low, high):
            return error("invalid argument", f"set window rect: {key} must be null or a number "
                         f"from {low} to {high}")
    calls: list[Call] = []
    if body.get("width") is not None and body.get("height") is not None:
        calls.append(("POST", "/window/current/size",
                      {"width": int(body["width"]), "height": int(body["height"])}))
    if body.get("x") is not None and body.get("y") is not None:
        calls.append(("POST", "/window/current/position", {"x": int(body["x"]), "y": int(body["y"])}))
    return _window_rect(command, tuple(calls))


def _new_window(command: str) -> Plan:
    # No JSONWP command: open one from script and answer the handle that appeared.
    def opened(values: list[Any]) -> Plan:
        before = set(values[0] or [])

        def combine(after_values: list[Any]) -> Reply:
            new = [h for h in after_values[-1] or [] if h not in before]
            if not new:
                return error("unknown error", "new window: no new window handle appeared")
            return ok({"handle": new[0], "type": "window"})

        return Plan(command, (("POST", "/execute", {"script": "window.open('about:blank');",
                                                    "args": []}),
                              ("GET", "/window_handles", None)), combine, _SCRIPT_ERRORS)

    return Plan(command, (("GET", "/window_handles", None),), opened)


def _parent_frame(command: str) -> Plan:
    def descend(values: list[Any]) -> Step:
        path = values[0] or []
        calls = [("POST", "/frame", {"id": None})]
        calls += [("POST", "/frame", {"id": int(index)}) for index in path[:-1]]
        return Plan(command, tuple(calls), _void)

    return Plan(command, (("POST", "/execute", {"script": _FRAME_PATH_SCRIPT, "args": []}),),
                descend, _SCRIPT_ERRORS)


# --- cookies -------------------------------------------------------------------------------

_COOKIE_KEYS = ("name", "value", "path", "domain", "secure", "httpOnly", "expiry", "sameSite")


def _cookie(raw: Any) -> dict:
    """A GhostDriver cookie (`httponly`, float `expiry`, an extra `expires` string) as W3C."""
    raw = dict(raw or {})
    if "httponly" in raw:
        raw.setdefault("httpOnly", raw.pop("httponly"))
    cookie = {key: raw[key] for key in _COOKIE_KEYS if key in raw}
    if isinstance(cookie.get("expiry"), float):
        cookie["expiry"] = int(cookie["expiry"])
    return cookie


def _named_cookie(cookies: Any, name: str) -> Reply:
    for raw in cookies or []:
        if isinstance(raw, dict) and raw.get("name") == name:
            return ok(_cookie(raw))
    return error("no such cookie", f"no cookie named {name!r} is visible to the current page")


def _add_cookie(command: str, body: Any) -> Step:
    cookie = _value_arg(body, "cookie")
    if not isinstance(cookie, dict) or not isinstance(cookie.get("name"), str) \
            or not isinstance(cookie.get("value"), str):
        return error("invalid argument", "add cookie: expected a cookie with string name and value")
    # sameSite has no JSONWP/PhantomJS equivalent; PhantomJS spells httpOnly "httponly".
    sent = {("httponly" if key == "httpOnly" else key): value for key, value in cookie.items()
            if key != "sameSite" and value is not None}
    sent.setdefault("path", "/")
    if "domain" in sent:
        return Plan(command, (("POST", "/cookie", {"cookie": sent}),), _void)

    # W3C defaults the domain to the current document's; PhantomJS refuses a cookie without
    # one, so the bridge reads the current URL first.
    def with_domain(values: list[Any]) -> Step:
        host = urlsplit(values[0] or "").hostname
        if not host:
            return error("invalid cookie domain", f"the current page ({values[0]!r}) has no "
                         "domain to set a cookie on")
        return Plan(command, (("POST", "/cookie", {"cookie": {**sent, "domain": host}}),), _void)

    return Plan(command, (("GET", "/url", None),), with_domain)


# --- element screenshot --------------------------------------------------------------------

class CorruptPNG(ValueError):
    """The page screenshot is no PNG that decodes: the backend's fault (`unknown error`),
    unlike an element with nothing to crop (`unable to capture screen`)."""


def _element_screenshot(values: list[Any]) -> Reply:
    location, size, page = values
    rect = (round(location["x"]), round(location["y"]), round(size["width"]),
            round(size["height"]))
    try:
        png = crop_png(base64.b64decode(page), *rect)
    except (CorruptPNG, binascii.Error) as exc:
        return error("unknown error", f"element screenshot: the backend's page screenshot "
                     f"is not a valid base64 PNG ({exc})")
    except ValueError as exc:
        return error("unable to capture screen", f"element screenshot: {exc}")
    return ok(base64.b64encode(png).decode("ascii"))


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def crop_png(png: bytes, x: int, y: int, width: int, height: int) -> bytes:
    """Crop an 8-bit RGB/RGBA non-interlaced PNG (what PhantomJS renders) to a rectangle,
    clipped to the image. Pure Python: only the rows above the bottom edge and the columns
    left of the right edge are unfiltered, since PNG filters look only up and left.
    Raises CorruptPNG for data that does not decode, ValueError when there is nothing to crop
    or the format is not one PhantomJS writes."""
    try:
        return _crop_png(png, x, y, width, height)
    except (struct.error, zlib.error, IndexError) as exc:
        raise CorruptPNG(f"corrupt PNG: {exc}") from None


def _crop_png(png: bytes, x: int, y: int, width: int, height: int) -> bytes:
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise CorruptPNG("not a PNG")
    pos, idat, ihdr = 8, [], None
    while pos + 8 <= len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        data = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", data)
        elif kind == b"IDAT":
            idat.append(data)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if ihdr is None:
        raise CorruptPNG("PNG without IHDR")
    img_w, img_h, depth, color, _, _, interlace = ihdr
    if depth != 8 or color not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG format (depth {depth}, color type {color})")
    bpp = 4 if color == 6 else 3
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(img_w, x + width), min(img_h, y + height)
    if x1 <= x0 or y1 <= y0:
        raise ValueError("the element is outside the rendered page or has no size")
    raw = zlib.decompress(b"".join(idat))
    stride = img_w * bpp
    if len(raw) < y1 * (stride + 1):  # short rows would crop silently to garbage
        raise CorruptPNG(f"corrupt PNG: {len(raw)} bytes of pixel data for {img_w}x{img_h}")
    limit = x1 * bpp
    prev = bytearray(limit)
    rows = []
    for r in range(y1):
        start = r * (stride + 1)
        ftype = raw[start]
        line = bytearray(raw[start + 1:start + 1 + limit])
        if ftype == 1:
            for i in range(bpp, limit):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif ftype == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev))
        elif ftype == 3:
            for i in range(limit):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif ftype == 4:
            for i in range(limit):
                if i >= bpp:
                    line[i] = (line[i] + _paeth(line[i - bpp], prev[i], prev[i - bpp])) & 0xFF
                else:
                    line[i] = (line[i] + prev[i]) & 0xFF
        elif ftype != 0:
            raise CorruptPNG(f"bad PNG filter type {ftype}")
        if r >= y0:
            rows.append(b"\x00" + bytes(line[x0 * bpp:limit]))
        prev = line

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", x1 - x0, y1 - y0, 8, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"".join(rows), 6)) + chunk(b"IEND", b""))


# --- actions -------------------------------------------------------------------------------

# W3C's modifier keys. GhostDriver knows only the left-hand ones (inputs.js `_isModifierKey`)
# and toggles one on every /keys that holds it; the right-hand ones it would type as text, so
# they are sent as their left-hand twins.
_MODIFIERS = {"\ue008", "\ue009", "\ue00a", "\ue03d"}
_RIGHT_HAND = {"\ue050": "\ue008", "\ue051": "\ue009", "\ue052": "\ue00a", "\ue053": "\ue03d"}
# W3C's NULL key; GhostDriver lets go of every modifier on it (inputs.js `_clearModifierKeys`).
_NULL_KEY = "\ue000"
_MAX_SAFE = 2**53 - 1


def _element_path(eid: str) -> str:
    # An id from a body goes into a path quoted, as one segment: a "/", "?" or "#" in it must
    # not make another command of it. GhostDriver's ":wdc:N" ids pass unchanged.
    return "/element/" + quote(eid, safe=":")


def _actions(command: str, body: Any, session: BridgeSession) -> Step:
    """Map W3C input actions onto JSONWP's moveto/buttondown/buttonup/click/doubleclick/keys.

    Ticks run in order, each source's action of a tick in source order. GhostDriver 1.2's
    moveto goes to an element's centre (no offset), to its top-left plus an offset, or, without
    an element, by an offset from where the pointer is. So: a pointerMove from an element maps
    to its centre directly, or, with W3C offsets (which count from the centre), via the
    element's size; from the pointer to a plain relative moveto; from the viewport to a moveto
    relative to the <html> element. pointerDown, pointerUp, pointerDown, pointerUp of one
    button with nothing between is one doubleclick (two JSONWP clicks never make a `dblclick`
    event); pointerDown directly followed by pointerUp of the same button is one click;
    otherwise buttondown/buttonup (held buttons are remembered for DELETE /actions). keyDown
    values are typed into the focused element; a modifier is sent only when its state changes,
    since GhostDriver toggles it (held modifiers are remembered for DELETE /actions). Pauses
    are skipped: the proxy never waits. Refused: wheel sources, touch and pen pointers."""
    sources = _value_arg(body, "actions")
    if not isinstance(sources, list):
        return error("invalid argument", "actions: expected a list of input sources")
    ticks: list[list[tuple[str, dict]]] = []
    for source in sources:
        if not isinstance(source, dict) or not isinstance(source.get("actions"), list):
            return error("invalid argument", "actions: each source needs an actions list")
        kind = source.get("type")
        if kind == "pointer":
            parameters = source.get("parameters")
            if parameters is None:
                parameters = {}
            if not isinstance(parameters, dict):
                return error("invalid argument", "actions: pointer parameters must be an object")
            pointer_type = parameters.get("pointerType", "mouse")
            if pointer_type not in ("mouse", "pen", "touch"):
                return error("invalid argument", f"actions: bad pointerType {pointer_type!r}")
            if pointer_type != "mouse":
                return refusal(command, f"{pointer_type} pointers have no JSONWP equivalent")
        elif kind not in ("key", "none"):
            return refusal(command, f"{kind} input sources have no JSONWP equivalent")
        for index, action in enumerate(source["actions"]):
            if not isinstance(action, dict):
                return error("invalid argument", "actions: each action must be an object")
            while len(ticks) <= index:
                ticks.append([])
            ticks[index].append((kind, action))

    # ("call", Call) | ("move", (element id or None, x, y)) | ("down"/"up", button)
    steps: list[tuple[str, Any]] = []
    held = set(session.modifiers)
    for tick in ticks:
        for kind, action in tick:
            atype = action.get("type")
            if atype == "pause":
                continue
            if kind == "key" and atype in ("keyDown", "keyUp"):
                value = action.get("value")
                if not isinstance(value, str):
                    return error("invalid argument", "actions: key value must be a string")
                value = _RIGHT_HAND.get(value, value)
                if value in _MODIFIERS:
                    if (atype == "keyDown") == (value in held):
                        continue  # already in that state: a /keys would toggle it
                    held ^= {value}
                elif atype == "keyUp":
                    continue
                elif value == _NULL_KEY:
                    held.clear()
                steps.append(("call", ("POST", "/keys", {"value": [value]})))
                continue
            if kind == "pointer" and atype == "pointerMove":
                origin = action.get("origin", "viewport")
                x, y = action.get("x", 0), action.get("y", 0)
                if not all(_number(v, -_MAX_SAFE, _MAX_SAFE) for v in (x, y)):
                    return error("invalid argument", "actions: pointerMove x and y must be "
                                 "finite numbers")
                ref = _element_id(origin)
                if ref is None and origin not in ("viewport", "pointer"):
                    return error("invalid argument", f"actions: bad pointerMove origin {origin!r}")
                steps.append(("move", (ref or origin, int(x), int(y))))
                continue
            if kind == "pointer" and atype in ("pointerDown", "pointerUp"):
                button = action.get("button", 0)
                if not isinstance(button, int) or isinstance(button, bool) or button < 0:
                    return error("invalid argument", "actions: button must be an integer >= 0")
                steps.append(("down" if atype == "pointerDown" else "up", button))
                continue
            return refusal(command, f"{kind} action {atype!r}")

    # What must be looked up before the moves can be placed: element sizes, <html>.
    lookups: list[Call] = []
    for what, (origin, x, y) in ((w, a) for w, a in steps if w == "move"):
        if origin == "viewport":
            call = ("POST", "/element", {"using": "xpath", "value": "/html"})
        elif origin != "pointer" and (x or y):
            call = ("GET", _element_path(origin) + "/size", None)
        else:
            continue
        if call not in lookups:
            lookups.append(call)

    def build(found: list[Any]) -> Step:
        by_path = dict(zip((c[1] for c in lookups), found))
        calls: list[Call] = []
        pressed = set(session.pressed)
        index = 0
        while index < len(steps):
            what, arg = steps[index]
            index += 1
            if what == "call":
                calls.append(arg)
            elif what == "move":
                origin, x, y = arg
                if origin == "pointer":
                    move = {"xoffset": x, "yoffset": y}
                elif origin == "viewport":
                    move = {"element": _element_id(by_path["/element"]), "xoffset": x, "yoffset": y}
                elif x or y:
                    size = by_path[_element_path(origin) + "/size"]
                    move = {"element": origin, "xoffset": int(size["width"] // 2 + x),
                            "yoffset": int(size["height"] // 2 + y)}
                else:
                    move = {"element": origin}  # GhostDriver's own centre
                calls.append(("POST", "/moveto", move))
            elif what == "down":
                click = [("up", arg)]
                double = click + [("down", arg), ("up", arg)]
                if arg in pressed:
                    pass  # W3C: pressing a button already down does nothing
                elif steps[index:index + 3] == double:
                    calls.append(("POST", "/doubleclick", {"button": arg}))
                    index += 3
                elif steps[index:index + 1] == click:
                    calls.append(("POST", "/click", {"button": arg}))
                    index += 1
                else:
                    calls.append(("POST", "/buttondown", {"button": arg}))
                    pressed.add(arg)
            else:  # "up"
                calls.append(("POST", "/buttonup", {"button": arg}))
                pressed.discard(arg)

        def done(values: list[Any]) -> Reply:
            session.pressed = pressed
            session.modifiers = held
            return ok(None)

        return Plan(command, tuple(calls), done) if calls else ok(None)

    if not lookups:
        return build([])
    return Plan(command, tuple(lookups), build)


def _release_actions(command: str, session: BridgeSession) -> Step:
    """W3C "release actions": let go of what earlier actions left pressed (JSONWP keeps a
    pressed button until buttonup, a modifier until it is sent again or the NULL key)."""
    calls: list[Call] = [("POST", "/buttonup", {"button": b}) for b in sorted(session.pressed)]
    if session.modifiers:
        calls.append(("POST", "/keys", {"value": [_NULL_KEY]}))
    if not calls:
        return ok(None)

    def done(values: list[Any]) -> Reply:
        session.pressed = set()
        session.modifiers = set()
        return ok(None)

    return Plan(command, tuple(calls), done)


# --- running a plan ------------------------------------------------------------------------

async def run(step: Step, send: Send,
              offload: Callable[..., Awaitable[Any]] | None = asyncio.to_thread,
              made: Iterable[Result] = ()) -> Reply:
    """Run a plan against the pinned backend through `send(method, subpath, body)` and return
    the W3C answer. Calls go one at a time, in order, and stop at the first failure: a
    command the backend refused is never retried or continued. A `heavy` plan's combine runs
    through `offload` (a thread by default) so a large element screenshot never stalls the
    event loop; pass None to run everything inline. `made`: the results of the first calls of
    `step`, made already (a run begun by callbacks, resumed here)."""
    results = list(made)
    while isinstance(step, Plan):
        while (call := next_call(step, results)) is not None:
            results.append(await send(*call))
        if step.heavy and offload is not None:
            step = await offload(step.reply, results)
        else:
            step = step.reply(results)
        results = []
    return step


def next_call(step: Plan, results: list[Result]) -> Call | None:
    """The call of `step` to make next, given the results of those made; None once all are
    made or one failed (then `step.reply(results)` answers)."""
    if len(results) < len(step.calls) and (not results or step.failure(results[-1]) is None):
        return step.calls[len(results)]
    return None
