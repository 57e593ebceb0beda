"""What a client may send the gateway on the events data channel (JSON, one per message).

The channel is mostly gateway-to-client (``gateway/events.py``); a client
may send two things:

- ``{"type": "ask", "text": "..."}``: a typed question, answered like a
  spoken one (in text and speech), as a turn of its own. Refused while a
  spoken question is still being heard (``still_listening``).
- ``{"type": "interrupt"}``: stop the answer now (as speaking over it does).
  Nothing to interrupt: nothing happens.

Every message counts against the session's message rate (``gateway/session.py``).
A message that is not one of these gets an ``error`` event with a code the
client can act on, and the session goes on.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

MAX_MESSAGE_BYTES = 8 * 1024
"""A message longer than this is refused unread (aiortc has already buffered it: one message's worth)."""
MAX_QUESTION_CHARS = 1000
"""A typed question longer than this is refused: a spoken one is cut at ``max_utterance_s``, about as long."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Ask(_Message):
    type: Literal["ask"] = "ask"
    text: Annotated[str, Field(min_length=1, max_length=MAX_QUESTION_CHARS)]


class Interrupt(_Message):
    type: Literal["interrupt"] = "interrupt"


ClientMessage = Annotated[Ask | Interrupt, Field(discriminator="type")]
_adapter: TypeAdapter[Ask | Interrupt] = TypeAdapter(ClientMessage)


class BadMessage(ValueError):
    """A message the gateway cannot take: ``code`` and the sentence the client is told."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse(data: str | bytes) -> Ask | Interrupt:
    """The message in ``data``; raises :class:`BadMessage` (never anything else)."""
    if isinstance(data, bytes):
        raise BadMessage("malformed_message", "the events channel takes text messages (JSON), not binary ones")
    if len(data.encode("utf-8", "replace")) > MAX_MESSAGE_BYTES:
        raise BadMessage("message_too_large", f"a message on the events channel may be {MAX_MESSAGE_BYTES} bytes at most")
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested thousands deep
        raise BadMessage("malformed_message", "not JSON") from None
    if not isinstance(raw, dict):
        raise BadMessage("malformed_message", "a message is a JSON object with a 'type'")
    if raw.get("type") not in ("ask", "interrupt"):
        raise BadMessage("unknown_message", f"unknown message type {raw.get('type')!r}: a client may send 'ask' or 'interrupt'")
    try:
        return _adapter.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if first["type"] == "string_too_long":
            raise BadMessage("question_too_long", f"a typed question may be {MAX_QUESTION_CHARS} characters at most") from None
        if first["type"] == "string_too_short":
            raise BadMessage("malformed_message", "'ask' needs a question in 'text'") from None
        where = ".".join(str(part) for part in first["loc"][1:]) or "message"
        raise BadMessage("malformed_message", f"{raw['type']}: {where}: {first['msg']}") from None
