"""Events the gateway sends to the client on the data channel (JSON, one per message)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionReady(_Event):
    type: Literal["session.ready"] = "session.ready"
    session_id: str


class TranscriptPartial(_Event):
    type: Literal["transcript.partial"] = "transcript.partial"
    turn: int
    text: str


class TranscriptFinal(_Event):
    type: Literal["transcript.final"] = "transcript.final"
    turn: int
    text: str


class VisionText(_Event):
    type: Literal["vision"] = "vision"
    turn: int
    text: str
    description: str | None = None


class AnswerToken(_Event):
    type: Literal["answer.token"] = "answer.token"
    turn: int
    text: str


class AnswerDone(_Event):
    type: Literal["answer.done"] = "answer.done"
    turn: int
    text: str
    interrupted: bool = False
    truncated: bool = False
    """The answer hit ``max_answer_tokens`` (an ``answer_truncated`` error follows)."""
    gaps: int = 0
    """Times the answer's audio ran out before its end (a piece was not synthesized by the time the one before it had played)."""
    gap_ms: float = 0.0
    """The silence those gaps made, in all."""


class BargeIn(_Event):
    type: Literal["barge_in"] = "barge_in"
    turn: int
    """The turn whose answer was cut off."""


class Latency(_Event):
    """Per-turn latency breakdown, in ms from the end of speech in the received audio."""

    type: Literal["latency"] = "latency"
    turn: int
    end_of_turn: float
    stt_final: float
    first_token: float | None = None
    first_clause: float | None = None
    first_tts_audio: float | None = None
    first_audio_sent: float | None = None
    workers: dict[str, str] = {}


class Waiting(_Event):
    """Every worker of ``kind`` is full: the turn waits for one (up to ``wait_s``) instead of failing."""

    type: Literal["waiting"] = "waiting"
    kind: str
    turn: int | None = None
    wait_s: float
    message: str


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    code: str
    message: str
    turn: int | None = None


Event = SessionReady | TranscriptPartial | TranscriptFinal | VisionText | AnswerToken | AnswerDone | BargeIn | Latency | Waiting | ErrorEvent
