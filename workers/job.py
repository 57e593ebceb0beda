"""A job as an engine sees it: validated params, an input stream, result emitters.

The server (:mod:`workers.server`) owns the protocol and the socket; an engine
(:mod:`workers.stt`, ...) only reads inputs and emits results through this
object, so model code never touches transport.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream.protocol import ErrorCode, MediaFormat, MediaFrame, ProtocolError

INPUT_QUEUE_ITEMS = 256
"""Inputs buffered per job (5 s of 20 ms audio frames, 8 s of the gateway's 32 ms
chunks; about 2 MB at most). A job that falls this far behind is refused with
``busy`` (its client asks again, elsewhere or later, and replays what it sent):
the connection's reader never waits on one job, so the others go on."""


@dataclass(frozen=True, slots=True)
class TextInput:
    text: str


@dataclass(frozen=True, slots=True)
class FlushInput:
    """The client asked for a result for everything sent so far (``job.flush``)."""


JobInput = TextInput | FlushInput | MediaFrame


class JobCancelled(Exception):
    """Raised inside an engine when the client cancelled the job."""


@dataclass
class Job:
    """One running job on a worker."""

    job_id: int
    params: Any
    send_result: Callable[[dict[str, Any]], Awaitable[None]]
    send_audio: Callable[[bytes, int], Awaitable[None]]
    inputs: asyncio.Queue[JobInput | None] = field(default_factory=lambda: asyncio.Queue(INPUT_QUEUE_ITEMS))
    cancel_event: threading.Event = field(default_factory=threading.Event)
    """Set on cancel; model loops running in threads poll it between steps."""
    work_units: float = 0.0
    """Work done, in the engine's rate unit (audio seconds, tokens, frames)."""
    compute_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    stats: dict[str, float] = field(default_factory=dict)
    trace: str | None = None
    """What the job is part of (the gateway's turn id), for log lines about it outside its task."""
    waiting: bool = True
    """Admitted and counted as waiting for a slot (``WorkerServer.admit``), until it runs or ends."""
    text_received: int = 0
    """Characters of text the job has been sent (``Engine.max_text_chars`` caps it on arrival)."""
    idle_input_s: float | None = None
    """How long :meth:`next_input` waits for the client before failing the job (``None``: for ever)."""

    def count_text(self, chars: int, limit: int | None) -> None:
        """``chars`` more characters of text came for the job; over ``limit`` in all, it is refused."""
        self.text_received += chars
        if limit is not None and self.text_received > limit:
            raise ProtocolError(ErrorCode.LIMIT, f"more than {limit} characters of text", self.job_id)

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    async def next_input(self, *, flushes: bool = False) -> JobInput | None:
        """The next input piece, or ``None`` once the client sent ``job.end``.

        ``job.flush`` comes as :class:`FlushInput` only to an engine that asks
        for it (``flushes``); the others produce results from each input anyway.
        """
        while True:
            try:
                async with asyncio.timeout(self.idle_input_s):
                    item = await self.inputs.get()
            except TimeoutError:
                raise ProtocolError(ErrorCode.LIMIT, f"no input for {self.idle_input_s:g} s (idle_input_s); the job is ended", self.job_id) from None
            if self.cancelled:
                raise JobCancelled
            if flushes or not isinstance(item, FlushInput):
                return item

    async def emit(self, data: dict[str, Any]) -> None:
        if self.cancelled:
            raise JobCancelled
        await self.send_result(data)

    async def emit_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Stream mono int16 PCM to the client, in frames of at most 0.25 s."""
        step = sample_rate // 4
        for start in range(0, len(pcm), step):
            if self.cancelled:
                raise JobCancelled
            await self.send_audio(pcm[start : start + step].astype("<i2", copy=False).tobytes(), sample_rate)

    def count(self, units: float, compute_s: float) -> None:
        """Record work done, for the worker's measured service rate."""
        self.work_units += units
        self.compute_s += compute_s


def require_pcm(frame: MediaFrame, sample_rate: int, channels: int = 1) -> np.ndarray:
    """The frame's samples, or ``bad_format`` if it is not PCM at that rate and layout."""
    if frame.format is not MediaFormat.PCM_S16LE or frame.sample_rate != sample_rate or frame.channels != channels:
        raise ProtocolError(
            ErrorCode.BAD_FORMAT,
            f"expected {channels}-channel s16le PCM at {sample_rate} Hz, got {frame.format.name} {frame.channels} ch at {frame.sample_rate} Hz",
            frame.job_id,
        )
    return np.frombuffer(frame.payload, dtype="<i2")
