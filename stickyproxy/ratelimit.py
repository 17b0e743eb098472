"""New-session rate per client address (pure): a token bucket per address, time as a parameter.

`--new-session-rate 5/s` (or `/m`, `/h`) lets an address start that many sessions per period on
average, with bursts up to the same number. An IPv6 client counts by its /64, the block one host
is given (else it could rotate addresses past any limit). Idle buckets are forgotten so a scan
of many addresses cannot grow the table without bound; when every bucket is busy, the least
recently used half goes, not every client's limit at once.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h|sec|min|hour)\s*$", re.I)
_PERIOD = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600}


def client_key(address: str) -> str:
    """The unit a limit counts: an IPv4 address as it is, an IPv6 one by its /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # (a Unix socket, "-": as given)
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return address


def parse_rate(text: str) -> tuple[float, float]:
    """(per second, burst) from "5/s", "120/m", "1000/h"; "0" or "off" is no limit (0, 0)."""
    if str(text).strip().lower() in ("0", "off", "none", ""):
        return 0.0, 0.0
    m = _RATE.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"not a rate: {text!r} (use e.g. 5/s, 120/m)")
    count = float(m.group(1))
    return count / _PERIOD[m.group(2).lower()], max(1.0, count)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    def __init__(self, per_second: float, burst: float = 1.0, max_clients: int = 100_000):
        self.rate = per_second
        self.burst = max(1.0, burst)
        self.max_clients = max_clients
        self._buckets: dict[str, _Bucket] = {}

    def take(self, client: str, now: float) -> float:
        """0.0 when `client` may start a session now, else seconds until it may."""
        if not self.rate:
            return 0.0
        if ":" in client:  # (IPv6: its /64; IPv4 needs no work)
            client = client_key(client)
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._forget_full(now)
            bucket = self._buckets[client] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled: forgetting them changes nothing."""
        refill = self.burst / self.rate
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.at < refill}
        if len(self._buckets) >= self.max_clients:  # all busy, a flood: the older half goes
            kept = sorted(self._buckets.items(), key=lambda kv: kv[1].at)[self.max_clients // 2:]
            self._buckets = dict(kept)
