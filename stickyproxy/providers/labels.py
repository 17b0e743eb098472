"""Backends adopted from Docker labels (`--docker-discover`): every running container on an
engine that carries `stickyproxy.port=PORT` is a backend, whoever started it (docker compose,
a script, another team). Containers that stickyproxy launches itself (they carry
`stickyproxy.pool`) are left to their launcher.

Where a container is reached: `stickyproxy.url` when the label is given; on host networking, the
engine's host (loopback for a local engine) and the port; otherwise its name on its network,
which works when stickyproxy runs on that network too (as in compose). A container that goes
away took its sessions with it: it is reported lost at once (reason `removed`), unlike an
address that leaves DNS, whose server may still be serving. An engine that cannot be listed keeps
what it had. docker-py is blocking: every call runs in a thread.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

from . import BackendSpec, PoolSink

log = logging.getLogger("stickyproxy")

LABEL_PORT = "stickyproxy.port"
LABEL_URL = "stickyproxy.url"
LABEL_POOL = "stickyproxy.pool"  # a launcher's own containers: not ours to adopt


def engine_host(base_url: str | None) -> str:
    """Where host-networked containers of this engine listen: loopback for a local socket."""
    if not base_url or base_url.startswith(("unix:", "npipe:")):
        return "127.0.0.1"
    return urlsplit(base_url.replace("tcp://", "http://")).hostname or "127.0.0.1"


def specs_for(containers: Iterable[Mapping[str, Any]], host: str, source: str) -> dict[str, BackendSpec]:
    """Backends for the labelled containers in a `docker ps`-like listing (pure)."""
    out = {}
    for c in containers:
        labels = c.get("Labels") or {}
        port = labels.get(LABEL_PORT, "")
        if c.get("State") != "running" or LABEL_POOL in labels or not port.isdigit():
            continue
        name = (c.get("Names") or ["/" + c["Id"][:12]])[0].lstrip("/")
        if labels.get(LABEL_URL):
            url = labels[LABEL_URL].rstrip("/")
        elif (c.get("HostConfig") or {}).get("NetworkMode") == "host":
            url = f"http://{host}:{port}"
        else:
            url = f"http://{name}:{port}"
        key = f"{source}-{name}"
        out[key] = BackendSpec(key, url, source, generation=c["Id"][:12],
                               meta={"container_id": c["Id"][:12], "container_name": name})
    return out


class LabelProvider:
    def __init__(self, base_url: str | None, *, source: str = "labels", interval: float = 5.0) -> None:
        self.base_url, self.source, self.interval = base_url, source, interval
        self.known: dict[str, BackendSpec] = {}
        self._sink: PoolSink | None = None
        self._client = None
        self.failures = 0

    def _list_blocking(self) -> list[dict]:
        import docker

        if self._client is None:
            self._client = (docker.DockerClient(base_url=self.base_url) if self.base_url
                            else docker.from_env())
        return self._client.api.containers(filters={"label": LABEL_PORT})

    async def refresh(self) -> None:
        try:
            listing = await asyncio.to_thread(self._list_blocking)
        except Exception as exc:  # an engine that is down keeps what it had: isolated failure
            self.failures += 1
            log.warning('DOCKER_DISCOVER_FAILED source=%s reason="%s"', self.source, exc)
            return
        fresh = specs_for(listing, engine_host(self.base_url), self.source)
        for key in self.known.keys() - fresh.keys():
            log.warning("BACKEND_LOST backend=%s reason=removed", key)
            self._sink.lost(key, "removed")
        if fresh != self.known:
            self.known = fresh
            self._sink.publish(self.source, list(fresh.values()))

    async def run(self, sink: PoolSink) -> None:
        self._sink = sink
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        if self._client is not None:
            await asyncio.to_thread(self._client.close)

    def stats(self) -> Mapping[str, Mapping[str, Any]]:
        return {key: {"container": {"id": spec.meta["container_id"],
                                    "name": spec.meta["container_name"]}}
                for key, spec in self.known.items()}
