"""A gateway of several processes on one port: its sessions spread over the cores.

One gateway process holds every session under one GIL, so ``edgestream
gateway`` with ``[gateway] processes`` above 1 (by default one per core)
runs that many gateway processes instead, under a supervisor (this module):

- **One port, even spread.** The supervisor listens on the gateway's address
  and port and hands each accepted connection, the socket itself, to the
  process holding the fewest sessions (``gateway/spread.py`` decides,
  ``gateway/handoff.py`` passes it over a Unix socket). A session lives in the
  process that took its signaling connection: its WebRTC, its conversation,
  its jobs; nothing is proxied. (Before, each process listened with
  ``SO_REUSEPORT`` and the kernel's hash of the client's address and port
  chose: 40 connections split up to 16/24.)
  The port stays the supervisor's while processes come and go: a connection
  that arrives while one restarts goes to the others.
- **Global limits.** The supervisor keeps the gateway's
  :class:`~gateway.ledger.SessionLedger`: every process asks it to admit each
  session (``max_sessions``, ``max_sessions_per_client`` count the whole
  gateway) over a Unix socket link (``gateway/process_link.py``) in a
  directory only this user can open. Token revocation holds because every
  process follows the token file itself. Rate and pending-connection limits
  (``offers_per_minute``, ``max_pending_signaling...``), checked in the
  process a connection is handed to before any session exists, are shared out: each process
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
import time
from dataclasses import dataclass
from pathlib import Path

from stream import keys, logs, tls
from stream.config import Config, GatewaySettings, check_gateway_exposure
from stream.ports import check_can_listen
from stream.running import run, until_signalled

from .children import Child, stop_all, supervise
from .handoff import AcceptErrors, Inlet, Outlet, accept_outlets
from .launch import print_listening
from .ledger import SessionLedger
from .limits import TokenBucket
from .process_link import MAX_LINE_BYTES, FleetMember, LinkClosed, Message, ProcessLink
from .spread import Spread
from .tokens import TokenChecker

log = logging.getLogger("edgestream.gateway")

PROCESS_ENV = "EDGESTREAM_GATEWAY_PROCESS"
REPORT_TIMEOUT_S = 1.5
"""How long the supervisor waits for one process's report; a process that does not answer is left out."""
LISTENING_TIMEOUT_S = 120.0
"""How long the processes may take to start listening."""
HAND_WAIT_S = 2.0
"""How long a connection that no process can take now is held before it is closed (the SDKs try again)."""
HAND_RETRY_S = 0.02


def say(line: str) -> None:
    print(f"edgestream gateway: {line}", flush=True)


@dataclass
class _Member:
    link: ProcessLink
    owner: int
    """This link's place-holder in the ledger: a new one per process started (a restarted process is a new owner)."""
    pid: int = 0


class Supervisor:
    """The ledger, the links and the hand-off sockets of every gateway process."""

    def __init__(self, settings: GatewaySettings, count: int) -> None:
        self.count = count
        self.ledger = SessionLedger(settings.max_sessions, settings.max_sessions_per_client)
        self.members: dict[int, _Member] = {}
        self.listening: dict[int, asyncio.Event] = {index: asyncio.Event() for index in range(count)}
        self.outlets: dict[int, Outlet] = {}
        self.spread = Spread()
        self.can_hand = asyncio.Event()
        """Set while some process has its hand-off socket open; the port is not accepted on otherwise (connections wait in its backlog)."""
        self._owners = itertools.count(1)
        self._drops_logged = TokenBucket(1.0, 10.0)

    # -- connections ------------------------------------------------------------------

    async def hand_out(self, listener: socket.socket) -> None:
        """Accept on one of the gateway's listening sockets and hand each connection to a process, until cancelled.

        A connection no process can take now (every one is stuck, or none is
        up) is held for up to ``HAND_WAIT_S``, tried again every
        ``HAND_RETRY_S``, then closed; meanwhile later ones wait in the
        kernel's backlog.
        """
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        errors = AcceptErrors("a connection on the gateway's port")
        while True:
            await self.can_hand.wait()
            try:
                connection, _ = await loop.sock_accept(listener)
            except OSError as exc:  # out of descriptors, of memory: the box's trouble, not this loop's end
                await errors.failed(exc)
                continue
            with connection:  # the supervisor's copy: closed once handed (or given up on)
                deadline = loop.time() + HAND_WAIT_S
                while self.hand(connection, time.monotonic()) is None:
                    if loop.time() >= deadline:
                        if self._drops_logged.allow():
                            log.warning("no gateway process could take a connection from %s within %g s; closed", _peer(connection), HAND_WAIT_S)
                        break
                    await asyncio.sleep(HAND_RETRY_S)

    def hand(self, connection: socket.socket, now: float) -> int | None:
        """Give ``connection`` to the process :class:`Spread` picks (the next one if that one cannot take it
        now); which one, or ``None`` if none could."""
        tried: set[int] = set()
        while True:
            held = {index: self.sessions_of(index) for index in self.outlets if index not in tried}
            index = self.spread.choose(held, now)
            if index is None:
                return None
            if self.outlets[index].give(connection):
                self.spread.handed(index, now)
                return index
            tried.add(index)

    def sessions_of(self, index: int) -> int:
        member = self.members.get(index)
        return 0 if member is None else self.ledger.held_by(member.owner)

    def outlet_opened(self, outlet: Outlet) -> None:
        if outlet.index not in self.listening:  # not one of this gateway's processes
            log.warning("a hand-off connection said it is process %d of %d; closed", outlet.index, self.count)
            outlet.close()
            return
        old = self.outlets.get(outlet.index)
        if old is not None:  # the process it belonged to is gone; this is the one started in its place
            old.close()
        self.outlets[outlet.index] = outlet
        self.spread.forget([outlet.index])
        self.can_hand.set()

    def outlet_closed(self, outlet: Outlet) -> None:
        if self.outlets.get(outlet.index) is outlet:
            del self.outlets[outlet.index]
            self.spread.forget([outlet.index])
        if not self.outlets:
            self.can_hand.clear()

    # -- the processes' links ---------------------------------------------------------

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
                if index is not None:
                    self.spread.claimed(index)  # admitted or refused, that connection is no longer on its way
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


