"""Several hosts on this machine: Linux network namespaces on one bridge (test helper, needs root).

Every name carries a per-run suffix and everything is removed in :meth:`Lan.close`,
so a crashed run cannot break the next. Addresses come from 198.18.0.0/15, the
range set aside for network benchmarks. mDNS crosses the bridge; netem is not needed (delay is made by gateway/harness/delay_relay.py).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parent.parent


def available() -> str | None:
    """Why namespaces cannot be made here, or ``None`` if they can."""
    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CI runs as root)"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    return None


def ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    subprocess.run(command, check=True, capture_output=True, text=True)


@dataclass
class Host:
    name: str
    """Namespace name."""
    address: str
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    logs: list[BinaryIO] = field(default_factory=list)

    async def spawn(self, *argv: str, log: Path | None = None) -> asyncio.subprocess.Process:
        """Run a command "on" this host; stdout is piped, stderr goes to ``log``."""
        stderr: BinaryIO | int = asyncio.subprocess.DEVNULL
        if log is not None:
            stderr = open(log, "ab")
            self.logs.append(stderr)
        process = await asyncio.create_subprocess_exec("ip", "netns", "exec", self.name, *argv, stdout=asyncio.subprocess.PIPE, stderr=stderr, cwd=REPO)
        self.processes.append(process)
        return process


class Lan:
    """A bridge and hosts on it; the test's own process gets ``.1`` on the bridge to reach them."""

    def __init__(self) -> None:
        self.suffix = f"{random.getrandbits(20):05x}"
        self.subnet = f"198.18.{random.randrange(1, 255)}"
        self.bridge = f"esb{self.suffix}"
        self.hosts: dict[str, Host] = {}
        self._veths: list[str] = []

    def up(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add_host(self, role: str) -> Host:
        number = len(self.hosts) + 2
        name = f"es{self.suffix}-{role}"
        veth = f"esv{self.suffix}{number}"
        address = f"{self.subnet}.{number}"
        ip("netns", "add", name)
        self.hosts[role] = host = Host(name, address)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
        self._veths.append(veth)
        ip("link", "set", veth, "master", self.bridge, "up")
        ip("addr", "add", f"{address}/24", "dev", "eth0", netns=name)
        ip("link", "set", "lo", "up", netns=name)
        ip("link", "set", "eth0", "up", netns=name)
        # mDNS goes out of eth0 (a namespace has no default route of its own).
        ip("route", "add", "224.0.0.0/4", "dev", "eth0", netns=name)
        return host

    async def close(self) -> None:
        for host in self.hosts.values():
            for process in host.processes:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        for host in self.hosts.values():
            for file in host.logs:
                file.close()
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True, check=False)  # noqa: ASYNC221 (teardown)
        for veth in self._veths:
            subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)  # noqa: ASYNC221
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)  # noqa: ASYNC221
