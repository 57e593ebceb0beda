"""What happens to a conversation: the events :class:`~gateway.conversation.Conversation` takes in.

Small frozen dataclasses, as Pipecat's frames are. Four sources:

- the person: the turn events of :mod:`gateway.turns` (speech started,
  audio, paused, resumed, ended), the camera (:class:`CameraFrame`), and
  what they send on the events channel (:class:`TypedQuestion`,
  :class:`InterruptAnswer`);
- the workers, through the runner: :class:`JobStarted`, one result type per
  kind, :class:`JobFinished` and :class:`JobFailed`, each naming its
  :class:`JobRef`;
- the answer track: :class:`Playing` and :class:`PlayoutIdle`;
- the clock: :class:`Tick`, when :meth:`Conversation.next_timer` is due.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stream.protocol import MediaFormat, WorkerKind
from stream.protocol.jobs import VisionResult

from ..turns import SpeechAudio, SpeechEnded, SpeechPaused, SpeechResumed, SpeechStarted, TurnEvent

ModelPin = tuple[str, str]
"""(model id, sha256): a conversation keeps one model per kind."""


@dataclass(frozen=True, slots=True)
class JobRef:
    """One job on one worker. A job moved to another worker after a failure gets a new ref."""

    kind: WorkerKind
    serial: int
    """Unique within the conversation."""

    def __str__(self) -> str:
        return f"{self.kind.value}#{self.serial}"


@dataclass(frozen=True, slots=True)
class JobStarted:
    """The runner leased a worker for ``job`` and opened the job there."""

    job: JobRef
    worker: str
    model: ModelPin


@dataclass(frozen=True, slots=True)
class Transcript:
    """An STT result: a partial, the answer to a ``job.flush`` (``flushed``), or the final one."""

    job: JobRef
    text: str
    final: bool = False
    flushed: bool = False


@dataclass(frozen=True, slots=True)
class Token:
    """The next piece of the LLM's answer."""

    job: JobRef
    text: str


@dataclass(frozen=True, slots=True)
class Speech:
    """Synthesized audio of the TTS job's current piece (mono int16)."""

    job: JobRef
    samples: np.ndarray = field(repr=False)
    sample_rate: int


@dataclass(frozen=True, slots=True)
class PieceSpoken:
    """The TTS job has sent all audio of one piece of text."""

    job: JobRef
    text: str


@dataclass(frozen=True, slots=True)
class Seen:
    """A vision result."""

    job: JobRef
    result: VisionResult


@dataclass(frozen=True, slots=True)
class JobFinished:
    """The job completed on its worker."""

    job: JobRef
    stats: dict[str, float] = field(default_factory=dict)


NO_WORKER = "no_worker"
""":attr:`JobFailed.code` when no worker of the kind could be leased."""


@dataclass(frozen=True, slots=True)
class JobFailed:
    """The job failed: refused, failed by its worker, its link lost or stalled, or no worker at all.

    ``code`` is a protocol :class:`~stream.protocol.ErrorCode` value, or
    :data:`NO_WORKER`; ``worker`` is the worker it was on (``None``: none).
    """

    job: JobRef
    code: str
    message: str
    worker: str | None = None


@dataclass(frozen=True, slots=True)
class CameraFrame:
    """The camera's latest frame, encoded, as asked for by ``LookAtCamera``."""

    turn: int
    data: bytes = field(repr=False)
    format: MediaFormat = MediaFormat.JPEG
    periodic: bool = False
    """Taken on ``vision_interval_s``, not at the start of a turn."""


@dataclass(frozen=True, slots=True)
class TypedQuestion:
    """The person typed a question (``ask`` on the events channel): a turn of its own."""

    text: str


@dataclass(frozen=True, slots=True)
class InterruptAnswer:
    """The person asked the answer to stop (``interrupt`` on the events channel)."""


@dataclass(frozen=True, slots=True)
class Playing:
    """The answer track sent the first frame of ``piece`` of ``turn``'s answer at ``at``."""

    turn: int
    piece: int
    at: float


@dataclass(frozen=True, slots=True)
class PlayoutIdle:
    """The answer track has played everything it was given of ``turn``'s answer."""

    turn: int


@dataclass(frozen=True, slots=True)
class WorkerFreed:
    """A slot of the kind ``ticket`` waits for may be free: it is this job's turn to ask again."""

    ticket: JobRef


@dataclass(frozen=True, slots=True)
class LineFull:
    """``ticket`` found the waiting line of its kind full (``waiting`` jobs in it): it fails now."""

    ticket: JobRef
    waiting: int


@dataclass(frozen=True, slots=True)
class Tick:
    """The clock reached :meth:`Conversation.next_timer`."""


JobEvent = JobStarted | Transcript | Token | Speech | PieceSpoken | Seen | JobFinished | JobFailed
Input = TurnEvent | JobEvent | CameraFrame | TypedQuestion | InterruptAnswer | Playing | PlayoutIdle | WorkerFreed | LineFull | Tick

__all__ = [
    "NO_WORKER",
    "CameraFrame",
    "Input",
    "InterruptAnswer",
    "JobEvent",
    "JobFailed",
    "JobFinished",
    "JobRef",
    "JobStarted",
    "LineFull",
    "ModelPin",
    "PieceSpoken",
    "Playing",
    "PlayoutIdle",
    "Seen",
    "Speech",
    "SpeechAudio",
    "SpeechEnded",
    "SpeechPaused",
    "SpeechResumed",
    "SpeechStarted",
    "Tick",
    "Token",
    "Transcript",
    "TurnEvent",
    "TypedQuestion",
    "WorkerFreed",
]
