"""Workers found on the LAN by mDNS (zeroconf): announced ones join the pool, and leave it.

An announcement is checked (``stream/announcement.py``) before the pool sees
it: an unknown kind, a malformed hash, another protocol version or an
unusable address is logged once and kept out. A worker whose hello does not
match its announcement is kept out by the pool's link, which also backs off
from an address that does not answer; a worker that flaps (announced,
withdrawn, announced...) keeps its backoff across reappearances.
"""

from __future__ import annotations

import asyncio
import logging

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from stream.announcement import SERVICE_TYPE, BadAnnouncement, parse

from .worker_pool import WorkerPool

log = logging.getLogger("edgestream.gateway")

RESOLVE_TIMEOUT_MS = 3000


class Discovery:
    def __init__(self, pool: WorkerPool, interfaces: list[str] | None = None) -> None:
        self.pool = pool
        self.interfaces = interfaces
        self.urls: dict[str, str] = {}
        """Service name -> worker URL, for the ones in the pool."""
        self.rejected: dict[str, str] = {}
        """Service name -> why it was kept out."""
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._zeroconf = AsyncZeroconf(interfaces=self.interfaces or "all", ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(self._zeroconf.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        log.info("discovering workers by mDNS (%s) on %s", SERVICE_TYPE, ", ".join(self.interfaces or ["all interfaces"]))

    async def close(self) -> None:
        if self._browser is not None:
            await self._browser.async_cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._zeroconf is not None:
            await self._zeroconf.async_close()

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        coroutine = self._removed(name) if state_change is ServiceStateChange.Removed else self._added(name)
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _added(self, name: str) -> None:
        assert self._zeroconf is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zeroconf.zeroconf, RESOLVE_TIMEOUT_MS):
            log.warning("mDNS: %s announced but could not be resolved", name)
            return
        try:
            found = parse(name, info.properties, info.parsed_addresses(), info.port)
        except BadAnnouncement as exc:
            if self.rejected.get(name) != str(exc):
                log.warning("mDNS: %s kept out: %s", name, exc)
            self.rejected[name] = str(exc)
            return
        self.rejected.pop(name, None)
        previous = self.urls.get(name)
        if previous == found.url:
            return
        if previous is not None:
            await self.pool.remove(previous)
        self.urls[name] = found.url
        log.info("mDNS: %s worker %s at %s (%s)", found.kind.value, name, found.url, found.model_id)
        self.pool.add(found.url, found.kind, source="mdns", expect_model=(found.model_id, found.model_sha256))

    async def _removed(self, name: str) -> None:
        url = self.urls.pop(name, None)
        if url is not None:
            await self.pool.remove(url)
