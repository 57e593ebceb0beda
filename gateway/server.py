"""The gateway's front door: WebSocket signaling at ``/session``, the demo page, health.

Signaling (JSON text messages on ``ws://HOST:PORT/session``, ``wss://`` with TLS):

- client -> gateway: ``{"type": "offer", "sdp": "...", "token": "..."}`` with
  ICE gathering complete (aiortc takes no trickled candidates), within 10 s of
  connecting. ``token`` is needed when the gateway has a token file
  (``gateway/tokens.py``); a gateway listening on anything but loopback
  always has one.
- gateway -> client: ``{"type": "answer", "sdp": "...", "session_id": "..."}``,
  or ``{"type": "error", "code": "...", "message": "..."}`` and a close.
  Refusal codes: ``timeout``, ``malformed``, ``unauthorized``, ``rate_limited``
  (``offers_per_minute``), ``too_many_sessions``, ``too_many_client_sessions``,
  ``bad_offer``; a
  live session may end with ``ice_timeout``, ``connection_failed``,
  ``token_revoked`` or ``shutting_down``. A message over 64 KiB closes the
  socket with code 1009. A connection above ``max_pending_signaling`` (in all,
  or ``..._per_address``) still waiting for its offer is refused at the
  handshake: HTTP 503, ``too_many_pending: ...``.

The session lives as long as this WebSocket: closing it ends the session, and
the gateway closes it (with an ``error`` first) when ICE does not complete in
``ice_timeout_s`` or the peer connection fails. Other paths serve ``web/``
(``GET /``), ``GET /healthz`` (the process is up; sessions and the worker
pool), ``GET /readyz`` (200 when a worker of every required kind is in
rotation, else 503 naming the missing kinds) and ``GET /metrics``
(Prometheus, ``gateway/metrics.py``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import mimetypes
import os
import socket
import uuid
from collections.abc import Callable
from http import HTTPStatus
from importlib import resources
from pathlib import Path

import websockets
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from stream import keys, logs, tls
from stream.config import GatewaySettings, SecuritySettings, check_gateway_exposure
from stream.http import get_and_head_only, json_response, metrics_response, readiness_response, response
from stream.memory import IdleTrim
from stream.protocol import WorkerKind

from .aggregate import merge_health, merge_metrics, missing_for_ready
from .ledger import Refusal, SessionLedger
from .limits import ClientRates, PendingConnections, TokenBucket
from .metrics import GatewayMetrics
from .process_link import FleetMember
from .selection import POLICIES
from .session import BadOffer, Session
from .tokens import TokenChecker
from .worker_pool import PoolSettings, WorkerPool

log = logging.getLogger("edgestream.gateway")

WEB_ROOT = Path(str(resources.files("gateway") / "web")).resolve()
"""The page and the JS SDK: package data (``gateway/web`` links to the repository's ``web/``)."""
MAX_SIGNALING_BYTES = 64 * 1024
SIGNALING_OPEN_TIMEOUT_S = 10.0
"""The TLS and WebSocket opening handshakes of a signaling connection, each at most this long."""
SIGNALING_CLOSE_TIMEOUT_S = 10.0
OFFER_TIMEOUT_S = 10.0
TOKEN_CHECK_INTERVAL_S = 1.0
"""How often the token file is checked for changes (a revoked token's sessions end within this)."""
# The page's own types, so serving it does not depend on the system's mime.types
# (a module script with the wrong type does not run).
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
ALIASES = {"/favicon.ico": "/favicon.svg"}
"""Paths browsers ask for by convention, and the file that answers them."""


REFUSALS_LOGGED_PER_S = 1.0
"""Refusals logged a second, in bursts of ``REFUSALS_LOGGED_BURST``; the rest are counted
(``edgestream_errors_total``) and summed up in the next line logged: a flood of connections
cannot flood the log."""
REFUSALS_LOGGED_BURST = 10
TOLD_ADDRESSES = 4096
"""Addresses remembered as told ``rate_limited`` (their next connections are aborted at accept)."""

CLOSE_STEP_S = 10.0
"""How long each step of stopping the gateway may take."""


async def _bounded(what: str, awaitable) -> None:
    try:
        async with asyncio.timeout(CLOSE_STEP_S):
            await awaitable
    except TimeoutError:
        log.warning("stopping: %s took more than %g s; going on without it", what, CLOSE_STEP_S)


def _front_door(refused: Callable[[str], bool]) -> type[ServerConnection]:
    """The signaling connection class: a connection from an address that ``refused`` is aborted as it
    is accepted, before any HTTP is read (the cheapest answer to a flood already told once)."""

    class FrontDoorConnection(ServerConnection):
        _aborted = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            peer = transport.get_extra_info("peername")
            if peer and refused(str(peer[0])):
                self._aborted = True
                transport.abort()
                return
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            if not self._aborted:
                super().connection_lost(exc)

    return FrontDoorConnection


class Gateway:
    """The gateway, or one process of a gateway of several (``fleet``: its link to the supervisor, ``gateway/processes.py``).

    Sessions are admitted by a :class:`~gateway.ledger.SessionLedger`: this
    process's own, or the supervisor's through ``fleet``, so that the
    session limits are the whole gateway's. ``/healthz``, ``/readyz`` and
    ``/metrics`` answer for the whole gateway either way.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        worker_urls: dict[WorkerKind, list[str]],
        security: SecuritySettings = SecuritySettings(),
        fleet: FleetMember | None = None,
    ) -> None:
        self.settings = settings
        self.fleet = fleet
        self.ledger = SessionLedger(settings.max_sessions, settings.max_sessions_per_client) if fleet is None else None
        self.metrics = GatewayMetrics()
        self.tokens = TokenChecker(security.client_tokens_file) if security.client_tokens_file else None
        self.ssl_context = tls.server_context(security.tls_cert, security.tls_key) if security.tls_cert else None
        key = keys.load_key(security.worker_key_file) if security.worker_key_file else None
        self.pool = WorkerPool(
            worker_urls,
            policy=POLICIES[settings.selection](),
            settings=PoolSettings(max_waiting_jobs=settings.max_waiting_jobs),
            metrics=self.metrics,
            key=key,
            ssl_context=tls.client_context(security.tls_ca or None),
        )
        self.sessions: dict[str, Session] = {}
        self.metrics.watch(self.pool, lambda: self.sessions.values())
        logs.install()
        self._server: Server | None = None
        self._connection_class = _front_door(self._aborts)
        self._adopting: set[asyncio.Task[None]] = set()
        self._token_watch: asyncio.Task[None] | None = None
        self._closing = False
        self.pending = PendingConnections(settings.max_pending_signaling, settings.max_pending_signaling_per_address)
        self._offer_rates = ClientRates(settings.offers_per_minute)
        self._refusal_log = TokenBucket(REFUSALS_LOGGED_PER_S, REFUSALS_LOGGED_BURST)
        self._refusals_unlogged = 0
        self._trim = IdleTrim()
        self._evictions: set[asyncio.Future[None]] = set()
        self._told_rate_limited: collections.OrderedDict[str, None] = collections.OrderedDict()
        """Addresses told ``rate_limited`` at the handshake in their current flood (at most ``TOLD_ADDRESSES``)."""
        self.discovery = None
        if settings.loopback_ice:
            from stream.loopback import allow_loopback_ice

            allow_loopback_ice()

    async def start(self, host: str | None = None, port: int | None = None, *, door: str | None = None) -> int:
        """Listen on ``host:port``; the port.

        One process of several (``gateway/processes.py``) listens instead on a
        Unix socket of its own at ``door`` and serves the connections its
        supervisor accepts on the gateway's port, handed in through
        :meth:`adopt`; ``port`` (the gateway's) is what it returns then.
        """
        host = host or self.settings.host
        check_gateway_exposure(host, self.tokens is not None)
        self.pool.start()
        if self.settings.discover:
            from .discovery import Discovery

            self.discovery = Discovery(self.pool, self.settings.discover_interfaces or None)
            await self.discovery.start()
        where: dict[str, object] = {"host": host, "port": self.settings.port if port is None else port}
        if door is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(door)  # a process restarted in its place left it
            where = {"unix": True, "path": door}
        self._server = await serve(
            self._handle,
            **where,
            process_request=get_and_head_only(self._http),
            create_connection=self._connection_class,
            max_size=MAX_SIGNALING_BYTES,
            open_timeout=SIGNALING_OPEN_TIMEOUT_S,
            close_timeout=SIGNALING_CLOSE_TIMEOUT_S,
            compression=None,  # small JSON messages: per-message deflate would cost CPU and a zlib context per session
            ssl=self.ssl_context,
        )
        if self.tokens is not None:
            self._token_watch = asyncio.create_task(self._watch_tokens(), name="token file")
        if door is not None:
            assert port is not None
            return port
        return self._server.sockets[0].getsockname()[1]

    def adopt(self, connection: socket.socket) -> None:
        """Serve ``connection``, accepted by the supervisor on the gateway's port (:meth:`start` with ``door``):
        as if this process had accepted it, with the same limits (``serve``'s above: the same protocol and class)."""
        assert self._server is not None
        server = self._server
        connection.setblocking(False)

        def signaling_connection() -> ServerConnection:
            return self._connection_class(ServerProtocol(max_size=MAX_SIGNALING_BYTES), server, close_timeout=SIGNALING_CLOSE_TIMEOUT_S)

        async def serve_it() -> None:
            loop = asyncio.get_running_loop()
            tls_timeouts = {"ssl_handshake_timeout": SIGNALING_OPEN_TIMEOUT_S, "ssl_shutdown_timeout": SIGNALING_CLOSE_TIMEOUT_S}
            try:
                await loop.connect_accepted_socket(signaling_connection, connection, ssl=self.ssl_context, **(tls_timeouts if self.ssl_context else {}))
            except Exception as exc:  # reset before it was served, a failed TLS handshake (a scanner, plain HTTP): that connection only
                log.debug("a connection handed to this process could not be served: %s", exc or type(exc).__name__)
                connection.close()
            except BaseException:
                connection.close()
                raise

        task = asyncio.create_task(serve_it(), name="handed connection")
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    async def close(self) -> None:
        """Stop: every session ends, then the signaling server, discovery and the worker links.

        Each step is bounded (``CLOSE_STEP_S``): a step that does not finish
        is logged and left behind, so a stop always ends (SIGTERM, tests).
        """
        self._closing = True  # sessions end with "shutting_down", not "connection_failed"
        if self._token_watch is not None:
            self._token_watch.cancel()
        for task in list(self._adopting):
            task.cancel()
        sessions = list(self.sessions.values())
        if sessions:
            await _bounded("closing the sessions", asyncio.gather(*(s.close() for s in sessions), return_exceptions=True))
        if self._server is not None:
            self._server.close()
            await _bounded("closing the signaling server", self._server.wait_closed())
        if self.discovery is not None:
            await _bounded("stopping discovery", self.discovery.close())
        await _bounded("closing the worker links", self.pool.close())
        await self._trim.close()

    # -- HTTP -------------------------------------------------------------------------

    async def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path, _, query = request.path.partition("?")
        if path == "/session":
            return self._admit_signaling(connection)  # None: the WebSocket handshake goes on
        if path == "/metrics":
            if self.fleet is None:
                return metrics_response(self.metrics.registry)
            reports, _ = await self.fleet.gather("metrics")
            text = merge_metrics({int(report["process"]): report["text"] for report in reports}, per_process="per_process" in query)
            return response(HTTPStatus.OK, text, CONTENT_TYPE_LATEST)
        if path in ("/healthz", "/readyz"):
            if self.fleet is None:
                health = merge_health([self.report("health")], 1)
            else:
                health = merge_health(*await self.fleet.gather("health"))
            if path == "/healthz":
                return json_response(health)
            return readiness_response(missing_for_ready(health), {"sessions": health["sessions"], "workers": health["workers"]})
        path = ALIASES.get(path, path)
        try:
            file = (WEB_ROOT / (path.lstrip("/") or "index.html")).resolve()
            found = file.is_relative_to(WEB_ROOT) and file.is_file()
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte
            found = False
        if not found:
            return response(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
        kind = CONTENT_TYPES.get(file.suffix) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        return response(HTTPStatus.OK, file.read_bytes(), kind)

    def report(self, what: str) -> dict[str, object]:
        """This process's part of the gateway's ``health`` or ``metrics`` (``gateway/aggregate.py`` merges them)."""
        index = self.fleet.index if self.fleet is not None else 0
        if what == "metrics":
            return {"process": index, "text": generate_latest(self.metrics.registry).decode()}
        return {
            "process": index,
            "pid": os.getpid(),
            "sessions": len(self.sessions),
            "workers": {kind.value: self.pool.available(kind) for kind in WorkerKind},
            "states": {kind.value: self.pool.state(kind) for kind in WorkerKind},
            "required": [kind.value for kind in self.settings.required_kinds],
            "pool": self.pool.snapshot(),
            "closing": self._closing,
        }

    # -- signaling ---------------------------------------------------------------------

    def _admit_signaling(self, connection: ServerConnection) -> Response | None:
        """Count a new signaling connection as pending until its offer, or refuse it (HTTP 503)."""
        address = str(connection.remote_address[0]) if connection.remote_address else "?"
        if self.tokens is None and self._offer_rates.exhausted(address):  # the client is the address: refuse it unread
            message = self._over_rate(address)
            self._log_refusal(address, "rate_limited", message)
            self._told_rate_limited[address] = None
            while len(self._told_rate_limited) > TOLD_ADDRESSES:
                self._told_rate_limited.popitem(last=False)
            return response(HTTPStatus.TOO_MANY_REQUESTS, f"rate_limited: {message}\n".encode(), "text/plain")
        if self.pending.refusal(address) is not None:
            for key in self.pending.keys():  # a handshake that failed never reached _handle
                if isinstance(key, ServerConnection) and key.state is State.CLOSED:
                    self.pending.done(key)
        refusal, evicted = self.pending.admit_or_evict(connection, address)
        if isinstance(evicted, ServerConnection):  # the biggest holder's oldest place went to the newcomer
            self._log_refusal(logs.peer_label(evicted.remote_address), "too_many_pending", "evicted for a connection from another address")
            closing = asyncio.ensure_future(evicted.close(1013, "too_many_pending"))
            self._evictions.add(closing)  # held until done: the loop keeps only a weak reference
            closing.add_done_callback(self._evictions.discard)
        if refusal is None:
            return None
        self._log_refusal(address, "too_many_pending", refusal)
        return response(HTTPStatus.SERVICE_UNAVAILABLE, f"too_many_pending: {refusal}\n".encode(), "text/plain")

    def _over_rate(self, client: str) -> str:
        return f"client {client} made more than {self.settings.offers_per_minute:g} offers in a minute; wait a little"

    def _aborts(self, address: str) -> bool:
        """Whether a connection from ``address`` is aborted at accept: it was told ``rate_limited``
        and is still over its rate (no token file: the client is the address)."""
        if address not in self._told_rate_limited:
            return False
        if self._offer_rates.exhausted(address):
            self.metrics.errors.labels("rate_limited").inc()
            return True
        del self._told_rate_limited[address]  # the flood is over: the next refusal is told again
        return False

    async def _handle(self, websocket: ServerConnection) -> None:
        peer = logs.peer_label(websocket.remote_address)
        try:
            async with asyncio.timeout(OFFER_TIMEOUT_S):
                try:
                    raw = await websocket.recv()
                finally:
                    self.pending.done(websocket)
            offer = json.loads(raw)
            if not isinstance(offer, dict) or offer.get("type") != "offer" or not isinstance(offer.get("sdp"), str):
                raise ValueError('expected {"type": "offer", "sdp": "..."}')
            if not isinstance(offer.get("token", ""), str):
                raise ValueError("token: expected a string")
        except TimeoutError:
            await self._refuse(websocket, "timeout", f"no offer within {OFFER_TIMEOUT_S:g} s", peer)
            return
        except (ValueError, TypeError) as exc:
            await self._refuse(websocket, "malformed", str(exc), peer)
            return
        except RecursionError:  # "[[[[..." thousands deep
            await self._refuse(websocket, "malformed", "JSON nested too deep", peer)
            return
        except websockets.ConnectionClosed:
            return
        client = self._client(offer.get("token", ""), websocket)
        if client is None:
            reason = "this gateway needs a token (offer.token)" if not offer.get("token") else "unknown or revoked token"
            await self._refuse(websocket, "unauthorized", reason, peer)
            return
        if not self._offer_rates.allow(client):
            await self._refuse(websocket, "rate_limited", self._over_rate(client), peer)
            return
        session_id = uuid.uuid4().hex[:12]
        refusal = await self._claim(session_id, client)
        if refusal is not None:
            await self._refuse(websocket, refusal.code, refusal.message, peer)
            return
        try:
            await self._serve(websocket, Session(self.pool, self.settings, self.metrics, client, session_id), offer["sdp"], peer)
        finally:
            self._release(session_id)

    async def _claim(self, session_id: str, client: str) -> Refusal | None:
        """A place for a new session within the gateway's limits (every process's sessions count), or why not."""
        if self.fleet is None:
            assert self.ledger is not None
            return self.ledger.claim(0, session_id, client)
        try:
            return await self.fleet.claim(session_id, client)
        except (ConnectionError, TimeoutError) as exc:
            log.error("the gateway's supervisor did not admit a session: %s", exc)
            return Refusal("shutting_down", "this gateway process is shutting down")

    def _release(self, session_id: str) -> None:
        if self.fleet is None:
            assert self.ledger is not None
            self.ledger.release(session_id)
        else:
            self.fleet.release(session_id)

    async def _serve(self, websocket: ServerConnection, session: Session, offer_sdp: str, peer: str) -> None:
        """Answer the offer and keep the session while it lives."""
        logs.session_id.set(session.id)  # this task's log lines (and its children's) name the session
        self.sessions[session.id] = session
        self.metrics.sessions.inc()
        try:
            try:
                answer = await session.accept(offer_sdp)
            except BadOffer as exc:
                await self._refuse(websocket, "bad_offer", str(exc), peer)
                return
            await websocket.send(json.dumps({"type": "answer", "sdp": answer, "session_id": session.id}))
            log.info("session %s: answered %s", session.id, peer)
            await self._watch(session, websocket)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.sessions.pop(session.id, None)
            await session.close()
            self._trim.soon()  # what its media buffers held goes back to the system
            log.info("session %s: ended", session.id)

    async def _watch(self, session: Session, websocket: ServerConnection) -> None:
        """Keep the session while its signaling socket is open and ICE connects."""
        connected = asyncio.create_task(session.connected.wait())
        closed = asyncio.create_task(session.closed.wait())
        gone = asyncio.create_task(websocket.wait_closed())
        try:
            # The session may end (the gateway stopping, a revoked token) before ICE completes.
            done, _ = await asyncio.wait([connected, closed, gone], timeout=self.settings.ice_timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                await self._refuse(websocket, "ice_timeout", f"ICE did not connect within {self.settings.ice_timeout_s:g} s", session.id)
                return
            if not closed.done() and not gone.done():
                await asyncio.wait([closed, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (connected, closed, gone):
                task.cancel()
        if session.closed.is_set():
            if session.end_reason is not None:
                code, message = session.end_reason
                error = {"type": "error", "code": code, "message": message}
            elif self._closing:
                error = {"type": "error", "code": "shutting_down", "message": "the gateway is shutting down"}
            else:
                error = {"type": "error", "code": "connection_failed", "message": "the WebRTC connection failed"}
            self.metrics.errors.labels(error["code"]).inc()
            with contextlib.suppress(websockets.ConnectionClosed):
                await websocket.send(json.dumps(error))
                await websocket.close()

    def _client(self, token: str, websocket: ServerConnection) -> str | None:
        """Who is asking: the token's name, or the address where no token is needed; ``None``: refused."""
        if self.tokens is None:
            address = websocket.remote_address
            return str(address[0]) if address else "?"
        return self.tokens.client(token)

    async def _watch_tokens(self) -> None:
        """Follow the token file; end the sessions of a token that was revoked."""
        assert self.tokens is not None
        while True:
            await asyncio.sleep(TOKEN_CHECK_INTERVAL_S)
            if not self.tokens.reload():
                continue
            valid = self.tokens.valid_names()
            for session in list(self.sessions.values()):
                if session.client not in valid:
                    log.warning("session %s: token of client %s revoked; closing", session.id, session.client)
                    session.end_reason = ("token_revoked", "this session's token was revoked")
                    await session.close()

    def _log_refusal(self, who: str, code: str, message: str) -> None:
        self.metrics.errors.labels(code).inc()
        if not self._refusal_log.allow():
            self._refusals_unlogged += 1
            return
        unlogged, self._refusals_unlogged = self._refusals_unlogged, 0
        more = f" ({unlogged} more refusals since the last line)" if unlogged else ""
        log.warning("signaling %s refused: %s: %s%s", who, code, message, more)

    async def _refuse(self, websocket: ServerConnection, code: str, message: str, who: str) -> None:
        self._log_refusal(who, code, message)
        with contextlib.suppress(websockets.ConnectionClosed):
            await websocket.send(json.dumps({"type": "error", "code": code, "message": message}))
            await websocket.close(1008 if code != "timeout" else 1000, code)
