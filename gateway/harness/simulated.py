"""Stand-in engines for benchmarks that measure everything but the models.

They speak the real protocol through the real :class:`~workers.server.WorkerServer`;
only the model is replaced, by a cost that is exactly what the benchmark says
(``gateway/harness/selection_bench.py``: heterogeneous worker speeds) or by canned
output that costs nothing (``gateway/harness/load_bench.py``: the gateway's own load,
with no model competing for the two cores). Never used by ``edgestream up``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import numpy as np

from stream.protocol import WorkerKind
from stream.protocol.jobs import STT_SAMPLE_RATE, LlmResult, SttResult, TtsResult
from workers.engine import Engine
from workers.job import FlushInput, Job
from workers.model_files import ModelFile


def _model(kind: WorkerKind, name: str) -> ModelFile:
    return ModelFile(kind, Path("/dev/null"), name, hashlib.sha256(name.encode()).hexdigest())


class SimulatedStt(Engine):
    """Takes an utterance and answers ``text`` after ``audio seconds * seconds_per_audio_second`` of (simulated)
    compute; a flush is answered at once with ``text``."""

    kind = WorkerKind.STT
    rate_unit = "audio_s"

    def __init__(self, seconds_per_audio_second: float, text: str = "") -> None:
        super().__init__(_model(WorkerKind.STT, "simulated-stt"))
        self.seconds_per_audio_second = seconds_per_audio_second
        self.text = text

    async def run(self, job: Job) -> None:
        samples = 0
        while (item := await job.next_input(flushes=True)) is not None:
            if isinstance(item, FlushInput):
                await job.emit(SttResult(text=self.text, final=False, flushed=True, audio_s=samples / STT_SAMPLE_RATE).model_dump())
                continue
            samples += len(item.payload) // 2
        audio_s = samples / STT_SAMPLE_RATE
        started = time.perf_counter()
        await asyncio.sleep(audio_s * self.seconds_per_audio_second)
        job.count(audio_s, time.perf_counter() - started)
        await job.emit(SttResult(text=self.text, final=True, audio_s=audio_s).model_dump())


class CannedLlm(Engine):
    """Answers every prompt with the same words, at once."""

    kind = WorkerKind.LLM
    rate_unit = "tokens"

    def __init__(self, answer: str) -> None:
        super().__init__(_model(WorkerKind.LLM, "canned-llm"))
        self.words = answer.split(" ")

    async def run(self, job: Job) -> None:
        while await job.next_input() is not None:
            pass
        for i, word in enumerate(self.words):
            await job.emit(LlmResult(text=word if i == 0 else " " + word).model_dump())
        job.count(len(self.words), 1e-6)


class CannedTts(Engine):
    """Speaks an answer's pieces with one recording of the whole answer, at once.

    Each piece gets its share of the recording by characters (``text_chars``:
    the answer's length), in 0.25 s chunks as piper streams, so an answer cut
    into any pieces sounds as long as the recording.
    """

    kind = WorkerKind.TTS
    rate_unit = "chars"

    def __init__(self, pcm: np.ndarray, sample_rate: int, text_chars: int) -> None:
        super().__init__(_model(WorkerKind.TTS, "canned-tts"))
        self.pcm = np.asarray(pcm, np.int16)
        self.sample_rate = sample_rate
        self.samples_per_char = len(self.pcm) / max(1, text_chars)

    async def run(self, job: Job) -> None:
        position = 0
        pieces = [job.params.text] if job.params.text else []
        while True:
            for piece in pieces:
                end = min(len(self.pcm), position + round(len(piece) * self.samples_per_char))
                step = self.sample_rate // 4
                for start in range(position, end, step):
                    await job.emit_audio(self.pcm[start : min(end, start + step)], self.sample_rate)
                await job.emit(TtsResult(clause=piece, audio_s=(end - position) / self.sample_rate, sample_rate=self.sample_rate).model_dump())
                job.count(len(piece), 1e-6)
                position = end
            item = await job.next_input()
            if item is None:
                return
            pieces = [item.text]
