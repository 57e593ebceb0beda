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
import ctypes
import signal
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from stream.config import Config, connect_address
from stream.http import get
from stream.ports import PortInUse, check_can_listen
from stream.protocol import WorkerKind
from stream.running import until_signalled

from .restarts import Restarts

STOP_S = 15.0
"""How long a process may take to stop after SIGTERM before it is killed."""
READY_POLL_S = 0.25
PR_SET_PDEATHSIG = 1
RELAY_DRAIN_S = 2.0
"""How long the last lines of a process that exited are waited for."""
RESTART_RETRY_S = 10.0


def say(line: str) -> None:
    print(f"edgestream up: {line}", flush=True)


@dataclass(eq=False)
class Child:
    """One supervised process: its command, the running process, and its exits."""

    name: str
    args: list[str]
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: Restarts = field(default_factory=Restarts)
    relay: asyncio.Task[None] | None = None

    @property
    def label(self) -> str:
        return self.name if self.name == "gateway" else f"{self.name} worker"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent
        )
        self.started_at = time.monotonic()
        assert self.process.stdout is not None
        self.relay = asyncio.create_task(_relay(self.name, self.process.stdout))

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_S)
        except TimeoutError:
            say(f"the {self.label} did not stop within {STOP_S:g} s; killing it")
            process.kill()
            await process.wait()


def _die_with_parent() -> None:
    """In the child, before it runs: get SIGTERM when ``up`` dies, even by SIGKILL (Linux), so that
    no model process is left holding its port and memory. Elsewhere: nothing (a clean stop still stops them)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def _relay(name: str, stream: asyncio.StreamReader) -> None:
    while line := await stream.readline():
        sys.stdout.write(f"[{name:>7}] {line.decode(errors='replace')}")
        sys.stdout.flush()


def children(config: Config, config_path: Path | None) -> list[Child]:
    base = [sys.executable, "-m", "gateway"]
    config_args = ["--config", str(config_path)] if config_path is not None else []
    gateway = config.gateway
    out = [Child("gateway", [*base, "gateway", *config_args, "--host", gateway.host, "--port", str(gateway.port)])]
    out += [Child(kind.value, [*base, "worker", kind.value, *config_args]) for kind in WorkerKind]
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
        code = await _supervise(kids, stopper)
    finally:
        ready.cancel()
        stopper.cancel()
        await asyncio.gather(*(child.stop() for child in kids), return_exceptions=True)
        await asyncio.gather(*(child.relay for child in kids if child.relay is not None), return_exceptions=True)
    return code


async def _supervise(kids: list[Child], stopper: asyncio.Task[None]) -> int:
    """Restart what exits, until a signal (0) or the gateway cannot be kept running (1)."""
    exits: dict[asyncio.Task[int], Child] = {}
    restarts: dict[asyncio.Task[None], Child] = {}

    def watch(child: Child) -> None:
        assert child.process is not None
        exits[asyncio.create_task(child.process.wait())] = child

    for child in kids:
        watch(child)
    while True:
        done, _ = await asyncio.wait([stopper, *exits, *restarts], return_when=asyncio.FIRST_COMPLETED)
        if stopper in done:
            for task in [*exits, *restarts]:
                task.cancel()
            return 0
        for task in done:
            if task in restarts:
                child = restarts.pop(task)
                try:
                    await child.start()
                except OSError as exc:  # no memory, no such executable any more: try again later
                    say(f"the {child.label} could not be started again: {exc}; trying again in {RESTART_RETRY_S:g} s")
                    restarts[asyncio.create_task(asyncio.sleep(RESTART_RETRY_S))] = child
                    continue
                assert child.process is not None
                say(f"the {child.label} started again (pid {child.process.pid}, restart {child.restarts.restarts})")
                watch(child)
                continue
            child = exits.pop(task)
            status = task.result()
            if child.relay is not None:
                # Its last lines first; but a grandchild that kept its stdout open must not stall the supervisor.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(child.relay), RELAY_DRAIN_S)
            delay = child.restarts.after_exit(status, time.monotonic() - child.started_at)
            if delay is None:
                say(f"the {child.label} exited with {status}; not restarting it: {child.restarts.why_not(status)}")
                if child.name == "gateway":
                    return 1
                continue
            say(f"the {child.label} exited with {status}; starting it again in {delay:.1f} s")
            restarts[asyncio.create_task(asyncio.sleep(delay))] = child
