"""Turn taking: when the person starts and stops speaking (policy, no I/O).

Fed 16 kHz audio in any sizes, it cuts it into VAD chunks and emits
:class:`SpeechStarted` (with pre-roll audio, so the first syllable is not
lost), :class:`SpeechAudio` while speech lasts, and :class:`SpeechEnded` once
``end_silence_ms`` of silence follows speech. Audio during a turn is always
passed on, silence included, so speech recognition never loses a sample.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .vad import CHUNK_SAMPLES, StreamingVad

SAMPLE_RATE = 16_000
CHUNK_MS = CHUNK_SAMPLES * 1000 / SAMPLE_RATE  # 32 ms


@dataclass(frozen=True, slots=True)
class TurnSettings:
    start_threshold: float = 0.5
    end_threshold: float = 0.35
    start_ms: float = 64
    """Speech must last this long to start a turn (filters clicks)."""
    end_silence_ms: float = 320
    """Silence after speech that ends the turn."""
    preroll_ms: float = 256
    pause_ms: float = 128
    """Silence after which the turn is *probably* over: the conversation starts answering
    speculatively, and keeps the answer's audio back until ``end_silence_ms``
    confirms the end (0: no speculation)."""
    max_turn_ms: float = 30_000
    """A turn that lasts this long ends here (:class:`SpeechEnded` with ``cut``); speech
    that goes on starts the next turn, its start in the pre-roll, so no audio is lost."""


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    preroll: np.ndarray
    stream_s: float
    """Position in the incoming stream (seconds of audio received) where speech began."""


@dataclass(frozen=True, slots=True)
class SpeechAudio:
    samples: np.ndarray


@dataclass(frozen=True, slots=True)
class SpeechPaused:
    """``pause_ms`` of silence: the turn may be over (:class:`SpeechEnded` or :class:`SpeechResumed` follows)."""

    speech_end_s: float
    stream_s: float


@dataclass(frozen=True, slots=True)
class SpeechResumed:
    """Speech came back after a :class:`SpeechPaused`: the turn goes on."""

    stream_s: float


@dataclass(frozen=True, slots=True)
class SpeechEnded:
    speech_end_s: float
    """Stream position of the end of the last voiced chunk."""
    stream_s: float
    """Stream position when the end was detected."""
    cut: bool = False
    """The turn reached ``max_turn_ms`` while the person was still speaking."""


TurnEvent = SpeechStarted | SpeechAudio | SpeechPaused | SpeechResumed | SpeechEnded


class TurnDetector:
    def __init__(self, settings: TurnSettings | None = None, vad: StreamingVad | None = None) -> None:
        self.settings = settings or TurnSettings()
        self._vad = vad or StreamingVad()
        self._pending = np.zeros(0, np.int16)
        self._preroll: deque[np.ndarray] = deque(maxlen=max(1, int(self.settings.preroll_ms / CHUNK_MS)))
        self._voiced_run = 0
        self._silent_run = 0
        self._speaking = False
        self._chunks = 0
        self._last_voiced_end = 0.0
        self._paused = False
        self._turn_start = 0.0

    @property
    def speaking(self) -> bool:
        return self._speaking

    @property
    def stream_s(self) -> float:
        return self._chunks * CHUNK_SAMPLES / SAMPLE_RATE

    def push(self, samples: np.ndarray) -> list[TurnEvent]:
        """Feed int16 samples; return the turn events they complete, in order."""
        self._pending = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        events: list[TurnEvent] = []
        while len(self._pending) >= CHUNK_SAMPLES:
            chunk, self._pending = self._pending[:CHUNK_SAMPLES], self._pending[CHUNK_SAMPLES:]
            events.extend(self._chunk(chunk))
        return events

    def _chunk(self, chunk: np.ndarray) -> list[TurnEvent]:
        prob = self._vad.probability(chunk, may_gate=not self._speaking)  # in a turn, the model hears every chunk
        self._chunks += 1
        s = self.settings
        if not self._speaking:
            self._preroll.append(chunk)
            self._voiced_run = self._voiced_run + 1 if prob >= s.start_threshold else 0
            if self._voiced_run * CHUNK_MS >= s.start_ms:
                self._speaking = True
                self._silent_run = 0
                self._last_voiced_end = self.stream_s
                preroll = np.concatenate(list(self._preroll))
                self._preroll.clear()
                self._turn_start = self.stream_s - len(preroll) / SAMPLE_RATE
                return [SpeechStarted(preroll, self.stream_s - self._voiced_run * CHUNK_MS / 1000)]
            return []
        events: list[TurnEvent] = [SpeechAudio(chunk)]
        if prob >= s.end_threshold:
            self._silent_run = 0
            self._last_voiced_end = self.stream_s
            if self._paused:
                self._paused = False
                events.append(SpeechResumed(self.stream_s))
        else:
            self._silent_run += 1
            silence_ms = self._silent_run * CHUNK_MS
            if silence_ms >= s.end_silence_ms:
                self._speaking = False
                self._paused = False
                self._voiced_run = 0
                events.append(SpeechEnded(self._last_voiced_end, self.stream_s))
            elif s.pause_ms and silence_ms >= s.pause_ms and not self._paused:
                self._paused = True
                events.append(SpeechPaused(self._last_voiced_end, self.stream_s))
        if self._speaking and (self.stream_s - self._turn_start) * 1000 >= s.max_turn_ms:
            self._speaking = False
            self._paused = False
            self._voiced_run = 0
            events.append(SpeechEnded(self.stream_s, self.stream_s, cut=True))
        return events
