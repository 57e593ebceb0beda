"""Kind-specific job parameters (``job.start`` params) and results (``job.result`` data).

The envelope messages in :mod:`.messages` carry these as plain JSON objects so
that the envelope stays the same for every kind; workers validate ``params``
with the model of their kind and clients read ``data`` with the result model.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .messages import WorkerKind


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- speech to text ---------------------------------------------------------

STT_SAMPLE_RATE = 16_000


class SttParams(_Model):
    """One utterance, sent as 16 kHz mono PCM frames, then ``job.end``."""

    language: Annotated[str, Field(min_length=2, max_length=8)] = "en"
    partials: bool = True
    """Stream partial transcripts while audio arrives."""


class SttResult(_Model):
    text: str
    final: bool
    """``False`` for a partial transcript, ``True`` for the one final transcript."""
    flushed: bool = False
    """A transcript of all audio sent before a ``job.flush``, decoded as carefully as a
    final one (a partial may skip audio or lag behind); the job goes on."""
    audio_s: float
    """Seconds of utterance audio this transcript covers."""


# -- language model -----------------------------------------------------------


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant"]
    content: str


class LlmParams(_Model):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=512)]
    max_tokens: Annotated[int, Field(ge=1, le=4096)] = 256
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.3
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.95
    seed: int | None = None
    answer_prefix: Annotated[str, Field(max_length=16_384)] = ""
    """The answer so far: generation continues after it (a job moved from a lost worker)."""
    prefill: bool = False
    """Only evaluate ``messages`` into the worker's cache, and answer nothing: a
    later request that extends them starts without re-evaluating them (the
    gateway sends one after trimming a conversation's history)."""


class LlmResult(_Model):
    text: str
    """The next piece of the answer (one token's text, possibly empty)."""


# -- text to speech ---------------------------------------------------------------


class TtsParams(_Model):
    """Text arrives in ``job.text`` pieces (and/or here); audio streams back as PCM frames.

    Each ``job.text`` piece is spoken as one unit, in order: the client decides
    where the text is cut (the gateway cuts an answer with
    :class:`gateway.clauses.SpeechChunker`), and the worker never cuts it again.
    ``text`` is a whole text at once, spoken sentence by sentence.
    """

    text: Annotated[str, Field(max_length=4096)] = ""
    length_scale: Annotated[float, Field(gt=0.2, le=4.0)] | None = None
    """Speaking rate: above 1 is slower (piper's length scale)."""


class TtsResult(_Model):
    """Sent after the audio of each piece (or of ``params.text``), so a client knows what has been spoken."""

    clause: str
    audio_s: float
    sample_rate: int


# -- vision -----------------------------------------------------------------------------


class VisionParams(_Model):
    """One image as a single JPEG, PNG or RGB24 frame, then ``job.end``."""

    width: Annotated[int, Field(ge=1, le=8192)] | None = None
    height: Annotated[int, Field(ge=1, le=8192)] | None = None
    """Required for RGB24 frames."""
    describe: bool = True
    """Also describe the image, when the worker has a multimodal model."""
    prompt: Annotated[str, Field(max_length=1024)] = "Describe what you see in one short sentence."


class OcrLine(_Model):
    text: str
    score: float
    box: list[tuple[float, float]]
    """Four corners, in pixels, clockwise from the top left."""


class VisionResult(_Model):
    lines: list[OcrLine]
    description: str | None = None

    @property
    def text(self) -> str:
        return " ".join(line.text for line in self.lines)


PARAMS_BY_KIND: dict[WorkerKind, type[_Model]] = {
    WorkerKind.STT: SttParams,
    WorkerKind.LLM: LlmParams,
    WorkerKind.TTS: TtsParams,
    WorkerKind.VISION: VisionParams,
}
