"""The Wyoming protocol's framing, sans I/O: bytes in, events out; events in, bytes out.

Wyoming (Home Assistant's protocol for voice services: ``wyoming-faster-whisper``,
``wyoming-piper``, satellites) sends one event as a JSON header line, then
optional JSON data bytes, then optional binary payload bytes::

    {"type": "audio-chunk", "data_length": 41, "payload_length": 2048, "version": "1.10.2"}\\n
    {"rate": 16000, "width": 2, "channels": 1}<2048 bytes of PCM>

The ``wyoming`` library writes the data after the line (``data_length``);
older writers put it inside the line (``data``). :class:`Decoder` reads both,
and merges them when both are there, as the library does.

Written here rather than taken from the ``wyoming`` library because its
reader has no limits: a peer can send a header line or a ``payload_length``
of any size and it is buffered whole. Here every part is bounded
(``MAX_LINE_BYTES``, ``MAX_DATA_BYTES``, ``MAX_PAYLOAD_BYTES``), a peer that
exceeds one gets :class:`WyomingError` and nothing more is read from it, and
the worst case a connection can hold is one line plus one payload: about
5.1 MB. Tests check the codec against the library's own reader and writer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MAX_LINE_BYTES = 64 * 1024
MAX_DATA_BYTES = 1024 * 1024
"""wyoming-piper's `info` lists its whole voice catalog: about 100 KB."""
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
"""About 2 minutes of 16 kHz mono PCM in one chunk; Wyoming peers send ~1 KB-64 KB chunks."""
VERSION = "1.10.2"
"""The protocol version this speaks (the ``wyoming`` library's, which the tests run against)."""


class WyomingError(ValueError):
    """A peer broke the framing (or a limit): the connection is to be closed."""


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    data: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""


def encode(event: Event) -> bytes:
    """The bytes of ``event``, as the ``wyoming`` library writes them (data after the line)."""
    header: dict[str, Any] = {"type": event.type, "version": VERSION}
    data = json.dumps(event.data, ensure_ascii=False).encode() if event.data else b""
    if data:
        header["data_length"] = len(data)
    if event.payload:
        header["payload_length"] = len(event.payload)
    return json.dumps(header, ensure_ascii=False).encode() + b"\n" + data + event.payload


class Decoder:
    """Events from a byte stream, one :meth:`feed` at a time (a partial event waits for the rest)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._header: dict[str, Any] | None = None
        self._data_length = 0
        self._payload_length = 0
        self._broken: WyomingError | None = None

    def feed(self, data: bytes) -> list[Event]:
        """The events completed by ``data``; raises :class:`WyomingError` (now and on every later call)."""
        if self._broken is not None:
            raise self._broken
        self._buffer += data
        events: list[Event] = []
        try:
            while (event := self._next()) is not None:
                events.append(event)
        except WyomingError as exc:
            self._broken = exc
            self._buffer.clear()
            raise
        return events

    def _next(self) -> Event | None:
        if self._header is None:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE_BYTES:
                    raise WyomingError(f"a header line longer than {MAX_LINE_BYTES} bytes")
                return None
            if end > MAX_LINE_BYTES:
                raise WyomingError(f"a header line longer than {MAX_LINE_BYTES} bytes")
            self._header = _header(bytes(self._buffer[:end]))
            del self._buffer[: end + 1]
            self._data_length = _length(self._header, "data_length", MAX_DATA_BYTES)
            self._payload_length = _length(self._header, "payload_length", MAX_PAYLOAD_BYTES)
        if len(self._buffer) < self._data_length + self._payload_length:
            return None
        header, self._header = self._header, None
        data = dict(header.get("data") or {})
        if self._data_length:
            try:
                extra = json.loads(self._buffer[: self._data_length])
            except (ValueError, RecursionError):  # RecursionError: nested thousands deep
                raise WyomingError("its data is not JSON") from None
            if not isinstance(extra, dict):
                raise WyomingError("its data is not a JSON object")
            data.update(extra)
        start = self._data_length
        payload = bytes(self._buffer[start : start + self._payload_length])
        del self._buffer[: start + self._payload_length]
        return Event(header["type"], data, payload)


def _header(line: bytes) -> dict[str, Any]:
    try:
        header = json.loads(line)
    except (ValueError, RecursionError):
        raise WyomingError("a header line that is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str) or not header["type"]:
        raise WyomingError("a header without a 'type'")
    if not isinstance(header.get("data", {}), dict | None):
        raise WyomingError("a header whose 'data' is not an object")
    return header


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key) or 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise WyomingError(f"{key} is not a length: {value!r}")
    if value > limit:
        raise WyomingError(f"{key} {value} is over the limit of {limit} bytes")
    return value
