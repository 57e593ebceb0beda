"""The answer's audio track: 20 ms Opus packets at 48 kHz, paced by the clock, only while there is an answer.

Answer audio is written in whatever pieces TTS produces, each tagged with
the turn and the piece of the answer it belongs to; ``recv`` (called by
aiortc's sender) takes exactly one 20 ms frame at a time and says when a
piece starts playing and when everything queued has been sent. ``stop``
drops everything queued, so playback stops within one frame on barge-in;
``retract`` drops one piece's unsent audio (its TTS worker was lost, and the
piece is synthesized again elsewhere).

Between answers nothing is sent (discontinuous transmission, as Opus DTX and
SFUs that drop silent packets do): ``recv`` waits for audio, and the first
packet of an answer goes out as soon as its audio is there, stamped with the
time elapsed since the track started, so the receiver sees a new talkspurt
after a gap in the timestamps and plays it at once, instead of waiting for
the next slot of a 20 ms grid. The first ``TALKSPURT_BURST`` frames of a
talkspurt go out together when that much audio is queued, then the pace is
one frame per 20 ms again: a receiver that holds frames back until the
next few have come (aiortc's jitter buffer holds four, 80 ms) plays the
first at once instead of 80 ms later; one that starts at once loses
nothing. Two silent packets end each talkspurt, so the receiver's decoder
stops on silence rather than concealing a cut.

The track hands aiortc encoded packets, not raw frames: only answer audio is
encoded, here, in the event loop (about 0.1 ms a frame). Raw frames would
cost, every 20 ms, a hop to aiortc's encoder thread pool, a resample to
stereo, an Opus encode and a Python RMS for the audio-level header. Under
``bench gateway-load`` that outbound path, running all the time for silence,
was the gateway's largest cost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from stream.audio import OPUS_FRAME, OPUS_RATE, FrameClock, OpusEncoder, opus_packet, silent_opus_packet

log = logging.getLogger("edgestream.gateway")

SAMPLE_RATE = OPUS_RATE
FRAME_SAMPLES = OPUS_FRAME  # 20 ms
TRAILING_SILENT_PACKETS = 2
TALKSPURT_BURST = 5
"""Frames sent at once when an answer starts: aiortc's receiver releases a frame once the four
after it are in; the sender stays this many frames (80 ms) ahead for the rest of the talkspurt."""
MAX_BUFFERED_S = 120.0
"""Answer audio held ahead of playback (11.5 MB at 48 kHz): an answer of the default
``max_answer_tokens`` (96) is under a minute; audio beyond this is dropped and logged."""


class AnswerTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(
        self,
        on_piece_started: Callable[[int, int, float], None] | None = None,
        on_idle: Callable[[int], None] | None = None,
    ) -> None:
        """``on_piece_started(turn, piece, at)``: the first frame of a piece of an answer was sent;
        ``on_idle(turn)``: everything queued of ``turn``'s answer has been sent."""
        super().__init__()
        self._chunks: deque[tuple[int, int, np.ndarray]] = deque()
        """(turn, piece, 48 kHz samples), in playing order."""
        self._buffered = 0
        self._clock = FrameClock(FRAME_SAMPLES, SAMPLE_RATE)
        self._encoder = OpusEncoder()
        self._silence = silent_opus_packet()
        self._playing: tuple[int, int] | None = None
        """The (turn, piece) whose audio was sent last."""
        self._on_piece_started = on_piece_started
        self._on_idle = on_idle
        self._audio_ready = asyncio.Event()
        self._trailing = 0
        """Silent packets still to send before going quiet."""
        self.dropped_s = 0.0
        """Answer audio refused because ``MAX_BUFFERED_S`` was queued already."""

    @property
    def playing(self) -> bool:
        return self._buffered > 0

    @property
    def buffered_s(self) -> float:
        """Answer audio queued and not yet played."""
        return self._buffered / SAMPLE_RATE

    def write(self, turn: int, piece: int, samples: np.ndarray) -> None:
        """Queue 48 kHz mono int16 samples of ``piece`` of ``turn``'s answer (never waits)."""
        if not len(samples):
            return
        if self._buffered + len(samples) > MAX_BUFFERED_S * SAMPLE_RATE:
            if not self.dropped_s:
                log.warning("answer audio beyond %g s ahead of playback is dropped", MAX_BUFFERED_S)
            self.dropped_s += len(samples) / SAMPLE_RATE
            return
        self._chunks.append((turn, piece, samples))
        self._buffered += len(samples)
        self._audio_ready.set()

    def retract(self, turn: int, piece: int) -> None:
        """Drop what is queued of ``piece`` and not yet sent (the piece will be synthesized again)."""
        kept = deque(chunk for chunk in self._chunks if chunk[:2] != (turn, piece))
        self._buffered = sum(len(chunk[2]) for chunk in kept)
        self._chunks = kept

    def stop(self) -> None:
        """Drop all queued audio: the next frame is silence."""
        self._chunks.clear()
        self._buffered = 0

    def _take(self) -> tuple[np.ndarray, tuple[int, int] | None]:
        """The next 20 ms frame, and the (turn, piece) it starts with (``None``: silence)."""
        out = np.zeros(FRAME_SAMPLES, np.int16)
        filled = 0
        first: tuple[int, int] | None = None
        while filled < FRAME_SAMPLES and self._chunks:
            turn, piece, chunk = self._chunks[0]
            if (turn, piece) != self._playing and self._on_piece_started is not None:
                self._playing = (turn, piece)
                self._on_piece_started(turn, piece, time.monotonic())
            self._playing = (turn, piece)
            first = first or (turn, piece)
            take = min(FRAME_SAMPLES - filled, len(chunk))
            out[filled : filled + take] = chunk[:take]
            filled += take
            if take == len(chunk):
                self._chunks.popleft()
            else:
                self._chunks[0] = (turn, piece, chunk[take:])
        self._buffered -= filled
        if first is not None and not self._chunks and self._on_idle is not None:
            self._on_idle(first[0])
        return out, first

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        if not self._chunks and not self._trailing:
            while not self._chunks:  # quiet until there is answer audio
                self._audio_ready.clear()
                await self._audio_ready.wait()
            queued_frames = self._buffered // FRAME_SAMPLES
            pts = self._clock.resume(ahead=max(0, min(TALKSPURT_BURST, queued_frames) - 1))
        else:
            pts = await self._clock.tick()
        samples, first = self._take()
        if first is None:
            self._trailing = max(0, self._trailing - 1)
            return opus_packet(self._silence, pts)
        self._trailing = TRAILING_SILENT_PACKETS
        packets = self._encoder.encode(samples)
        return opus_packet(packets[0] if packets else self._silence, pts)