def listen_on(host: str, port: int) -> list[socket.socket]:
    """The gateway's listening sockets on ``host:port``, one per address ``host`` names (both
    families for a name like ``localhost``; IPv6 ones take only IPv6, as asyncio's servers do),
    all on one port (chosen here when 0); the supervisor's while its processes come and go.
    Raises :class:`OSError` if another program has the port, also one that would share it
    (``SO_REUSEPORT``) or an earlier gateway of this user."""
    check_can_listen(host, port, "the gateway")
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)):
            listener = socket.socket(family, kind, proto)
            listeners.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past connections in TIME_WAIT do not hold it
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if listeners[0] is not listener:  # the port the first one got, when it was 0
                address = (address[0], listeners[0].getsockname()[1], *address[2:])
            listener.bind(address)
            listener.listen(socket.SOMAXCONN)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def _peer(connection: socket.socket) -> str:
    try:
        peer = connection.getpeername()
    except OSError:
        return "a client"
    return str(peer[0]) if isinstance(peer, tuple) else "a client"


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
    listeners = listen_on(settings.host, settings.port)
    port = listeners[0].getsockname()[1]
    supervisor = Supervisor(settings, count)
    with tempfile.TemporaryDirectory(prefix="edgestream-gateway-") as directory:  # mode 700: only this user joins
        path = str(Path(directory) / "supervisor.sock")
        server = await asyncio.start_unix_server(supervisor.serve_link, path, limit=MAX_LINE_BYTES)
        handoff = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        handoff.bind(str(Path(directory) / "handoff.sock"))
        handoff.listen(count * 2)
        outlets = asyncio.create_task(accept_outlets(handoff, supervisor.outlet_opened, supervisor.outlet_closed), name="hand-off sockets")
        accepting = [asyncio.create_task(supervisor.hand_out(listener), name="accepting") for listener in listeners]
        spec = {"config": config.model_dump(mode="json"), "processes": count, "directory": directory, "port": port}
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
            print_listening(config, port, f"{len(kids)} processes on one port (pids {pids}); each connection goes to the one with the fewest sessions")
            code = await supervise(kids, stopper, essential=lambda child: True)
        finally:
            stopper.cancel()
            say("stopping")
            await _cancelled(accepting)  # new connections wait in the backlog, and are refused when it closes
            for listener in listeners:
                listener.close()
            await stop_all(kids)
            await _cancelled([outlets])
            for outlet in list(supervisor.outlets.values()):
                outlet.close()
            handoff.close()
            server.close()
    return code


async def _cancelled(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they have stopped (before the sockets they use are closed)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


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


async def serve_process(config: Config, index: int, processes: int, directory: str, port: int) -> int:
    """Process ``index`` of ``processes`` in the gateway: serve the connections the supervisor hands
    over, until SIGTERM or the supervisor is gone."""
    from .server import Gateway

    fleet = FleetMember(str(Path(directory) / "supervisor.sock"), index)
    gateway = Gateway(config.gateway.share_of(processes), config.worker_urls(), config.security, fleet=fleet)
    await fleet.connect(gateway.report)
    await gateway.start(port=port, door=str(Path(directory) / f"gw{index}.sock"))
    inlet = Inlet(str(Path(directory) / "handoff.sock"), index, gateway.adopt)
    await inlet.connect()
    assert fleet.link is not None
    fleet.link.tell({"op": "listening"})
    signalled = asyncio.create_task(until_signalled())
    orphaned = asyncio.create_task(fleet.closed.wait())
    cut_off = asyncio.create_task(inlet.closed.wait())  # no connection could reach it any more
    try:
        await asyncio.wait([signalled, orphaned, cut_off], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (signalled, orphaned, cut_off):
            task.cancel()
    if not signalled.done():
        log.error("the gateway's supervisor is gone; this process stops")
    inlet.close()
    await gateway.close()
    await fleet.close()
    return 0 if signalled.done() else 1


def main() -> int:
    spec = json.loads(os.environ[PROCESS_ENV])
    config = Config.model_validate(spec["config"])
    logs.configure(config.log.format, config.log.level)
    with contextlib.suppress(KeyboardInterrupt):
        return run(serve_process(config, int(spec["index"]), int(spec["processes"]), spec["directory"], int(spec["port"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
