"""Wire knowledge of WebDriver: which command a path is, where the session id sits, the JSONWP and
W3C shapes of a new-session answer, and the one error type that crosses the wire.

Pure: no aiohttp. The proxy asks `classify(method, path)` once per request and reads the session
id from the path only; bodies are parsed only where a session id must be learned.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Any

# Selenium 3 and older put everything under /wd/hub; Selenium 4 and W3C servers use the root.
HUB_PREFIX = "/wd/hub"

# GhostDriver uses UUIDs, chromedriver 32 hex digits, Selenium Grid UUIDs. Anything else (slashes,
# dots-only, percent escapes) cannot be a session id and must never reach a backend as a path.
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")


class Kind(Enum):
    NEW_SESSION = "new_session"
    DELETE_SESSION = "delete_session"
    SESSION = "session"  # any other command of a known session
    STATUS = "status"
    SESSIONS = "sessions"
    UNKNOWN = "unknown"


class Route:
    """What a request is. Built once per request: a slotted class, because a NamedTuple's
    Python-level __new__ cost twice as much (0.3 us, about 2% of a command's CPU)."""

    __slots__ = ("kind", "session_id", "prefix", "rest")

    def __init__(self, kind: Kind, session_id: str = "", prefix: str = "", rest: str = "") -> None:
        self.kind = kind
        self.session_id = session_id
        self.prefix = prefix  # "" or "/wd/hub", kept so the backend sees the path the client used
        self.rest = rest  # the command after /session/{id}, e.g. "/element"

    def _fields(self) -> tuple:
        return (self.kind, self.session_id, self.prefix, self.rest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Route) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "Route(%r, %r, %r, %r)" % self._fields()


_METHODS = frozenset({"GET", "POST", "DELETE"})  # all WebDriver uses (JSONWP and W3C)
_TRICKS = re.compile(r"(^|/)\.{1,2}(/|$)|%2e|%2f|%5c|%00|\\", re.I)


def check_target(method: str, target: str) -> None:
    """Refuse what no WebDriver client sends and a forward proxy would act on: absolute-form or
    authority-form targets (`GET http://elsewhere/`, `CONNECT host:443`), other methods, and dot
    segments or encoded slashes, dots, backslashes or NULs anywhere in the path."""
    if not target.startswith("/"):
        raise WebDriverError.invalid_argument(
            "only origin-form request targets (/session/...) are served: stickyproxy is not a "
            "forward proxy")
    if method not in _METHODS:
        raise WebDriverError(405, "unknown method", f"WebDriver has no {method[:16]} commands")
    path = target.split("?", 1)[0]
    if _TRICKS.search(path):
        raise WebDriverError.invalid_argument(f"path not allowed: {path[:200]!r}")


# A session command in its usual shape: no query, and no dot segment, escape or backslash that
# check_target would refuse; its Route is read off the match (one regex instead of two passes).
_COMMAND = re.compile(r"(/wd/hub)?/session/([A-Za-z0-9_-][A-Za-z0-9._-]{0,127})"
                      r"((?:/[A-Za-z0-9_-]+)*)/?\Z")


def route(method: str, target: str) -> Route:
    """check_target, then classify: what the proxy asks once per request."""
    match = _COMMAND.match(target) if method in _METHODS else None
    if match is not None:
        prefix, sid, rest = match.groups()
        if not rest and method == "DELETE":
            return Route(Kind.DELETE_SESSION, sid, prefix or "")
        return Route(Kind.SESSION, sid, prefix or "", rest)
    check_target(method, target)
    return classify(method, target.split("?", 1)[0])


def classify(method: str, path: str) -> Route:
    prefix = ""
    if path.startswith(HUB_PREFIX) and (len(path) == len(HUB_PREFIX) or path[len(HUB_PREFIX)] == "/"):
        prefix, path = HUB_PREFIX, path[len(HUB_PREFIX):]
    path = path.rstrip("/") or "/"
    if path == "/session":
        return Route(Kind.NEW_SESSION if method == "POST" else Kind.UNKNOWN, prefix=prefix)
    if path.startswith("/session/"):
        sid, _, rest = path[len("/session/"):].partition("/")
        if not _SESSION_ID.match(sid):
            raise WebDriverError.invalid_session(sid, "that is not a session id")
        rest = "/" + rest if rest else ""
        if not rest and method == "DELETE":
            return Route(Kind.DELETE_SESSION, sid, prefix)
        return Route(Kind.SESSION, sid, prefix, rest)
    if path == "/status" and method == "GET":
        return Route(Kind.STATUS, prefix=prefix)
    if path == "/sessions" and method == "GET":
        return Route(Kind.SESSIONS, prefix=prefix)
    return Route(Kind.UNKNOWN, prefix=prefix)


def session_id_of(answer: Any) -> str | None:
    """The id in a new-session answer: JSONWP top-level `sessionId`, W3C `value.sessionId`."""
    if not isinstance(answer, dict):
        return None
    sid = answer.get("sessionId")
    if not sid:
        value = answer.get("value")
        if isinstance(value, dict):
            sid = value.get("sessionId")
    return sid if isinstance(sid, str) and _SESSION_ID.match(sid) else None


def with_chrome_args(payload: dict, args) -> dict:
    """A W3C new-session payload with `args` added to goog:chromeOptions.args (in alwaysMatch)
    where the client did not give them already; the client's own payload is not changed."""
    caps = payload.get("capabilities")
    if not isinstance(caps, dict):
        return payload
    always = caps.get("alwaysMatch") or {}
    options = (always.get("goog:chromeOptions") or {}) if isinstance(always, dict) else None
    given = (options.get("args") or []) if isinstance(options, dict) else None
    if not isinstance(given, list):  # malformed: sent as it came, for chromedriver to refuse
        return payload
    always, options = dict(always), dict(options)
    names = {a.split("=", 1)[0] for a in given if isinstance(a, str)}
    options["args"] = given + [a for a in args if a.split("=", 1)[0] not in names]
    always["goog:chromeOptions"] = options
    return {**payload, "capabilities": {**caps, "alwaysMatch": always}}


def dialect_of_status(answer: Any) -> str:
    """`jsonwp` for GhostDriver-style /status answers (top-level numeric status), else `w3c`."""
    if isinstance(answer, dict) and isinstance(answer.get("status"), int):
        return "jsonwp"
    return "w3c"


class WebDriverError(Exception):
    """The one error that crosses the wire, rendered as W3C `{"value": {error, message}}`.

    Never above HTTP 500: Selenium 3's client treats any status above 500 as success.
    """

    def __init__(self, status: int, error: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = headers or {}
        self.close = False  # end the client connection after this answer (a broken request)

    def body(self) -> bytes:
        return json.dumps(
            {"value": {"error": self.error, "message": self.message, "stacktrace": ""}}
        ).encode()

    @classmethod
    def invalid_session(cls, sid: str, why: str) -> "WebDriverError":
        return cls(404, "invalid session id", f"session {sid!r}: {why}")

    @classmethod
    def session_not_created(cls, message: str, retry_after: int | None = None) -> "WebDriverError":
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        return cls(500, "session not created", message, headers)

    @classmethod
    def invalid_argument(cls, message: str) -> "WebDriverError":
        return cls(400, "invalid argument", message)

    @classmethod
    def unknown_command(cls, method: str, path: str) -> "WebDriverError":
        return cls(404, "unknown command", f"stickyproxy does not route {method} {path}")

    @classmethod
    def backend_unavailable(cls, sid: str, backend: str, why: str) -> "WebDriverError":
        # "unknown error" (500): the session may live on once its backend answers again, so it
        # is not "invalid session id"; and it is never sent to another backend, where it never was.
        return cls(500, "unknown error",
                   f"session {sid}: its backend {backend} is unavailable ({why}); "
                   "stickyproxy never moves a session to another backend")

    @classmethod
    def timeout(cls, message: str) -> "WebDriverError":
        return cls(500, "timeout", message)

    @classmethod
    def unknown(cls, message: str) -> "WebDriverError":
        return cls(500, "unknown error", message)
