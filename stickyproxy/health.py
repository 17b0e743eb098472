"""Health: HAProxy's rise/fall counter and the meaning of one check's outcome (pure, on top), and
the per-backend checker loop (below), which takes its I/O as a parameter.

A backend starts as `init` (not up) and is up after its first good check, however many failed
before it (a container or a compose service still starting); from then on it takes `fall`
consecutive failures to go down and `rise` consecutive successes to come back (HAProxy's
fall/rise), so a PhantomJS that is merely slow under load does not flap. Until that first good
check, checks come sooner than the interval (backing off to it), so a backend that starts in a
second is used after about a second, not after `rise` intervals.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from .webdriver import dialect_of_status

log = logging.getLogger("stickyproxy")

INIT, UP, DOWN = "init", "up", "down"


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    code: str  # ok | refused | timeout | reset | bad_status | not_webdriver | error
    reason: str  # a sentence for stats and logs
    at: float = 0.0  # wall clock
    latency: float = 0.0  # seconds
    dialect: str = ""  # "jsonwp" | "w3c" when the answer was WebDriver JSON


@dataclass(slots=True)
class Health:
    """Up after `rise` consecutive good checks, down after `fall` consecutive failures.

    Strictly consecutive (the issue's rule), unlike HAProxy's single counter, where a pattern
    like fail, fail, ok, fail, fail takes a server down: PhantomJS under load fails the odd check,
    and a success in between shows it is alive.
    """

    rise: int
    fall: int
    state: str = INIT
    streak: int = 0  # consecutive results that argue for leaving the current state
    ever_up: bool = False  # rise/fall distrust a backend that has been up; a starting one has no past

    @property
    def up(self) -> bool:
        return self.state == UP

    def observe(self, ok: bool) -> str | None:
        """Feed one check; returns the new state when it changed, else None."""
        if self.state == INIT or (ok and not self.ever_up):
            # A new backend has no history to distrust: one good check brings it up, also after
            # failures while it was still starting.
            new = UP if ok else DOWN
            changed = new != self.state
            self.state, self.streak, self.ever_up = new, 0, self.ever_up or ok
            return new if changed else None
        if ok == (self.state == UP):
            self.streak = 0
            return None
        self.streak += 1
        if self.streak >= (self.fall if self.state == UP else self.rise):
            self.state, self.streak = (DOWN if self.state == UP else UP), 0
            return self.state
        return None

    def force_down(self) -> str | None:
        """The provider saw the process die: no need to wait for `fall` checks."""
        old = self.state
        self.state, self.streak = DOWN, 0
        return DOWN if old != DOWN else None


Probe = Callable[[], Awaitable[CheckResult]]


FIRST_RETRY = 0.25  # seconds before the second check of a backend that is still starting


def next_wait(previous: float | None, interval: float, starting: bool) -> float:
    """Seconds from one check's start to the next: `interval`, but while the backend has never been
    up, FIRST_RETRY doubling up to `interval` (a dead address settles at the normal rate)."""
    if not starting:
        return interval
    return min(interval, FIRST_RETRY if previous is None else previous * 2)


async def check_loop(name: str, probe: Probe, interval: float, on_result: Callable[[CheckResult], None],
                     starting: Callable[[], bool] = lambda: False) -> None:
    """Probe forever, one check at a time; the next check starts `next_wait` after the last began."""
    wait = None
    while True:
        started = time.monotonic()
        try:
            result = await probe()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a probe must not end the loop silently
            log.exception("CHECK_ERROR backend=%s", name)
            result = CheckResult(False, "error", f"check failed: {exc!r}", time.time())
        on_result(result)
        wait = next_wait(wait, interval, starting())
        await asyncio.sleep(max(0.0, wait - (time.monotonic() - started)))


async def probe(upstream, path: str, timeout: float) -> CheckResult:
    """One `GET <path>` against a backend (`upstream.Upstream`), judged: a 2xx WebDriver JSON
    answer is good; everything else is a failure with a short code and a sentence."""
    started = time.monotonic()
    at = time.time()
    try:
        status, body = await upstream.check(path, timeout)
    except TimeoutError:
        return CheckResult(False, "timeout", f"no answer within {timeout:g}s", at, timeout)
    except ConnectionRefusedError:
        return CheckResult(False, "refused", "connection refused", at)
    except OSError as exc:  # NotConnected / UpstreamError are ConnectionErrors
        code = "refused" if "refused" in str(exc) else "reset"
        return CheckResult(False, code, str(exc), at, time.monotonic() - started)
    latency = time.monotonic() - started
    if not 200 <= status < 300:
        return CheckResult(False, "bad_status", f"{path} answered HTTP {status}", at, latency)
    try:
        answer = json.loads(body)
    except ValueError:
        return CheckResult(False, "not_webdriver", f"{path} did not answer JSON", at, latency)
    if not isinstance(answer, dict) or "value" not in answer:
        return CheckResult(False, "not_webdriver", f"{path} answered JSON without a value", at, latency)
    return CheckResult(True, "ok", f"HTTP {status} in {latency * 1000:.0f} ms", at, latency,
                       dialect_of_status(answer))
