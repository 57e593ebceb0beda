"""A gateway of several processes on one port: its sessions spread over the cores.

One gateway process holds every session under one GIL, so ``edgestream
gateway`` with ``[gateway] processes`` above 1 (by default one per core)
runs that many gateway processes instead, under a supervisor (this module):

- **One port.** Each process listens on the gateway's address and port with
  ``SO_REUSEPORT``; the kernel spreads new connections over them (a hash of
  the client's address and port). A session lives in the process that
  accepted its signaling connection: its WebRTC, its conversation, its jobs.
  The supervisor holds the port bound (not listening) for as long as it runs,
  so that no other program takes it while a process restarts.
- **Global limits.** The supervisor keeps the gateway's
  :class:`~gateway.ledger.SessionLedger`: every process asks it to admit each
  session (``max_sessions``, ``max_sessions_per_client`` count the whole
  gateway) over a Unix socket link (``gateway/process_link.py``) in a
  directory only this user can open. Token revocation holds because every
  process follows the token file itself. Rate and pending-connection limits
  (``offers_per_minute``, ``max_pending_signaling...``), checked where a
  connection lands before any session exists, are shared out: each process
  holds its part of them (``GatewaySettings.share_of``).
- **One health, one metrics.** ``/healthz``, ``/readyz`` and ``/metrics``,
  asked of any process, gather every process's report through the supervisor
  and merge them (``gateway/aggregate.py``).
- **Crashes stay small.** A process that dies loses only its own sessions
  (their clients reconnect; the SDKs do it on their own): its link closes, the
  ledger lets go of its places, and it is started again with backoff
  (``gateway/restarts.py``, ``gateway/children.py``). SIGTERM to the
  supervisor drains every process (``shutting_down`` to each session).

Each process keeps its own worker links; the workers' load reports count the
other processes' jobs as other clients' jobs, which is what they are to the
selection. ``python -m gateway.processes`` is one gateway process (the
supervisor starts it; its settings come in ``EDGESTREAM_GATEWAY_PROCESS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stream import keys, logs, tls
from stream.config import Config, GatewaySettings, check_gateway_exposure
from stream.ports import check_can_listen
from stream.running import run, until_signalled

from .children import Child, stop_all, supervise
from .launch import print_listening
from .ledger import SessionLedger
from .process_link import MAX_LINE_BYTES, FleetMember, LinkClosed, Message, ProcessLink
from .tokens import TokenChecker

log = logging.getLogger("edgestream.gateway")

PROCESS_ENV = "EDGESTREAM_GATEWAY_PROCESS"
REPORT_TIMEOUT_S = 1.5
"""How long the supervisor waits for one process's report; a process that does not answer is left out."""
LISTENING_TIMEOUT_S = 120.0
"""How long the processes may take to start listening."""


def say(line: str) -> None:
    print(f"edgestream gateway: {line}", flush=True)


@dataclass
class _Member:
    link: ProcessLink
    owner: int
    """This link's place-holder in the ledger: a new one per process started (a restarted process is a new owner)."""
    pid: int = 0


