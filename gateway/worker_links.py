"""The gateway's links to workers: one WebSocket per worker, reconnected when lost.

Picking stays simple here (the first connected worker of a kind); the
latency-aware choice belongs to the worker pool (see README, Roadmap).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from stream.protocol import WorkerKind
from stream.worker_client import WorkerClient

log = logging.getLogger("edgestream.gateway")


class NoWorker(Exception):
    """No connected worker of a kind."""

    def __init__(self, kind: WorkerKind) -> None:
        super().__init__(f"no {kind.value} worker is available")
        self.kind = kind


class WorkerLink:
    """Keeps one connection to one worker URL alive."""

    def __init__(self, url: str, kind: WorkerKind, retry_s: float = 1.0) -> None:
        self.url = url
        self.kind = kind
        self.retry_s = retry_s
        self.client: WorkerClient | None = None
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"link {self.url}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.client is not None:
            await self.client.close()

    async def _run(self) -> None:
        while True:
            try:
                self.client = await WorkerClient.connect(self.url, self.kind, open_timeout=5)
            except (OSError, TimeoutError, Exception) as exc:  # refused, unreachable, wrong kind
                log.debug("%s worker %s not reachable: %s", self.kind.value, self.url, exc)
                await asyncio.sleep(self.retry_s)
                continue
            log.info("connected to %s worker %s (%s)", self.kind.value, self.url, self.client.hello.model_id)
            self.connected.set()
            await self.client._reader  # returns when the connection is lost
            self.connected.clear()
            log.warning("lost %s worker %s; reconnecting", self.kind.value, self.url)
            await asyncio.sleep(self.retry_s)


class WorkerLinks:
    """All configured workers, by kind."""

    def __init__(self, urls: dict[WorkerKind, list[str]]) -> None:
        self.links = {kind: [WorkerLink(url, kind) for url in kind_urls] for kind, kind_urls in urls.items()}

    def start(self) -> None:
        for links in self.links.values():
            for link in links:
                link.start()

    async def close(self) -> None:
        for links in self.links.values():
            for link in links:
                await link.close()

    def available(self, kind: WorkerKind) -> bool:
        return any(link.connected.is_set() for link in self.links.get(kind, []))

    def pick(self, kind: WorkerKind) -> WorkerClient:
        for link in self.links.get(kind, []):
            if link.connected.is_set() and link.client is not None and not link.client.closed:
                return link.client
        raise NoWorker(kind)

    async def wait_ready(self, kinds: list[WorkerKind], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            for kind in kinds:
                while not self.available(kind):
                    await asyncio.sleep(0.05)
