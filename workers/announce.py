"""Announce a running worker on the LAN by mDNS (zeroconf), so gateways find it."""

from __future__ import annotations

import logging
import re
import socket

import ifaddr
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from stream.announcement import SERVICE_TYPE, WYOMING_SERVICE_TYPE, properties

from .server import WorkerServer

log = logging.getLogger("edgestream.worker")


def announce_addresses(host: str) -> list[str]:
    """The addresses to publish: ``host`` itself, or every non-loopback IPv4 address when bound to all."""
    if host not in ("0.0.0.0", "", "::"):
        return [host]
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                found.append(ip.ip)
    return found


class Announcer:
    """Publishes one worker while it runs: its WebSocket for gateways, and its Wyoming service if it has one."""

    def __init__(self, server: WorkerServer, host: str, port: int, tls: bool = False, wyoming_port: int | None = None) -> None:
        self.server = server
        self.addresses = announce_addresses(host)
        self.port = port
        name = re.sub(r"[^A-Za-z0-9-]+", "-", server.worker_id)[:60]
        hello = server.hello()
        self.info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{name}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(a) for a in self.addresses],
            port=port,
            properties=properties(hello.kind, hello.model_id, hello.model_sha256, hello.capacity, tls),
            server=f"{name}.local.",
        )
        self.infos = [self.info]
        if wyoming_port is not None:
            self.infos.append(
                AsyncServiceInfo(
                    WYOMING_SERVICE_TYPE,
                    f"{name}.{WYOMING_SERVICE_TYPE}",
                    addresses=[socket.inet_aton(a) for a in self.addresses],
                    port=wyoming_port,
                    properties={"edgestream": server.worker_id},
                    server=f"{name}.local.",
                )
            )
        self._zeroconf: AsyncZeroconf | None = None

    async def start(self) -> None:
        # Only the announced addresses' interfaces: nothing goes out elsewhere.
        self._zeroconf = AsyncZeroconf(interfaces=self.addresses, ip_version=IPVersion.V4Only)
        # The first await queues the registration, the second waits for its probes and announcements.
        for info in self.infos:
            await (await self._zeroconf.async_register_service(info))
            log.info("announced %s on %s", info.name, ", ".join(f"{a}:{info.port}" for a in self.addresses))

    async def close(self) -> None:
        if self._zeroconf is not None:
            # Wait for the goodbye packets to go out before the sockets close.
            for info in self.infos:
                await (await self._zeroconf.async_unregister_service(info))
            await self._zeroconf.async_close()
