"""The answer's audio track: 20 ms Opus packets at 48 kHz, paced by the clock.

Answer audio is written in whatever pieces TTS produces; ``recv`` (called by
aiortc's sender) takes exactly one 20 ms frame at a time, silence when there is
nothing to play. ``stop`` drops everything queued, so playback stops within one
frame on barge-in.

The track hands aiortc encoded packets, not raw frames. A session is silent
most of the time, and a silent frame is always the same 3-byte packet, so it
is encoded once per process; only answer audio is encoded, here, in the event
loop (about 0.1 ms a frame). Raw frames would cost, every 20 ms of every
session, a hop to aiortc's encoder thread pool, a resample to stereo, an Opus
encode and a Python RMS for the audio-level header: under ``bench
gateway-load`` that outbound path was the gateway's largest cost.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from stream.audio import OPUS_FRAME, OPUS_RATE, FrameClock, OpusEncoder, opus_packet, silent_opus_packet

SAMPLE_RATE = OPUS_RATE
FRAME_SAMPLES = OPUS_FRAME  # 20 ms
MAX_BUFFERED_S = 120.0
"""Answer audio held ahead of playback; TTS writing past it waits (backpressure)."""


class AnswerTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self, on_first_audio: Callable[[int, float], None] | None = None) -> None:
        super().__init__()
        self._chunks: deque[tuple[int, np.ndarray]] = deque()
        self._buffered = 0
        self._space = asyncio.Event()
        self._space.set()
        self._clock = FrameClock(FRAME_SAMPLES, SAMPLE_RATE)
        self._encoder = OpusEncoder()
        self._silence = silent_opus_packet()
        self._started_turns: set[int] = set()
        self._on_first_audio = on_first_audio

    @property
    def playing(self) -> bool:
        return self._buffered > 0

    @property
    def buffered_s(self) -> float:
        """Answer audio queued and not yet played."""
        return self._buffered / SAMPLE_RATE

    async def write(self, turn: int, samples: np.ndarray) -> None:
        """Queue 48 kHz mono int16 samples of ``turn``'s answer."""
        while self._buffered >= MAX_BUFFERED_S * SAMPLE_RATE:
            self._space.clear()
            await self._space.wait()
        if len(samples):
            self._chunks.append((turn, samples))
            self._buffered += len(samples)

    def stop(self) -> None:
        """Drop all queued audio: the next frame is silence."""
        self._chunks.clear()
        self._buffered = 0
        self._space.set()

    def _take(self) -> tuple[np.ndarray, int | None]:
        out = np.zeros(FRAME_SAMPLES, np.int16)
        filled = 0
        first_turn: int | None = None
        while filled < FRAME_SAMPLES and self._chunks:
            turn, chunk = self._chunks[0]
            first_turn = turn if first_turn is None else first_turn
            take = min(FRAME_SAMPLES - filled, len(chunk))
            out[filled : filled + take] = chunk[:take]
            filled += take
            if take == len(chunk):
                self._chunks.popleft()
            else:
                self._chunks[0] = (turn, chunk[take:])
        self._buffered -= filled
        if self._buffered < MAX_BUFFERED_S * SAMPLE_RATE:
            self._space.set()
        return out, first_turn

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        pts = await self._clock.tick()
        samples, turn = self._take()
        if turn is None:
            return opus_packet(self._silence, pts)
        if turn not in self._started_turns:
            self._started_turns.add(turn)
            if self._on_first_audio is not None:
                self._on_first_audio(turn, time.monotonic())
        packets = self._encoder.encode(samples)
        return opus_packet(packets[0] if packets else self._silence, pts)
