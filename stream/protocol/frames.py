"""Binary media frames of the worker protocol.

A WebSocket binary frame is a 16-byte header followed by the payload::

    0       1       2               4               8              12              16
    +-------+-------+---------------+---------------+---------------+---------------+
    | ver=1 | format|   channels    |    job id     |   sequence    |  sample rate  |
    +-------+-------+---------------+---------------+---------------+---------------+
    | payload ...

All integers are unsigned, big-endian. ``channels`` and ``sample rate`` describe
PCM audio and are zero for images. The header is fixed so that a worker can
route a frame to its job without parsing anything else.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .errors import ErrorCode, ProtocolError

FRAME_VERSION = 1
HEADER = struct.Struct("!BBHIII")
HEADER_SIZE = HEADER.size  # 16


class MediaFormat(enum.IntEnum):
    """What a frame's payload is."""

    PCM_S16LE = 1
    """Signed 16-bit little-endian PCM, channels interleaved."""
    JPEG = 2
    PNG = 3
    RGB24 = 4
    """Raw 8-bit RGB pixels, row-major; width and height come in the job's params."""


IMAGE_FORMATS = frozenset({MediaFormat.JPEG, MediaFormat.PNG, MediaFormat.RGB24})


@dataclass(frozen=True, slots=True)
class MediaFrame:
    """One binary frame: a piece of a job's media input or output."""

    job_id: int
    seq: int
    format: MediaFormat
    payload: bytes
    channels: int = 0
    sample_rate: int = 0

    @property
    def audio_seconds(self) -> float:
        """Duration of a PCM payload; 0 for images."""
        if self.format is not MediaFormat.PCM_S16LE or not self.channels or not self.sample_rate:
            return 0.0
        return len(self.payload) / (2 * self.channels * self.sample_rate)


def encode_frame(frame: MediaFrame) -> bytes:
    """Serialize ``frame`` (header + payload)."""
    header = HEADER.pack(FRAME_VERSION, frame.format, frame.channels, frame.job_id, frame.seq, frame.sample_rate)
    return header + frame.payload


def decode_frame(data: bytes, max_frame_bytes: int) -> MediaFrame:
    """Parse one binary frame; raise :class:`ProtocolError` for anything malformed."""
    if len(data) > max_frame_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"binary frame of {len(data)} bytes exceeds {max_frame_bytes}")
    if len(data) < HEADER_SIZE:
        raise ProtocolError(ErrorCode.MALFORMED, f"binary frame of {len(data)} bytes is shorter than its header")
    version, fmt, channels, job_id, seq, sample_rate = HEADER.unpack_from(data)
    if version != FRAME_VERSION:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"binary frame version {version}, expected {FRAME_VERSION}")
    try:
        media_format = MediaFormat(fmt)
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_FORMAT, f"unknown media format {fmt}", job_id or None) from None
    if job_id == 0:
        raise ProtocolError(ErrorCode.MALFORMED, "binary frame with job id 0")
    payload = bytes(data[HEADER_SIZE:])
    if media_format is MediaFormat.PCM_S16LE:
        if not channels or not sample_rate:
            raise ProtocolError(ErrorCode.BAD_FORMAT, "PCM frame without channels or sample rate", job_id)
        if len(payload) % (2 * channels):
            raise ProtocolError(ErrorCode.BAD_FORMAT, "PCM payload is not a whole number of samples", job_id)
    return MediaFrame(job_id, seq, media_format, payload, channels, sample_rate)
