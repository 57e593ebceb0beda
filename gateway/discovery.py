"""Workers found on the LAN by mDNS (zeroconf): announced ones join the pool, and leave it.

Two kinds of announcement: edgestream workers (``_edgestream._tcp``, with TXT
saying what they serve) and Home Assistant's Wyoming servers (``_wyoming._tcp``,
asked what they serve with ``describe``).

An announcement is checked (``stream/announcement.py``) before the pool sees
it: an unknown kind, a malformed hash, another protocol version or an
unusable address is logged once and kept out. A worker whose hello does not
match its announcement is kept out by the pool's link, which also backs off
from an address that does not answer; a worker that flaps (announced,
withdrawn, announced...) keeps its backoff across reappearances. A Wyoming
server is asked its ``info`` again with backoff until it answers
(:data:`WYOMING_PROBE`): wyoming-faster-whisper announces itself before it
listens, while its model still loads.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from stream.announcement import SERVICE_TYPE, WYOMING_SERVICE_TYPE, BadAnnouncement, parse
from stream.backoff import Backoff
from stream.wyoming_client import WyomingClient

from .worker_pool import WorkerPool

log = logging.getLogger("edgestream.gateway")

RESOLVE_TIMEOUT_MS = 3000
WYOMING_PROBE = Backoff(initial_s=0.5, max_s=5.0, max_attempts=14)
"""How a Wyoming server that does not answer yet is asked again: for about a minute, then it is kept out."""


class Discovery:
    def __init__(self, pool: WorkerPool, interfaces: list[str] | None = None) -> None:
        self.pool = pool
        self.interfaces = interfaces
        self.urls: dict[str, str] = {}
        """Service name -> worker URL, for the ones in the pool."""
        self.rejected: dict[str, str] = {}
        """Service name -> why it was kept out."""
        self._zeroconf: AsyncZeroconf | None = None
        self._browsers: list[AsyncServiceBrowser] = []
        self._tasks: set[asyncio.Task] = set()
        self._probes: dict[str, asyncio.Task] = {}
        """Service name -> the task asking that Wyoming server what it is, while it does not answer."""

    async def start(self) -> None:
        self._zeroconf = AsyncZeroconf(interfaces=self.interfaces or "all", ip_version=IPVersion.V4Only)
        for service_type in (SERVICE_TYPE, WYOMING_SERVICE_TYPE):
            self._browsers.append(AsyncServiceBrowser(self._zeroconf.zeroconf, service_type, handlers=[self._on_change]))
        where = ", ".join(self.interfaces or ["all interfaces"])
        log.info("discovering workers by mDNS (%s, %s) on %s", SERVICE_TYPE, WYOMING_SERVICE_TYPE, where)

    async def close(self) -> None:
        for browser in self._browsers:
            await browser.async_cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._zeroconf is not None:
            await self._zeroconf.async_close()

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if (probe := self._probes.pop(name, None)) is not None:
            probe.cancel()  # withdrawn, or announced anew: the newest record is the one to ask
        if state_change is ServiceStateChange.Removed:
            coroutine = self._removed(name)
        elif service_type == WYOMING_SERVICE_TYPE:
            coroutine = self._added_wyoming(name)
        else:
            coroutine = self._added(name)
        task = asyncio.get_running_loop().create_task(coroutine)
        if service_type == WYOMING_SERVICE_TYPE and state_change is not ServiceStateChange.Removed:
            self._probes[name] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> AsyncServiceInfo | None:
        assert self._zeroconf is not None
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zeroconf.zeroconf, RESOLVE_TIMEOUT_MS):
            log.warning("mDNS: %s announced but could not be resolved", name)
            return None
        return info

    async def _added(self, name: str) -> None:
        if (info := await self._resolve(SERVICE_TYPE, name)) is None:
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

    async def _added_wyoming(self, name: str) -> None:
        """A Wyoming server: its ``info`` says whether it is STT or TTS (it announces nothing else)."""
        if (info := await self._resolve(WYOMING_SERVICE_TYPE, name)) is None:
            return
        if b"edgestream" in (info.properties or {}):
            return  # an edgestream worker's Wyoming listener: the worker itself is announced as _edgestream._tcp
        addresses = [a for a in info.parsed_addresses() if a != "0.0.0.0"]
        if not addresses or not info.port:
            # wyoming-faster-whisper --uri tcp://0.0.0.0:PORT --zeroconf announces 0.0.0.0.
            log.warning("mDNS: %s kept out: it announces no usable address (start it with --uri tcp://ITS-ADDRESS:PORT)", name)
            return
        url = f"tcp://{addresses[0]}:{info.port}"
        if self.pool.key is not None:
            # Wyoming cannot prove the worker key: a gateway that asks its workers for one takes only
            # the Wyoming servers its config names, not any host of the LAN that announces one.
            if self.rejected.get(name) != "key":
                log.warning("mDNS: Wyoming server %s at %s kept out: this gateway authenticates its workers; name it in [gateway.workers] to use it", name, url)
            self.rejected[name] = "key"
            return
        for attempt in itertools.count(1):
            try:
                probe = await WyomingClient.connect(url, None, RESOLVE_TIMEOUT_MS / 1000)
                kind, model_id = probe.kind, probe.hello.model_id
                await probe.close()
                break
            except Exception as exc:  # unreachable, or an info this cannot read: a stranger's bad record must not break discovery
                if attempt >= (WYOMING_PROBE.max_attempts or 1):
                    log.warning("mDNS: Wyoming server %s at %s kept out after %d tries: %s", name, url, attempt, exc)
                    return
                if attempt == 1:
                    log.info("mDNS: Wyoming server %s at %s does not answer yet (%s); asking again", name, url, exc)
                await asyncio.sleep(WYOMING_PROBE.delay(attempt))
        if self._probes.get(name) is asyncio.current_task():
            del self._probes[name]
        previous = self.urls.get(name)
        if previous == url:
            return
        if previous is not None:
            await self.pool.remove(previous)
        self.urls[name] = url
        log.info("mDNS: Wyoming %s server %s at %s (%s)", kind.value, name, url, model_id)
        self.pool.add(url, kind, source="mdns")

    async def _removed(self, name: str) -> None:
        url = self.urls.pop(name, None)
        if url is not None:
            await self.pool.remove(url)
