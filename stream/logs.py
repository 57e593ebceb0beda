"""Log records that say which session, turn and job they are about.

Three context variables hold the ids of what the running code works on:
``session`` (a gateway session), ``turn`` (``<session>.<n>``, unique across
the system) and ``job`` (``<kind>/<job id>`` as the gateway's worker link and
the worker number it). asyncio copies the context into every task it creates,
so a task started for a turn logs that turn's id without passing it around.

The gateway sends the turn id to the worker in ``job.start`` (``trace``); the
worker sets it for the job's task, so ``grep <turn id>`` over the logs of the
gateway and the workers follows one turn across processes.

:func:`install` adds the ids to every :class:`logging.LogRecord` (as
attributes ``session``, ``turn`` and ``job``, ``None`` when unset);
:func:`configure` sets up a process's handler, as plain text or as one JSON
object per line (python-json-logger).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Literal

session_id: ContextVar[str | None] = ContextVar("edgestream_session", default=None)
turn_id: ContextVar[str | None] = ContextVar("edgestream_turn", default=None)
job_id: ContextVar[str | None] = ContextVar("edgestream_job", default=None)

CONTEXT_FIELDS = ("session", "turn", "job")
LogFormat = Literal["text", "json"]

_base_factory = logging.getLogRecordFactory()
_installed = False


def _record_with_context(*args: object, **kwargs: object) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    record.session = session_id.get()
    record.turn = turn_id.get()
    record.job = job_id.get()
    return record


def install() -> None:
    """Make every log record carry the current session, turn and job ids (idempotent)."""
    global _installed
    if not _installed:
        logging.setLogRecordFactory(_record_with_context)
        _installed = True


def peer_label(address: tuple[object, ...] | None) -> str:
    """``host:port`` of a socket's peer for log lines; ``?`` when the socket does not know it."""
    return f"{address[0]}:{address[1]}" if address else "?"


def turn_label(session: str, number: int) -> str:
    """The system-wide id of turn ``number`` of ``session``."""
    return f"{session}.{number}"


@contextlib.contextmanager
def bound(*, session: str | None = None, turn: str | None = None, job: str | None = None) -> Iterator[None]:
    """Set ids for the code inside the ``with`` block (and the tasks it creates)."""
    tokens = []
    for var, value in ((session_id, session), (turn_id, turn), (job_id, job)):
        if value is not None:
            tokens.append((var, var.set(value)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class TextFormatter(logging.Formatter):
    """``time level logger: message [session=... turn=... job=...]`` (only the ids that are set)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = " ".join(f"{name}={value}" for name in CONTEXT_FIELDS if (value := getattr(record, name, None)) is not None)
        return f"{text} [{ids}]" if ids else text


def json_formatter() -> logging.Formatter:
    """One JSON object per record: time, level, logger, message, and the ids."""
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s %(session)s %(turn)s %(job)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
    )


def configure(format: LogFormat = "text", level: str = "INFO") -> None:
    """Log to stderr in ``format`` at ``level``, with the context ids (a process's one call)."""
    install()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_formatter() if format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aioice").setLevel(logging.WARNING)
    # websockets logs every connection's open and close (and every failed handshake) at INFO:
    # three lines for each refused signaling connection, thousands under a slowloris. What
    # matters about a connection is logged by the gateway or worker itself, once.
    logging.getLogger("websockets.server").setLevel(logging.WARNING)
