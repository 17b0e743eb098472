"""Backends discovered by DNS (`--backend-dns`), re-resolved every `--dns-interval`.

`NAME:PORT` takes every A/AAAA address of NAME on PORT: docker compose `--scale phantomjs=12`,
Swarm's `tasks.<service>`, a Kubernetes headless Service. `NAME` alone takes its SRV records,
which carry a port each (Kubernetes publishes `_port._tcp.<service>...` for named ports).

An address that disappears is not dropped: it is published as `gone`, so the pool drains it
(no new sessions, its live ones go on) and the lifecycle retires it once it is empty. A new
address is health-checked before use like any backend. A lookup that fails (timeout, SERVFAIL)
keeps the last answer: a DNS hiccup must not drain the pool; an answer of no addresses
(NXDOMAIN, empty) is an answer, and drains.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from . import BackendSpec, PoolSink

log = logging.getLogger("stickyproxy")


@dataclass(frozen=True)
class Target:
    name: str
    port: int | None  # None: SRV

    @classmethod
    def parse(cls, text: str) -> "Target":
        name, sep, port = text.rpartition(":")
        if sep and port.isdigit():
            return cls(name.rstrip("."), int(port))
        if ":" in text or not text:
            raise ValueError(f"not NAME:PORT or an SRV NAME: {text!r}")
        return cls(text.rstrip("."), None)


def backend_id(target: Target, host: str, port: int) -> str:
    return f"dns-{target.name}-{host}:{port}"


def merge(known: Mapping[str, BackendSpec], answers: Mapping[Target, set[tuple[str, int]] | None]
          ) -> dict[str, BackendSpec]:
    """The set to publish: every address answered now, and the ones known before that are not
    (marked gone, to drain). A target whose lookup failed (None) keeps what it had."""
    out: dict[str, BackendSpec] = {}
    for target, addresses in answers.items():
        prefix = f"dns-{target.name}-"
        if addresses is None:
            out.update({k: v for k, v in known.items() if k.startswith(prefix)})
            continue
        for host, port in addresses:
            key = backend_id(target, host, port)
            url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            out[key] = BackendSpec(key, url, "dns", meta={"dns": target.name})
        for key, spec in known.items():
            if key.startswith(prefix) and key not in out:
                out[key] = BackendSpec(key, spec.url, "dns", meta={"dns": target.name, "gone": True})
    return out


class DnsProvider:
    source = "dns"

    def __init__(self, targets: Iterable[str], interval: float, server: tuple[str, int] | None = None,
                 timeout: float = 5.0) -> None:
        self.targets = [Target.parse(t) for t in targets]
        self.interval, self.timeout = interval, timeout
        self.server = server
        self.known: dict[str, BackendSpec] = {}
        self.failures = 0
        self._sink: PoolSink | None = None

    def _resolver(self):
        import dns.asyncresolver  # dnspython: loaded only when DNS discovery is used

        if self.server is None:
            resolver = dns.asyncresolver.Resolver()
        else:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [self.server[0]]
            resolver.port = self.server[1]
        resolver.lifetime = self.timeout
        return resolver

    async def resolve(self, resolver, target: Target) -> set[tuple[str, int]] | None:
        import dns.exception
        import dns.resolver

        try:
            if target.port is None:
                answer = await resolver.resolve(target.name, "SRV")
                return {(str(r.target).rstrip("."), r.port) for r in answer}
            found: set[tuple[str, int]] = set()
            for kind in ("A", "AAAA"):
                try:
                    found |= {(r.address, target.port) for r in await resolver.resolve(target.name, kind)}
                except dns.resolver.NoAnswer:
                    pass
            return found
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return set()
        except (dns.exception.DNSException, OSError) as exc:
            self.failures += 1
            log.warning('DNS_FAILED name=%s reason="%s"', target.name, exc)
            return None

    async def refresh(self, resolver) -> None:
        answers = {t: await self.resolve(resolver, t) for t in self.targets}
        merged = merge(self.known, answers)
        if merged != self.known:
            self.known = merged
            self._sink.publish(self.source, list(merged.values()))

    async def run(self, sink: PoolSink) -> None:
        self._sink = sink
        resolver = self._resolver()
        while True:
            await self.refresh(resolver)
            await asyncio.sleep(self.interval)

    async def retire(self, backend_id: str) -> None:
        """The lifecycle drained a gone address to empty: forget it."""
        if self.known.pop(backend_id, None) is not None:
            self._sink.publish(self.source, list(self.known.values()))

    async def close(self) -> None:
        pass

    def stats(self) -> Mapping[str, Mapping[str, Any]]:
        return {key: {"dns": spec.meta["dns"], "gone": bool(spec.meta.get("gone"))}
                for key, spec in self.known.items()}
