"""What a conversation asks for: the commands :class:`~gateway.conversation.Conversation` gives out.

Small frozen dataclasses; the asyncio runner (``gateway/runner.py``) carries
them out in order, without waiting on the network: job commands go to the
job's own sender, playout and events are immediate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel

from stream.protocol import MediaFormat, WorkerKind

from ..events import Event
from ..selection import Job as Placement
from .inputs import JobRef, ModelPin


@dataclass(frozen=True, slots=True)
class StartJob:
    """Lease a worker for ``job`` (the policy places ``placement``) and open the job there."""

    job: JobRef
    params: BaseModel
    placement: Placement
    model: ModelPin | None = None
    """Only workers serving this model (the conversation's, once it has one)."""
    exclude: frozenset[str] = frozenset()
    """Workers this job already failed on."""
    trace: str = ""
    """The turn id, for the workers' logs."""


@dataclass(frozen=True, slots=True)
class SendAudio:
    job: JobRef
    samples: np.ndarray = field(repr=False)
    """16 kHz mono int16."""


@dataclass(frozen=True, slots=True)
class SendText:
    job: JobRef
    text: str


@dataclass(frozen=True, slots=True)
class SendImage:
    job: JobRef
    data: bytes = field(repr=False)
    format: MediaFormat


@dataclass(frozen=True, slots=True)
class FlushInput:
    """``job.flush``: a result for everything sent so far, now."""

    job: JobRef


@dataclass(frozen=True, slots=True)
class EndInput:
    job: JobRef


@dataclass(frozen=True, slots=True)
class CancelJob:
    """Stop the job on its worker; nothing more of it reaches the conversation."""

    job: JobRef


@dataclass(frozen=True, slots=True)
class WaitForWorker:
    """Stand ``ticket`` (the attempt refused as busy) in the waiting line of ``kind``, as waiting
    since ``since``; when a slot may be free it comes back as ``WorkerFreed`` (``gateway/admission.py``)."""

    ticket: JobRef
    kind: WorkerKind
    since: float


@dataclass(frozen=True, slots=True)
class StopWaiting:
    """``ticket`` leaves the waiting line (it asks again on its own timer, gave up, or was cancelled)."""

    ticket: JobRef
    kind: WorkerKind


@dataclass(frozen=True, slots=True)
class Play:
    """Queue synthesized audio of ``piece`` of ``turn``'s answer on the answer track."""

    turn: int
    piece: int
    samples: np.ndarray = field(repr=False)
    sample_rate: int


@dataclass(frozen=True, slots=True)
class Unplay:
    """Drop the queued, not yet played audio of ``piece`` (it will be synthesized again)."""

    turn: int
    piece: int


@dataclass(frozen=True, slots=True)
class StopPlayback:
    """Barge-in: drop everything queued on the answer track; the next frame is silence."""


@dataclass(frozen=True, slots=True)
class Emit:
    """Send an event to the client."""

    event: Event


@dataclass(frozen=True, slots=True)
class LookAtCamera:
    """Encode the camera's latest frame and hand it back as ``CameraFrame`` (if there is one)."""

    turn: int
    periodic: bool = False


@dataclass(frozen=True, slots=True)
class CountTurn:
    """A turn ended: ``answered``, ``interrupted``, ``failed``, ``empty`` or ``merged`` (into the next)."""

    outcome: str


@dataclass(frozen=True, slots=True)
class CountFailover:
    kind: WorkerKind


@dataclass(frozen=True, slots=True)
class ObserveStages:
    """One answered turn's latency marks, ms from the end of speech."""

    marks: dict[str, float]


JobCommand = StartJob | SendAudio | SendText | SendImage | FlushInput | EndInput | CancelJob
Command = JobCommand | WaitForWorker | StopWaiting | Play | Unplay | StopPlayback | Emit | LookAtCamera | CountTurn | CountFailover | ObserveStages
