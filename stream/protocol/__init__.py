"""The gateway<->worker protocol, sans I/O.

- :mod:`.messages`: typed JSON control messages.
- :mod:`.frames`: binary media frames with a fixed 16-byte header.
- :mod:`.codec`: stateless bytes <-> message conversion under hard size limits.
- :mod:`.connection`: the per-connection state machine (hello, auth, job lifecycle).
- :mod:`.auth`: the HMAC proofs with which gateway and worker authenticate each other.
- :mod:`.jobs`: kind-specific job parameters and results.
"""

from .codec import DEFAULT_LIMITS, Limits, decode_message, encode_message
from .connection import Connection, JobPhase, LocalProtocolError, Role
from .errors import ErrorCode, ProtocolError
from .frames import HEADER_SIZE, MediaFormat, MediaFrame, decode_frame, encode_frame
from .messages import (
    PROTOCOL_VERSION,
    Auth,
    AuthOk,
    Error,
    Hello,
    JobCancel,
    JobDone,
    JobEnd,
    JobFlush,
    JobResult,
    JobStart,
    JobText,
    LoadReport,
    LoadRequest,
    Message,
    WorkerKind,
)

__all__ = [
    "DEFAULT_LIMITS",
    "HEADER_SIZE",
    "PROTOCOL_VERSION",
    "Auth",
    "AuthOk",
    "Connection",
    "Error",
    "ErrorCode",
    "Hello",
    "JobCancel",
    "JobDone",
    "JobEnd",
    "JobFlush",
    "JobPhase",
    "JobResult",
    "JobStart",
    "JobText",
    "Limits",
    "LoadReport",
    "LoadRequest",
    "LocalProtocolError",
    "MediaFormat",
    "MediaFrame",
    "Message",
    "ProtocolError",
    "Role",
    "WorkerKind",
    "decode_frame",
    "decode_message",
    "encode_frame",
    "encode_message",
]
