"""Plain HTTP answers served beside a WebSocket endpoint (health, metrics, files).

websockets' ``process_request`` hook lets one port serve both: a request for
a WebSocket path goes on to the handshake, anything else gets one of these.
:func:`get` is the matching client, for benchmarks and tests on loopback.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import ssl
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response


def response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers({"Content-Type": content_type, "Content-Length": str(len(body)), "Cache-Control": "no-store"})
    return Response(status.value, status.phrase, headers, body)


ProcessRequest = Callable[[ServerConnection, Request], "Response | Awaitable[Response | None] | None"]


def get_and_head_only(handler: ProcessRequest) -> Callable[[ServerConnection, Request], Awaitable[Response | None]]:
    """``handler`` (a function or a coroutine function) for GET; HEAD gets GET's answer without
    its body; any other method, and a HEAD of a WebSocket path, gets 405 (the handshake is a GET)."""

    async def process(connection: ServerConnection, request: Request) -> Response | None:
        if request.method not in ("GET", "HEAD"):
            return _not_allowed()
        answer = handler(connection, request)
        if inspect.isawaitable(answer):
            answer = await answer
        if request.method == "HEAD":
            return _not_allowed() if answer is None else Response(answer.status_code, answer.reason_phrase, answer.headers, b"")
        return answer

    return process


def _not_allowed() -> Response:
    answer = response(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", "text/plain")
    answer.headers["Allow"] = "GET, HEAD"
    return answer


def json_response(payload: object, status: HTTPStatus = HTTPStatus.OK) -> Response:
    return response(status, json.dumps(payload).encode(), "application/json")


def metrics_response(registry: CollectorRegistry) -> Response:
    """The registry in Prometheus' text exposition format."""
    return response(HTTPStatus.OK, generate_latest(registry), CONTENT_TYPE_LATEST)


def readiness_response(missing: list[str], payload: dict[str, object]) -> Response:
    """``/readyz``: 200 when nothing is ``missing``, else 503 naming what is."""
    ready = not missing
    return json_response({"ready": ready, "missing": missing, **payload}, HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE)


async def get(url: str, timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None) -> tuple[int, str]:
    """``(status, body)`` of ``GET url`` (``http://``, or ``https://`` verified by ``ssl_context``; one request per connection)."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or (443 if secure else 80), ssl=(ssl_context or True) if secure else None)
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            writer.write(f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode())
            data = await reader.read()
        finally:
            writer.close()
    head, _, body = data.decode("utf-8", "replace").partition("\r\n\r\n")
    return int(head.split(maxsplit=2)[1]), body
