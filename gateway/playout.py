"""The answer's audio track: 20 ms Opus packets at 48 kHz, paced by the clock, only while there is an answer.

Answer audio is written in whatever pieces TTS produces; ``recv`` (called by
aiortc's sender) takes exactly one 20 ms frame at a time. ``stop`` drops
everything queued, so playback stops within one frame on barge-in.

Between answers nothing is sent (discontinuous transmission, as Opus DTX and
SFUs that drop silent packets do): ``recv`` waits for audio, and the first
packet of an answer goes out as soon as its audio is there, stamped with the
time elapsed since the track started, so the receiver sees a new talkspurt
after a gap in the timestamps and plays it at once, instead of waiting for
the next slot of a 20 ms grid. Two silent packets end each talkspurt, so the
receiver's decoder stops on silence rather than concealing a cut.

The track hands aiortc encoded packets, not raw frames: only answer audio is
encoded, here, in the event loop (about 0.1 ms a frame). Raw frames would
cost, every 20 ms, a hop to aiortc's encoder thread pool, a resample to
stereo, an Opus encode and a Python RMS for the audio-level header. Under
``bench gateway-load`` that outbound path, running all the time for silence,
was the gateway's largest cost.
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
TRAILING_SILENT_PACKETS = 2
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
        self._audio_ready = asyncio.Event()
        self._trailing = 0
        """Silent packets still to send before going quiet."""

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
            self._audio_ready.set()

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
        if not self._chunks and not self._trailing:
            while not self._chunks:  # quiet until there is answer audio
                self._audio_ready.clear()
                await self._audio_ready.wait()
            pts = self._clock.resume()
        else:
            pts = await self._clock.tick()
        samples, turn = self._take()
        if turn is None:
            self._trailing = max(0, self._trailing - 1)
            return opus_packet(self._silence, pts)
        self._trailing = TRAILING_SILENT_PACKETS
        if turn not in self._started_turns:
            self._started_turns.add(turn)
            if self._on_first_audio is not None:
                self._on_first_audio(turn, time.monotonic())
        packets = self._encoder.encode(samples)
        return opus_packet(packets[0] if packets else self._silence, pts)
