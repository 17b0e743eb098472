"""Backends given by URL (`--backend`): published once, never started or stopped by us."""

from __future__ import annotations

import asyncio
from typing import Any, Mapping, Sequence

from . import BackendSpec, PoolSink


class StaticProvider:
    source = "static"

    def __init__(self, urls: Sequence[str]) -> None:
        self.specs = [BackendSpec(f"static-{i}", url, self.source) for i, url in enumerate(urls, 1)]

    async def run(self, sink: PoolSink) -> None:
        sink.publish(self.source, self.specs)
        await asyncio.Event().wait()  # nothing changes until shutdown

    async def close(self) -> None:
        pass

    def stats(self) -> Mapping[str, Mapping[str, Any]]:
        return {}
