"""The link between the supervisor of a multi-process gateway and each of its processes (transport).

One Unix stream socket per gateway process, in a directory only this user
can open (``gateway/processes.py`` makes it). Messages are JSON objects, one
per line (at most ``MAX_LINE_BYTES``), in both directions:

- a request carries ``"id"`` (an integer the sender chose) and ``"op"``;
  the answer carries the same ``"id"`` and ``"reply"`` (an object);
- a notice carries ``"op"`` and no ``"id"``, and gets no answer.

Ops, process -> supervisor: ``hello`` (notice: ``index``, ``pid``), ``claim``
(``session``, ``client``; reply ``{}`` or ``{"code", "message"}``),
``release`` (notice: ``session``), ``gather`` (``what``: ``metrics`` or
``health``; reply ``{"reports": [...]}``, one per live process).
Supervisor -> process: ``report`` (``what``; reply: that process's report).

A request not answered within its timeout raises :class:`TimeoutError`; a
closed link fails every request waiting on it with :class:`LinkClosed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from .ledger import Refusal

log = logging.getLogger("edgestream.gateway")

MAX_LINE_BYTES = 8 * 1024 * 1024
"""The longest message: a process's metrics report (tens of KB with many workers) fits many times over."""

MAX_BUFFERED_BYTES = 4 * MAX_LINE_BYTES
"""Bytes written and not yet taken by the other end, at most: a process that stopped reading
loses its link (and is then told nothing more) instead of growing this one's memory."""

Message = dict[str, Any]
Handler = Callable[[Message], Awaitable[Message | None]]


class LinkClosed(ConnectionError):
    """The other end of the link is gone (its process exited)."""


class ProcessLink:
    """One end of a link: send requests and notices, answer the other end's requests with ``handler``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler) -> None:
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self._handling: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()

    @classmethod
    async def connect(cls, path: str, handler: Handler) -> ProcessLink:
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE_BYTES)
        return cls(reader, writer, handler)

    def tell(self, message: Message) -> None:
        """Send a notice (no answer); on a closed link, nothing."""
        if not self.closed.is_set():
            self._write(message)

    async def request(self, message: Message, timeout: float) -> Message:
        """Send a request and wait for its reply."""
        if self.closed.is_set():
            raise LinkClosed("the link is closed")
        request_id = next(self._ids)
        answer: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answer
        try:
            self._write({**message, "id": request_id})
            async with asyncio.timeout(timeout):
                return await answer
        finally:
            self._waiting.pop(request_id, None)

    async def run(self) -> None:
        """Read until the link closes, answering requests and resolving replies."""
        try:
            while line := await self._reader.readline():
                try:
                    message = json.loads(line)
                    if not isinstance(message, dict):
                        raise ValueError("not an object")
                except ValueError as exc:
                    log.error("process link: dropped a malformed message: %s", exc)
                    continue
                if "reply" in message:
                    waiter = self._waiting.get(message.get("id"))  # type: ignore[arg-type]
                    if waiter is not None and not waiter.done():
                        waiter.set_result(message["reply"])
                    continue
                task = asyncio.create_task(self._answer(message))
                self._handling.add(task)
                task.add_done_callback(self._handling.discard)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:  # ValueError: a line over the limit
            log.warning("process link lost: %s", exc)
        finally:
            self._close()

    async def _answer(self, message: Message) -> None:
        try:
            reply = await self._handler(message)
        except Exception:
            log.exception("process link: failed on %s", message.get("op"))
            reply = {"code": "internal", "message": "the gateway failed on this request"}
        if "id" in message and not self.closed.is_set():
            self._write({"id": message["id"], "reply": reply or {}})

    def _write(self, message: Message) -> None:
        if self._writer.transport.get_write_buffer_size() > MAX_BUFFERED_BYTES:
            log.error("process link: the other end reads nothing (%d bytes unsent); closing it", self._writer.transport.get_write_buffer_size())
            self._close()
            return
        try:
            self._writer.write(json.dumps(message).encode() + b"\n")
        except (ConnectionError, RuntimeError):
            self._close()

    def _close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(LinkClosed("the link closed"))
        with contextlib.suppress(Exception):
            self._writer.close()

    async def close(self) -> None:
        self._close()
        for task in list(self._handling):
            task.cancel()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


CLAIM_TIMEOUT_S = 5.0
"""How long a process waits for the supervisor to admit a session (it answers in well under a millisecond)."""
GATHER_TIMEOUT_S = 2.0
"""How long ``/healthz`` and ``/metrics`` wait for the reports of every process (each has ``REPORT_TIMEOUT_S``)."""


class FleetMember:
    """One gateway process's side of a gateway of several processes (``gateway/processes.py``).

    Sessions are admitted by the supervisor's ledger (``gateway/ledger.py``),
    so the gateway's session limits hold across its processes; the whole
    gateway's health and metrics are gathered from every process through it.
    """

    def __init__(self, path: str, index: int) -> None:
        self.path = path
        self.index = index
        self.link: ProcessLink | None = None
        self._reader: asyncio.Task[None] | None = None

    async def connect(self, report: Callable[[str], Message]) -> None:
        """Join the supervisor; ``report(what)`` answers its ``report`` requests."""

        async def answer(message: Message) -> Message | None:
            if message.get("op") == "report":
                return report(str(message.get("what")))
            return {"code": "unknown_op", "message": f"unknown op {message.get('op')!r}"}

        self.link = await ProcessLink.connect(self.path, answer)
        self._reader = asyncio.create_task(self.link.run(), name="supervisor link")
        self.link.tell({"op": "hello", "index": self.index, "pid": os.getpid()})

    @property
    def closed(self) -> asyncio.Event:
        assert self.link is not None
        return self.link.closed

    async def claim(self, session_id: str, client: str) -> Refusal | None:
        """The supervisor's admission of a new session (:meth:`SessionLedger.claim`)."""
        assert self.link is not None
        try:
            reply = await self.link.request({"op": "claim", "session": session_id, "client": client}, CLAIM_TIMEOUT_S)
        except BaseException:  # cancelled, timed out, link lost: a claim made meanwhile must not stay
            self.release(session_id)
            raise
        return Refusal(str(reply["code"]), str(reply.get("message", ""))) if "code" in reply else None

    def release(self, session_id: str) -> None:
        assert self.link is not None
        self.link.tell({"op": "release", "session": session_id})

    async def gather(self, what: str) -> tuple[list[Message], int]:
        """Every live process's report of ``what`` (this one's included), and how many processes the gateway should have."""
        assert self.link is not None
        reply = await self.link.request({"op": "gather", "what": what}, GATHER_TIMEOUT_S)
        return list(reply["reports"]), int(reply["expected"])

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