class Supervisor:
    """The ledger and the links of every gateway process."""

    def __init__(self, settings: GatewaySettings, count: int) -> None:
        self.count = count
        self.ledger = SessionLedger(settings.max_sessions, settings.max_sessions_per_client)
        self.members: dict[int, _Member] = {}
        self.listening: dict[int, asyncio.Event] = {index: asyncio.Event() for index in range(count)}
        self._owners = itertools.count(1)

    async def serve_link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        owner = next(self._owners)
        index: int | None = None

        async def answer(message: Message) -> Message | None:
            nonlocal index
            op = message.get("op")
            if op == "hello":  # each handler runs to its end without waiting: messages are handled in order
                index = int(message["index"])
                self.members[index] = _Member(link, owner, int(message.get("pid", 0)))
                return None
            if op == "listening" and index is not None:
                self.listening[index].set()
                return None
            if op == "claim":
                refusal = self.ledger.claim(owner, str(message["session"]), str(message["client"]))
                return {} if refusal is None else {"code": refusal.code, "message": refusal.message}
            if op == "release":
                self.ledger.release(str(message["session"]))
                return None
            if op == "gather":
                return {"reports": await self.gather(str(message.get("what"))), "expected": self.count}
            return {"code": "unknown_op", "message": f"unknown op {op!r}"}

        link = ProcessLink(reader, writer, answer)
        try:
            await link.run()
        finally:
            dropped = self.ledger.drop(owner)
            if index is not None:
                if self.members.get(index) is not None and self.members[index].owner == owner:
                    del self.members[index]
                self.listening[index].clear()
                log.info("gateway process %d left; its %d sessions ended with it", index, len(dropped))
            await link.close()

    async def gather(self, what: str) -> list[Message]:
        """Every live process's report of ``what``, by process index."""

        async def one(member: _Member) -> Message | None:
            try:
                return await member.link.request({"op": "report", "what": what}, REPORT_TIMEOUT_S)
            except (TimeoutError, LinkClosed):
                return None

        members = [self.members[index] for index in sorted(self.members)]
        reports = await asyncio.gather(*(one(member) for member in members))
        return [report for report in reports if report is not None]


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to ``host:port`` with ``SO_REUSEPORT``: the port (chosen here
    when 0) stays this gateway's while its processes come and go. Raises :class:`OSError` if taken,
    also by a listener that would share it (``SO_REUSEPORT``: another gateway of this user)."""
    check_can_listen(host, port, "the gateway")
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    reservation = socket.socket(family, kind, proto)
    try:
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reservation.bind(address)
    except BaseException:
        reservation.close()
        raise
    return reservation


def check_security(config: Config) -> None:
    """What a gateway process would refuse at start, refused once here (a bad file, an exposure)."""
    security = config.security
    check_gateway_exposure(config.gateway.host, bool(security.client_tokens_file))
    if security.client_tokens_file:
        TokenChecker(security.client_tokens_file)
    if security.worker_key_file:
        keys.load_key(security.worker_key_file)
    if security.tls_cert:
        tls.server_context(security.tls_cert, security.tls_key)


async def run_processes(config: Config, count: int) -> int:
    """Run a gateway of ``count`` processes until a signal; the exit status of ``edgestream gateway``."""
    settings = config.gateway
    check_security(config)
    reservation = reserve_port(settings.host, settings.port)
    port = reservation.getsockname()[1]
    supervisor = Supervisor(settings, count)
    with tempfile.TemporaryDirectory(prefix="edgestream-gateway-") as directory:  # mode 700: only this user joins
        path = str(Path(directory) / "supervisor.sock")
        server = await asyncio.start_unix_server(supervisor.serve_link, path, limit=MAX_LINE_BYTES)
        spec = {"config": config.model_dump(mode="json"), "processes": count, "link": path, "port": port}
        kids = [
            Child(
                f"gw{index}",
                [sys.executable, "-m", "gateway.processes"],
                label=f"gateway process {index}",
                env={**os.environ, PROCESS_ENV: json.dumps({**spec, "index": index})},
                say=say,
            )
            for index in range(count)
        ]
        stopper = asyncio.create_task(until_signalled())
        code = 0
        try:
            for child in kids:
                await child.start()
            if not await _all_listening(supervisor, kids, stopper):
                code = next((c.process.returncode for c in kids if c.process and c.process.returncode), 1) or 1
                return code
            pids = ", ".join(str(child.process.pid) for child in kids if child.process is not None)
            print_listening(config, port, f"{len(kids)} processes on one port (pids {pids}); sessions are spread over them")
            code = await supervise(kids, stopper, essential=lambda child: True)
        finally:
            stopper.cancel()
            say("stopping")
            await stop_all(kids)
            server.close()
            reservation.close()
    return code


async def _all_listening(supervisor: Supervisor, kids: list[Child], stopper: asyncio.Task[None]) -> bool:
    """Wait for every process to listen; ``False`` if one exits first or a signal comes."""
    listening = asyncio.ensure_future(asyncio.gather(*(event.wait() for event in supervisor.listening.values())))
    exits = [asyncio.ensure_future(child.process.wait()) for child in kids if child.process is not None]
    try:
        done, _ = await asyncio.wait([listening, stopper, *exits], timeout=LISTENING_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (listening, *exits):
            task.cancel()
    if listening in done:
        return True
    if not done:
        say(f"the gateway processes did not all listen within {LISTENING_TIMEOUT_S:g} s")
    return False


# -- one gateway process ---------------------------------------------------------------


async def serve_process(config: Config, index: int, processes: int, link_path: str, port: int) -> int:
    """Process ``index`` of ``processes`` in the gateway: listen beside the others, until SIGTERM or the supervisor is gone."""
    from .server import Gateway

    fleet = FleetMember(link_path, index)
    gateway = Gateway(config.gateway.share_of(processes), config.worker_urls(), config.security, fleet=fleet)
    await fleet.connect(gateway.report)
    await gateway.start(port=port, reuse_port=True)
    assert fleet.link is not None
    fleet.link.tell({"op": "listening"})
    signalled = asyncio.create_task(until_signalled())
    orphaned = asyncio.create_task(fleet.closed.wait())
    try:
        await asyncio.wait([signalled, orphaned], return_when=asyncio.FIRST_COMPLETED)
    finally:
        signalled.cancel()
        orphaned.cancel()
    if orphaned.done() and not signalled.done():
        log.error("the gateway's supervisor is gone; this process stops")
    await gateway.close()
    await fleet.close()
    return 0 if signalled.done() else 1


def main() -> int:
    spec = json.loads(os.environ[PROCESS_ENV])
    config = Config.model_validate(spec["config"])
    logs.configure(config.log.format, config.log.level)
    with contextlib.suppress(KeyboardInterrupt):
        return run(serve_process(config, int(spec["index"]), int(spec["processes"]), spec["link"], int(spec["port"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
