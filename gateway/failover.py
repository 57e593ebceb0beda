"""What a job does when its worker dies, disconnects or stalls mid-job (pure rules; ``dialog.py`` applies them).

The person keeps the turn: the job moves to the next best worker (one not
tried yet for it) and carries on from where the lost one was:

- STT: the new job hears the whole utterance again, from the buffered audio
  (pre-roll included), and is ended at once if the person already stopped.
- LLM: the new job continues the answer after the text already sent, which is
  neither generated nor spoken twice.
- TTS: the answer resumes at the clause that had not finished playing; that
  clause is synthesized again from its start.
- Vision: the frame is sent again.

A job is failed over only for the worker's faults (lost link, stall, internal
error, busy); a job the worker refused as invalid would be refused anywhere.
"""

from __future__ import annotations

import numpy as np

from stream.protocol import ErrorCode
from stream.protocol.jobs import LlmParams

MAX_WORKERS_PER_JOB = 3
"""Workers tried for one job before the turn reports an error."""

WORKER_FAULTS = frozenset({ErrorCode.INTERNAL, ErrorCode.BUSY})
"""Error codes that are the worker's fault, not the job's (a lost link is reported as ``internal``)."""


def fails_over(code: ErrorCode, workers_tried: int) -> bool:
    """Whether a job that failed with ``code`` goes to another worker."""
    return code in WORKER_FAULTS and workers_tried < MAX_WORKERS_PER_JOB


def stt_replay(heard: list[np.ndarray]) -> np.ndarray:
    """Everything heard in the turn so far, in order, for the new STT job."""
    return np.concatenate(heard) if heard else np.zeros(0, np.int16)


def llm_continuation(params: LlmParams, sent: str, tokens_sent: int) -> LlmParams:
    """The same request, continuing after the ``tokens_sent`` tokens of ``sent`` already streamed."""
    if not sent:
        return params
    remaining = max(1, params.max_tokens - tokens_sent)
    return params.model_copy(update={"answer_prefix": params.answer_prefix + sent, "max_tokens": remaining})


def tts_resume_at(clauses_played: int) -> int:
    """Index of the clause to synthesize again: the first one not completely played."""
    return clauses_played
