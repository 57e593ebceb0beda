"""The gateway's front door: WebSocket signaling at ``/session``, the demo page, health.

Signaling (JSON text messages on ``ws://HOST:PORT/session``):

- client -> gateway: ``{"type": "offer", "sdp": "..."}`` with ICE gathering
  complete (aiortc takes no trickled candidates), within 10 s of connecting.
- gateway -> client: ``{"type": "answer", "sdp": "...", "session_id": "..."}``,
  or ``{"type": "error", "code": "...", "message": "..."}`` and a close.

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
import contextlib
import json
import logging
import mimetypes
from http import HTTPStatus
from pathlib import Path

import websockets
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from stream import logs
from stream.config import GatewaySettings
from stream.http import json_response, metrics_response, readiness_response, response
from stream.protocol import WorkerKind

from .metrics import GatewayMetrics
from .selection import POLICIES
from .session import BadOffer, Session
from .worker_pool import WorkerPool

log = logging.getLogger("edgestream.gateway")

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"
MAX_SIGNALING_BYTES = 64 * 1024
OFFER_TIMEOUT_S = 10.0
# The page's own types, so serving it does not depend on the system's mime.types
# (a module script with the wrong type does not run).
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


class Gateway:
    def __init__(self, settings: GatewaySettings, worker_urls: dict[WorkerKind, list[str]]) -> None:
        self.settings = settings
        self.metrics = GatewayMetrics()
        self.pool = WorkerPool(worker_urls, policy=POLICIES[settings.selection](), metrics=self.metrics)
        self.sessions: dict[str, Session] = {}
        self.metrics.watch(self.pool, lambda: self.sessions.values())
        logs.install()
        self._server: Server | None = None
        self._closing = False
        self.discovery = None
        if settings.loopback_ice:
            from .loopback import allow_loopback_ice

            allow_loopback_ice()

    async def start(self, host: str | None = None, port: int | None = None) -> int:
        self.pool.start()
        if self.settings.discover:
            from .discovery import Discovery

            self.discovery = Discovery(self.pool, self.settings.discover_interfaces or None)
            await self.discovery.start()
        self._server = await serve(
            self._handle,
            host or self.settings.host,
            self.settings.port if port is None else port,
            process_request=self._http,
            max_size=MAX_SIGNALING_BYTES,
        )
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._closing = True  # sessions end with "shutting_down", not "connection_failed"
        for session in list(self.sessions.values()):
            await session.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self.discovery is not None:
            await self.discovery.close()
        await self.pool.close()

    # -- HTTP -------------------------------------------------------------------------

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/session":
            return None  # the WebSocket handshake goes on
        if path == "/metrics":
            return metrics_response(self.metrics.registry)
        if path in ("/healthz", "/readyz"):
            workers = {kind.value: self.pool.available(kind) for kind in WorkerKind}
            if path == "/healthz":
                return json_response({"ok": True, "sessions": len(self.sessions), "workers": workers, "pool": self.pool.snapshot()})
            missing = [kind.value for kind in self.settings.required_kinds if not workers[kind.value]]
            if self._closing:
                missing.append("shutting_down")
            return readiness_response(missing, {"sessions": len(self.sessions), "workers": workers})
        file = (WEB_ROOT / (path.lstrip("/") or "index.html")).resolve()
        if not file.is_relative_to(WEB_ROOT) or not file.is_file():
            return response(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
        kind = CONTENT_TYPES.get(file.suffix) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        return response(HTTPStatus.OK, file.read_bytes(), kind)

    # -- signaling ---------------------------------------------------------------------

    async def _handle(self, websocket: ServerConnection) -> None:
        peer = "%s:%s" % websocket.remote_address[:2] if websocket.remote_address else "?"
        try:
            async with asyncio.timeout(OFFER_TIMEOUT_S):
                raw = await websocket.recv()
            offer = json.loads(raw)
            if not isinstance(offer, dict) or offer.get("type") != "offer" or not isinstance(offer.get("sdp"), str):
                raise ValueError('expected {"type": "offer", "sdp": "..."}')
        except TimeoutError:
            await self._refuse(websocket, "timeout", f"no offer within {OFFER_TIMEOUT_S:g} s", peer)
            return
        except (ValueError, TypeError) as exc:
            await self._refuse(websocket, "malformed", str(exc), peer)
            return
        except websockets.ConnectionClosed:
            return
        if len(self.sessions) >= self.settings.max_sessions:
            await self._refuse(websocket, "too_many_sessions", f"the gateway holds {self.settings.max_sessions} sessions at most", peer)
            return
        session = Session(self.pool, self.settings, self.metrics)
        logs.session_id.set(session.id)  # this task's log lines (and its children's) name the session
        self.sessions[session.id] = session
        self.metrics.sessions.inc()
        try:
            try:
                answer = await session.accept(offer["sdp"])
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
            log.info("session %s: closed", session.id)

    async def _watch(self, session: Session, websocket: ServerConnection) -> None:
        """Keep the session while its signaling socket is open and ICE connects."""
        try:
            async with asyncio.timeout(self.settings.ice_timeout_s):
                await session.connected.wait()
        except TimeoutError:
            await self._refuse(websocket, "ice_timeout", f"ICE did not connect within {self.settings.ice_timeout_s:g} s", session.id)
            return
        closed = asyncio.create_task(session.closed.wait())
        gone = asyncio.create_task(websocket.wait_closed())
        await asyncio.wait([closed, gone], return_when=asyncio.FIRST_COMPLETED)
        for task in (closed, gone):
            task.cancel()
        if session.closed.is_set():
            if self._closing:
                error = {"type": "error", "code": "shutting_down", "message": "the gateway is shutting down"}
            else:
                error = {"type": "error", "code": "connection_failed", "message": "the WebRTC connection failed"}
            self.metrics.errors.labels(error["code"]).inc()
            with contextlib.suppress(websockets.ConnectionClosed):
                await websocket.send(json.dumps(error))
                await websocket.close()

    async def _refuse(self, websocket: ServerConnection, code: str, message: str, who: str) -> None:
        log.warning("signaling %s refused: %s: %s", who, code, message)
        self.metrics.errors.labels(code).inc()
        with contextlib.suppress(websockets.ConnectionClosed):
            await websocket.send(json.dumps({"type": "error", "code": code, "message": message}))
            await websocket.close(1008 if code != "timeout" else 1000, code)
