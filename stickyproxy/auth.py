"""Who is calling (pure): `--auth-token` as a Bearer token or as the password of HTTP Basic (any
user name: Selenium 3 can only send Basic credentials, from `http://user:TOKEN@host:8910`), and
Basic users from a file of hashed passwords (`--auth-users`). Comparisons are constant-time;
credentials are never logged or kept: only a short fingerprint of *who* created each session,
so that a session can be used only with the credentials that created it.

Users file: one `name:pbkdf2_sha256$ITERATIONS$SALT_HEX$HASH_HEX` per line (`stickyproxy
hash-password` makes one); `#` comments and blank lines are ignored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import time
from dataclasses import dataclass

from .ratelimit import RateLimiter

SCHEME = "pbkdf2_sha256"
ITERATIONS = 200_000
# Password hashes computed per second at most, for everyone together. Each is ~40 ms of the
# event loop (PBKDF2, by design slow), and an unauthenticated caller can ask for as many as it
# likes: unbounded, a few connections of wrong passwords stalled every client for seconds. A
# user's good password is hashed once (then remembered), so only new logins ever wait.
SLOW_CHECKS_PER_SECOND = 5
_STORED = re.compile(rf"{SCHEME}\$([1-9][0-9]{{0,8}})\$((?:[0-9a-f]{{2}})+)\$((?:[0-9a-f]{{2}})+)")


def hash_password(password: str, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"{SCHEME}${iterations}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, iterations, salt, digest = stored.split("$")
        if scheme != SCHEME:
            return False
        computed = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt),
                                       int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(computed, bytes.fromhex(digest))


def parse_users(text: str) -> dict[str, str]:
    """name -> stored hash. A line that could never match a password (another scheme, fields
    that are not hex) or a name given twice stops start-up instead of locking its user out."""
    users = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if not sep or not name or not _STORED.fullmatch(stored):
            raise ValueError(f"line {number}: expected name:{SCHEME}$ITERATIONS$SALT_HEX$HASH_HEX "
                             "(as `stickyproxy hash-password` writes)")
        if name in users:
            raise ValueError(f"line {number}: user {name!r} is already given")
        users[name] = stored
    return users


@dataclass(frozen=True)
class Verdict:
    ok: bool
    principal: str = ""  # who, as a fingerprint; never the secret
    reason: str = ""  # why not, for the log and the client
    busy: bool = False  # not checked: too many password checks this second (retry shortly)


class Authenticator:
    """None of the two configured: everyone is the same anonymous principal."""

    def __init__(self, token: str = "", users: dict[str, str] | None = None,
                 slow_per_second: float = SLOW_CHECKS_PER_SECOND, clock=time.monotonic) -> None:
        self.token = token.encode()
        self.users = users or {}
        # Checking a password is deliberately slow (PBKDF2); remember good ones by fingerprint.
        self._good: dict[bytes, str] = {}
        self.enabled = bool(self.token or self.users)  # read for every request: an attribute
        # An unknown user costs what a known one does (else the time tells which names exist):
        # a hash of the users' own strength, made once.
        most = max((int(s.split("$")[1]) for s in self.users.values()), default=0)
        self._dummy = hash_password(os.urandom(8).hex(), most) if most else ""
        self._slow_checks, self._clock = RateLimiter(slow_per_second, slow_per_second), clock

    def check(self, authorization: str | None) -> Verdict:
        if not self.enabled:
            return Verdict(True, "anonymous")
        if not authorization:
            return Verdict(False, reason="no credentials")
        scheme, _, value = authorization.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            if self.token and hmac.compare_digest(value.strip().encode(), self.token):
                return Verdict(True, "token")
            return Verdict(False, reason="wrong token")
        if scheme == "basic":
            try:
                user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return Verdict(False, reason="malformed Basic credentials")
            if not sep:
                return Verdict(False, reason="malformed Basic credentials")
            if self.token and hmac.compare_digest(password.encode(), self.token):
                return Verdict(True, "token")
            return self._check_user(user, password)
        return Verdict(False, reason=f"unsupported scheme {scheme[:20]!r}")

    def _check_user(self, user: str, password: str) -> Verdict:
        if not self.users:  # (token only: a wrong token costs nothing to refuse)
            return Verdict(False, reason="unknown user or wrong password")
        stored = self.users.get(user)
        key = hashlib.sha256(f"{user}\0{password}\0{stored}".encode()).digest()
        if stored is not None and key in self._good:
            return Verdict(True, self._good[key])
        if self._slow_checks.take("all clients", self._clock()):
            return Verdict(False, reason="too many password checks at once; retry shortly",
                           busy=True)
        if stored is None:
            check_password(password, self._dummy)  # same work as a known user
            return Verdict(False, reason="unknown user or wrong password")
        if not check_password(password, stored):
            return Verdict(False, reason="unknown user or wrong password")
        principal = "user:" + user
        if len(self._good) > 10_000:
            self._good.clear()
        self._good[key] = principal
        return Verdict(True, principal)
