"""Stateless encoding of control messages: text in, typed message out, and back.

Decoding checks, in order: size, JSON syntax, object shape, version, type, and
then every field against :mod:`.messages`. Each failure raises
:class:`~stream.protocol.errors.ProtocolError` with the code to send back; no
other exception escapes for any input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import ValidationError

from .errors import ErrorCode, ProtocolError
from .messages import MESSAGE_ADAPTER, MESSAGE_TYPES, PROTOCOL_VERSION, Message


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard size limits, enforced before anything is parsed."""

    max_text_bytes: int = 256 * 1024
    """A JSON control message (an LLM job carries its conversation history)."""
    max_frame_bytes: int = 4 * 1024 * 1024
    """A binary media frame, header included (a PNG or a raw 640x480 RGB frame fits)."""


DEFAULT_LIMITS = Limits()


def encode_message(message: Message) -> str:
    """Serialize ``message`` as compact JSON text."""
    return message.model_dump_json()


def decode_message(text: str | bytes, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parse one text frame into a typed message."""
    size = len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    if size > limits.max_text_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"text frame of {size} bytes exceeds {limits.max_text_bytes}")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(ErrorCode.MALFORMED, f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "a message must be a JSON object")
    version = obj.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind!r}")
    try:
        return MESSAGE_ADAPTER.validate_python(obj)
    except ValidationError as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"bad {kind!r} message: {_summarize(exc)}", _job_id_of(obj)) from None
    except RecursionError:
        raise ProtocolError(ErrorCode.MALFORMED, f"bad {kind!r} message: nested too deeply") from None


def _summarize(exc: ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "message"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def _job_id_of(obj: dict[str, object]) -> int | None:
    job_id = obj.get("job_id")
    return job_id if isinstance(job_id, int) and 1 <= job_id < 2**32 else None
