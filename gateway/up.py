"""``edgestream up``: the whole system on one box, kept running.

The gateway and each worker run in their own process (``edgestream gateway``,
``edgestream worker KIND``), so models compute in parallel and one crash does
not take the others down: a process that exits is started again with
backoff (``gateway/restarts.py``), and while a worker is away the gateway's
failover and its ``no_worker`` errors cover the gap. Every port is checked
before anything starts (a clash is told at once, not after the models
loaded); one ``ready:`` line says when the page can be opened. Each
process's output is prefixed with its name; Ctrl-C (or SIGTERM) stops them
all, and if ``up`` itself is killed they get SIGTERM from the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import time
from pathlib import Path

from stream.config import Config, connect_address
from stream.http import get
from stream.ports import PortInUse, check_can_listen
from stream.protocol import WorkerKind
from stream.running import until_signalled

from .children import Child, stop_all, supervise

READY_POLL_S = 0.25


def say(line: str) -> None:
    print(f"edgestream up: {line}", flush=True)


def children(config: Config, config_path: Path | None) -> list[Child]:
    base = [sys.executable, "-m", "gateway"]
    config_args = ["--config", str(config_path)] if config_path is not None else []
    gateway = config.gateway
    out = [Child("gateway", [*base, "gateway", *config_args, "--host", gateway.host, "--port", str(gateway.port)], say=say)]
    out += [Child(kind.value, [*base, "worker", kind.value, *config_args], label=f"{kind.value} worker", say=say) for kind in WorkerKind]
    return out


def check_ports(config: Config) -> None:
    """Raise :class:`PortInUse` for the first port of the system that is taken."""
    check_can_listen(config.gateway.host, config.gateway.port, "the gateway")
    for kind in WorkerKind:
        settings = config.workers.for_kind(kind)
        check_can_listen(settings.host, settings.port, f"the {kind.value} worker")


def _loopback_probe_context() -> ssl.SSLContext:
    """TLS for asking our own child on loopback whether it is ready: its certificate names the
    LAN's host names, not 127.0.0.1, and who answers on our own loopback port is not in doubt."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def _announce_ready(config: Config) -> None:
    """Print one ``ready:`` line once the gateway has a worker of every kind it needs."""
    gateway = config.gateway
    scheme = "https" if config.security.tls_cert else "http"
    url = f"{scheme}://{connect_address(gateway.host)}:{gateway.port}"
    started = time.monotonic()
    while True:
        with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
            status, _ = await get(f"{url}/readyz", timeout=2.0, ssl_context=_loopback_probe_context() if scheme == "https" else None)
            if status == 200:
                say(f"ready in {time.monotonic() - started:.0f} s: open {url}/ in a browser (Ctrl-C stops everything)")
                return
        await asyncio.sleep(READY_POLL_S)


async def run_system(config: Config, config_path: Path | None) -> int:
    """Run and supervise the whole system until a signal; the exit status of ``edgestream up``."""
    try:
        check_ports(config)
    except PortInUse as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    kids = children(config, config_path)
    for child in kids:
        await child.start()
        assert child.process is not None
        say(f"started the {child.label} (pid {child.process.pid})")
    ready = asyncio.create_task(_announce_ready(config))
    stopper = asyncio.create_task(until_signalled())
    code = 0
    try:
        code = await supervise(kids, stopper, essential=lambda child: child.name == "gateway")
    finally:
        ready.cancel()
        stopper.cancel()
        await stop_all(kids)
    return code
