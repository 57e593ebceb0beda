"""What a job does when its worker dies, disconnects, stalls or is full (pure rules).

The conversation (``gateway/conversation/``) applies the per-kind rules, the
worker job (``gateway/worker_job.py``) the deadline; both are the same for
every kind of job.

The person keeps the turn: the job moves to the next best worker (one not
tried yet for it) and carries on from where the lost one was:

- STT: the new job hears the whole utterance again, from the buffered audio
  (pre-roll included), and is flushed or ended at once if the person already
  paused or stopped.
- LLM: the new job continues the answer after the text already sent, which is
  neither generated nor spoken twice.
- TTS: the answer resumes at the first piece not completely spoken; what was
  queued of that piece and not yet played is dropped, and the piece is
  synthesized again from its start.
- Vision: the frame is sent again.

A job moves only for the worker's faults (a lost link, a stall, an internal
error); a job the worker refused as invalid would be refused anywhere. A
worker that is full (``busy``) is not at fault: the job waits in line for a
slot (``gateway/admission.py``) and asks again (any worker, that one
included), for up to ``busy_wait_s``; the client hears ``waiting``.

The deadline (:class:`Watchdog`): a job that owes output (a transcript after
a flush or the end of the utterance, the next token, the audio of a piece
sent, a vision result) and has had none for ``deadline_s`` is stalled, and
moves if another worker could take it. A slow worker that is the only one
left is waited for, up to ``STALL_PATIENCE`` deadlines, rather than losing
the turn.
"""

from __future__ import annotations

import numpy as np

from stream.protocol import ErrorCode
from stream.protocol.jobs import LlmParams

MAX_WORKERS_PER_JOB = 3
"""Workers tried for one job before the turn reports an error."""

WORKER_FAULTS = frozenset({ErrorCode.INTERNAL.value})
"""Error codes that are the worker's fault, not the job's (a lost link or a stall is reported as ``internal``)."""

BUSY = ErrorCode.BUSY.value
BUSY_WAIT_S = 30.0
"""How long a job keeps asking full workers before the turn reports an error (the default of ``busy_wait_s``)."""

STALL_PATIENCE = 4
"""Deadlines a job waits on a slow worker when there is no other worker to move it to."""


def fails_over(code: str, workers_tried: int) -> bool:
    """Whether a job that failed with ``code`` moves to another worker."""
    return code in WORKER_FAULTS and workers_tried < MAX_WORKERS_PER_JOB


def busy_retry_in(retries: int, waited_s: float, wait_s: float = BUSY_WAIT_S) -> float | None:
    """Seconds until a job refused as ``busy`` asks again on its own (50 ms, doubling to 400 ms),
    or ``None`` once it has waited ``wait_s``. (A slot freed by this gateway wakes it sooner:
    ``gateway/admission.py``.)"""
    if waited_s >= wait_s:
        return None
    return min(0.05 * 2**retries, 0.4)


def stt_replay(heard: list[np.ndarray]) -> np.ndarray:
    """Everything heard in the turn so far, in order, for the new STT job."""
    return np.concatenate(heard) if heard else np.zeros(0, np.int16)


def llm_continuation(params: LlmParams, sent: str, tokens_sent: int) -> LlmParams:
    """The same request, continuing after the ``tokens_sent`` tokens of ``sent`` already streamed."""
    if not sent:
        return params
    remaining = max(1, params.max_tokens - tokens_sent)
    return params.model_copy(update={"answer_prefix": params.answer_prefix + sent, "max_tokens": remaining})


class Watchdog:
    """The one deadline rule, for a job of any kind (pure: the caller gives the time).

    The job *owes* output from the moment it was given something to answer
    (:meth:`owe`) until it has answered all of it (:meth:`settled`); every
    output in between is progress (:meth:`progress`). :meth:`overdue` says
    whether ``deadline_s`` has passed without progress while owing.
    """

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.owed_since: float | None = None
        """When the job last made progress while owing output; ``None``: it owes nothing."""
        self.first_wait_s: float | None = None
        """How long the job took to give its first owed output (the worker's latency, for selection)."""
        self.missed = 0
        """Deadlines missed while there was nowhere to move the job."""
        self._first_owed: float | None = None

    def owe(self, now: float) -> None:
        if self.owed_since is None:
            self.owed_since = now
        if self._first_owed is None:
            self._first_owed = now

    def progress(self, now: float, *, answers: bool = True) -> None:
        """Output came. ``answers=False``: it shows the worker is alive but is not what was asked
        for (a partial transcript after a flush), so it is not the job's latency."""
        if answers and self._first_owed is not None and self.first_wait_s is None:
            self.first_wait_s = now - self._first_owed
        if self.owed_since is not None:
            self.owed_since = now
        self.missed = 0

    def settled(self, now: float) -> None:
        self.progress(now)
        self.owed_since = None

    def due(self) -> float | None:
        """When the next deadline falls, or ``None`` while nothing is owed."""
        if self.owed_since is None:
            return None
        return self.owed_since + self.deadline_s * (self.missed + 1)

    def overdue(self, now: float, can_move: bool) -> bool:
        """Whether the job is stalled now: a deadline passed, and it can move (or patience ran out).

        A deadline passed with nowhere to move counts as missed, and the job
        is given another deadline.
        """
        due = self.due()
        if due is None or now < due:
            return False
        if can_move or self.missed + 1 >= STALL_PATIENCE:
            return True
        self.missed += 1
        return False
