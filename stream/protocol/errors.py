"""The one error type of the worker protocol, and its codes."""

from __future__ import annotations

import enum


class ErrorCode(str, enum.Enum):
    """Why a message, a frame or a job was refused.

    The value is what travels in an ``error`` message, so a peer written in any
    language can act on it.
    """

    MALFORMED = "malformed"
    """Not valid JSON, a bad binary header, or fields of the wrong shape."""
    TOO_LARGE = "too_large"
    """A frame or message over the protocol's size limits."""
    UNKNOWN_TYPE = "unknown_type"
    """A JSON message whose ``type`` this protocol version does not define."""
    BAD_VERSION = "bad_version"
    """A message for a protocol version this peer does not speak."""
    BAD_STATE = "bad_state"
    """A message that is valid but not allowed now (data before hello, ...)."""
    UNKNOWN_JOB = "unknown_job"
    """Data, end or cancel for a job that is not open on this connection."""
    JOB_ID_REUSED = "job_id_reused"
    """A job id not greater than every job id used before on this connection."""
    BAD_PARAMS = "bad_params"
    """Job parameters that the worker's kind does not accept."""
    BAD_FORMAT = "bad_format"
    """Media in a format the job cannot take (wrong rate, channels, codec)."""
    LIMIT = "limit"
    """A per-job limit was hit (utterance length, tokens, text size)."""
    UNAUTHORIZED = "unauthorized"
    """No valid proof of the shared key (or none asked for where one is required)."""
    BUSY = "busy"
    """The worker is at capacity; try another worker."""
    INTERNAL = "internal"
    """The worker failed while running the job."""


class ProtocolError(Exception):
    """Anything a peer sent that cannot be accepted.

    ``code`` is sent back to the peer in an ``error`` message; ``job_id`` names
    the job it concerns, or is ``None`` for the connection as a whole.
    """

    def __init__(self, code: ErrorCode, message: str, job_id: int | None = None) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.job_id = job_id
