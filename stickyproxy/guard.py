"""What the WebDriver port refuses before any backend sees a request: unauthenticated callers,
bodies over `--max-body`, new sessions over `--new-session-rate`. Every refusal is counted by
reason and logged (`REFUSED reason=... client=...`), never silent; credentials are never logged.
"""

from __future__ import annotations

import logging
from collections import Counter

from .auth import Authenticator
from .ratelimit import RateLimiter
from .webdriver import WebDriverError

log = logging.getLogger("stickyproxy")

WWW_AUTHENTICATE = 'Basic realm="stickyproxy", Bearer realm="stickyproxy"'


class Guard:
    def __init__(self, auth: Authenticator, limiter: RateLimiter, max_body: int,
                 max_connections: int = 0) -> None:
        self.auth, self.limiter, self.max_body = auth, limiter, max_body
        self.max_connections = max_connections
        self.refused: Counter = Counter()

    def refuse(self, reason: str, err: WebDriverError, client: str | None) -> WebDriverError:
        self.refused[reason] += 1
        # After a request we would not parse (or whose body we left unread), the rest of the
        # connection cannot be trusted to start at a request boundary: close it.
        err.close = reason in ("bad_request", "body_too_large")
        log.warning('REFUSED reason=%s client=%s status=%d message="%s"', reason, client or "-",
                    err.status, err.message)
        return err

    @staticmethod
    def unauthenticated(why: str) -> WebDriverError:
        return WebDriverError(401, "unknown error", f"stickyproxy: authentication required ({why})",
                              {"WWW-Authenticate": WWW_AUTHENTICATE})

    @staticmethod
    def uploads_full() -> WebDriverError:
        return WebDriverError(503, "unknown error",
                              "stickyproxy holds as many request bodies as it may at once "
                              "(4x --max-body, all clients together); retry shortly",
                              {"Retry-After": "1"})

    @staticmethod
    def auth_busy() -> WebDriverError:
        return WebDriverError(429, "unknown error",
                              "stickyproxy: too many password checks at once (each is slow on "
                              "purpose); retry in 1s", {"Retry-After": "1"})

    def too_large(self, size: int | None) -> WebDriverError:
        got = f"{size} bytes" if size is not None else "more"
        return WebDriverError(413, "invalid argument",
                              f"request body too large: {got}, --max-body is {self.max_body} bytes")

    @staticmethod
    def too_fast(wait: float) -> WebDriverError:
        seconds = max(1, int(wait + 0.999))
        return WebDriverError(429, "session not created",
                              f"too many new sessions from this address (--new-session-rate); "
                              f"retry in {seconds}s", {"Retry-After": str(seconds)})
