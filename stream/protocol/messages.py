"""Typed control messages of the worker protocol (the JSON text frames).

Every message is a JSON object with ``v`` (the protocol version) and ``type``.
The models here are the single definition of what each message may carry; the
codec (:mod:`stream.protocol.codec`) turns them into text and back, and the
state machine (:mod:`stream.protocol.connection`) decides when each is allowed.

Direction of each message:

========================  ==================  ==========================================
type                      sent by             meaning
========================  ==================  ==========================================
``hello``                 worker              first message: who the worker is
``auth``                  client              proof of the shared key (when hello asks)
``auth.ok``               worker              the worker's own proof; jobs may start
``job.start``             client (gateway)    open a job; kind-specific ``params``
``job.text``              client              a piece of text input (TTS)
``job.flush``             client              results for the input so far, now (STT)
``job.end``               client              no more input for this job
``job.cancel``            client              stop the job as soon as possible
``job.result``            worker              one streamed result, numbered by ``seq``
``job.done``              worker              the job finished (complete or cancelled)
``error``                 either              a refused message or a failed job
``load.request``          client              ask for a ``load.report`` now
``load.report``           worker              jobs running and queued, service rate
========================  ==================  ==========================================

Media (audio, images) never travels in JSON: see :mod:`stream.protocol.frames`.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from .errors import ErrorCode

PROTOCOL_VERSION: Final = 1
"""The version every message carries in ``v``; a peer refuses any other."""

MAX_JOB_ID = 2**32 - 1
JobId = Annotated[int, Field(ge=1, le=MAX_JOB_ID)]
Seq = Annotated[int, Field(ge=0, le=2**32 - 1)]
ShortText = Annotated[str, Field(max_length=256)]
Nonce = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Proof = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class WorkerKind(str, enum.Enum):
    """What a worker does; a job names the kind it is meant for."""

    STT = "stt"
    LLM = "llm"
    TTS = "tts"
    VISION = "vision"


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = PROTOCOL_VERSION


class Hello(_Message):
    """The worker's first message on a connection: its identity and model."""

    type: Literal["hello"] = "hello"
    worker_id: ShortText
    kind: WorkerKind
    model_id: ShortText
    model_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    capacity: Annotated[int, Field(ge=1, le=1024)]
    software: ShortText
    max_text_bytes: Annotated[int, Field(ge=1)]
    max_frame_bytes: Annotated[int, Field(ge=1)]
    challenge: Nonce | None = None
    """Set by a worker that holds a key: the client must answer ``auth`` before anything else
    (:mod:`.auth`). ``None``: the worker takes jobs from anyone who can reach it."""


class Auth(_Message):
    """The client's answer to the hello's challenge: its nonce and its proof of the key."""

    type: Literal["auth"] = "auth"
    nonce: Nonce
    proof: Proof


class AuthOk(_Message):
    """The worker accepted the client's proof; its own proof lets the client check the worker."""

    type: Literal["auth.ok"] = "auth.ok"
    proof: Proof


class JobStart(_Message):
    """Open job ``job_id`` (greater than every id used before on this connection)."""

    type: Literal["job.start"] = "job.start"
    job_id: JobId
    kind: WorkerKind
    params: dict[str, Any] = Field(default_factory=dict)
    trace: Annotated[str, Field(max_length=128, pattern=r"^[A-Za-z0-9._:/@-]*$")] | None = None
    """What the job is part of (the gateway sends its turn id), for the worker's logs; no effect on the job."""


class JobText(_Message):
    """A piece of text input; pieces are joined in ``seq`` order."""

    type: Literal["job.text"] = "job.text"
    job_id: JobId
    seq: Seq
    text: str


class JobFlush(_Message):
    """Produce a result for all input sent so far, now, and keep the job open.

    STT answers with a transcript of the whole utterance so far
    (``SttResult.flushed``): the gateway sends it when the person pauses, so
    the transcript it may answer is decoded while the pause is still being
    confirmed, and if speech resumes the same job simply goes on. Each flush is
    answered by exactly one flushed result, in order; flushes that come while
    the worker is still decoding an earlier one are answered together, by the
    transcript of one decode of all the audio up to the latest (one decode in
    flight per job, however often the person pauses). Kinds that produce
    results from each input anyway (TTS, vision, LLM) ignore it.
    """

    type: Literal["job.flush"] = "job.flush"
    job_id: JobId


class JobEnd(_Message):
    """The client has sent all input of the job."""

    type: Literal["job.end"] = "job.end"
    job_id: JobId


class JobCancel(_Message):
    """Stop the job; the worker answers ``job.done`` with reason ``cancelled``."""

    type: Literal["job.cancel"] = "job.cancel"
    job_id: JobId


class JobResult(_Message):
    """One streamed result of a job. ``data`` is kind-specific (see :mod:`.jobs`)."""

    type: Literal["job.result"] = "job.result"
    job_id: JobId
    seq: Seq
    data: dict[str, Any]


class JobDone(_Message):
    """The job is over; no further result or frame of it follows."""

    type: Literal["job.done"] = "job.done"
    job_id: JobId
    reason: Literal["complete", "cancelled"]
    stats: dict[str, float] = Field(default_factory=dict)


class Error(_Message):
    """A refused message (``job_id`` null) or a failed job (the job is over)."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: Annotated[str, Field(max_length=1024)]
    job_id: JobId | None = None


class LoadRequest(_Message):
    """Ask the worker for a ``load.report`` now."""

    type: Literal["load.request"] = "load.request"


class LoadReport(_Message):
    """The worker's load, sent on request and periodically.

    ``service_rate`` is work done per second of compute, in ``rate_unit``
    (audio seconds for STT and TTS, tokens for the LLM, frames for vision),
    as an exponentially weighted moving average over recent jobs.
    """

    type: Literal["load.report"] = "load.report"
    running: Annotated[int, Field(ge=0)]
    queued: Annotated[int, Field(ge=0)]
    capacity: Annotated[int, Field(ge=1)]
    service_rate: Annotated[float, Field(ge=0)]
    rate_unit: ShortText
    jobs_completed: Annotated[int, Field(ge=0)]
    own_jobs: Annotated[int, Field(ge=0)] = 0
    """Jobs of the connection this report is sent on (running or queued), so a
    client can tell its own load from other clients' exactly."""


Message = Annotated[
    Hello | Auth | AuthOk | JobStart | JobText | JobFlush | JobEnd | JobCancel | JobResult | JobDone | Error | LoadRequest | LoadReport,
    Field(discriminator="type"),
]
MESSAGE_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)
MESSAGE_TYPES: dict[str, type[_Message]] = {
    cls.model_fields["type"].default: cls
    for cls in (Hello, Auth, AuthOk, JobStart, JobText, JobFlush, JobEnd, JobCancel, JobResult, JobDone, Error, LoadRequest, LoadReport)
}

SENT_BY_WORKER = frozenset({Hello, AuthOk, JobResult, JobDone, Error, LoadReport})
SENT_BY_CLIENT = frozenset({Auth, JobStart, JobText, JobFlush, JobEnd, JobCancel, Error, LoadRequest})
