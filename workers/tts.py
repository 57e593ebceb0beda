"""Text to speech with piper: text in (whole or in pieces), PCM out, piece by piece.

Each ``job.text`` piece is one unit of speech, spoken in order (the gateway
cuts an answer into pieces with :class:`gateway.clauses.SpeechChunker`; the
worker never cuts again); ``params.text`` is a whole text at once. Within a
unit, piper's own sentence split (espeak-ng) is followed, and each
sentence's audio is sent as soon as it is synthesized. After each unit's
audio a ``job.result`` names it, so a client knows exactly what has been
spoken (failover resumes at the first piece not yet spoken). Cancel is
checked between sentences and between audio frames.

Piper puts 50-80 ms of near-silence before a sentence and several hundred
after it. The leading part only delays speech, so it is cut to
``LEAD_KEEP_S``; the trailing part becomes a pause that fits how the unit
ends (:func:`pause_after`): a full stop pauses, a piece cut between two
words of a sentence does not.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime
from piper import PiperVoice, SynthesisConfig

from stream.config import TtsSettings
from stream.protocol import ErrorCode, ProtocolError, WorkerKind
from stream.protocol.jobs import TtsParams, TtsResult

from .engine import Engine
from .job import Job, TextInput
from .model_files import ModelFile

SILENCE_LEVEL = 0.01
"""Samples below this fraction of full scale count as silence at the edges of a unit (-40 dBFS)."""
LEAD_KEEP_S = 0.015
"""Silence kept before the first sound of a unit, so its onset is not clipped."""


def pause_after(text: str) -> float:
    """Seconds of silence to keep after a unit of speech, by how its text ends."""
    end = text.rstrip().rstrip("\"')]”’")
    if end.endswith((".", "!", "?", "…")):
        return 0.25
    if end.endswith((",", ";", ":", "—", "-", "–")):
        return 0.12
    return 0.03  # cut between two words: carry straight on


def trim_silence(pcm: np.ndarray, sample_rate: int, keep_before_s: float, keep_after_s: float | None) -> np.ndarray:
    """``pcm`` with at most ``keep_before_s`` of silence before its first sound and
    ``keep_after_s`` after its last (``None``: the end is left as it is)."""
    loud = np.flatnonzero(np.abs(pcm) > SILENCE_LEVEL * 32767)
    if loud.size == 0:
        return pcm[:0]
    start = max(0, int(loud[0]) - int(keep_before_s * sample_rate))
    end = len(pcm) if keep_after_s is None else min(len(pcm), int(loud[-1]) + 1 + int(keep_after_s * sample_rate))
    return pcm[start:end]


class TtsEngine(Engine):
    kind = WorkerKind.TTS
    rate_unit = "audio_s"

    def __init__(self, model: ModelFile, settings: TtsSettings) -> None:
        super().__init__(model)
        self.settings = settings
        self.max_text_chars = settings.max_text_chars
        config_path = settings.config_path or f"{model.path}.json"
        if not Path(config_path).is_file():
            raise FileNotFoundError(f"piper voice config not found: {config_path}")
        self.voice = PiperVoice.load(model.path, config_path=config_path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = settings.threads
        options.inter_op_num_threads = 1
        self.voice.session = onnxruntime.InferenceSession(str(model.path), sess_options=options, providers=["CPUExecutionProvider"])
        self.sample_rate = self.voice.config.sample_rate
        # espeak-ng (phonemization) keeps global state: one caller at a time.
        self._phonemize_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(settings.capacity, thread_name_prefix="tts")
        # The voice's first synthesis costs several times a later one: pay it at load, not in an answer.
        self.synthesize("Hello.", SynthesisConfig())

    def synthesize(self, text: str, config: SynthesisConfig, cancel: threading.Event | None = None) -> np.ndarray:
        """Mono int16 PCM of ``text`` at ``self.sample_rate``, as piper makes it (blocking)."""
        pieces = []
        for phonemes in self.phonemize(text):
            if cancel is not None and cancel.is_set():
                break
            pieces.append(self.sentence_audio(phonemes, config))
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int16)

    def phonemize(self, text: str) -> list[list[str]]:
        """Phonemes of ``text``, one list per sentence (blocking; espeak-ng is serialized)."""
        with self._phonemize_lock:
            return [phonemes for phonemes in self.voice.phonemize(text) if phonemes]

    def sentence_audio(self, phonemes: list[str], config: SynthesisConfig) -> np.ndarray:
        """Mono int16 PCM of one sentence's phonemes (blocking)."""
        audio = self.voice.phoneme_ids_to_audio(self.voice.phonemes_to_ids(phonemes), config)
        peak = float(np.max(np.abs(audio))) if audio.size else 0.0
        if peak > 1e-8:
            audio = audio / peak  # piper's own loudness normalization
        return (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)

    async def run(self, job: Job) -> None:
        params: TtsParams = job.params
        config = SynthesisConfig(length_scale=params.length_scale)
        started = time.perf_counter()
        job.count_text(len(params.text), self.max_text_chars)  # job.text pieces are counted as they arrive (workers/server.py)
        units = [params.text] if params.text.strip() else []
        while True:
            for unit in units:
                await self._speak(job, unit, config, started)
            item = await job.next_input()
            if item is None:
                break
            if not isinstance(item, TextInput):
                raise ProtocolError(ErrorCode.BAD_FORMAT, "text-to-speech jobs take job.text, not media", job.job_id)
            units = [item.text] if item.text.strip() else []
        job.stats["audio_s"] = round(job.work_units, 3)

    async def _speak(self, job: Job, text: str, config: SynthesisConfig, job_started: float) -> None:
        """Synthesize one unit sentence by sentence, each sent as soon as it is ready; then name the unit."""
        loop = asyncio.get_running_loop()
        sentences = await loop.run_in_executor(self._pool, self.phonemize, text)
        seconds = 0.0
        for index, phonemes in enumerate(sentences):
            if job.cancelled:
                break
            compute_started = time.perf_counter()
            pcm = await loop.run_in_executor(self._pool, self.sentence_audio, phonemes, config)
            job.count(len(pcm) / self.sample_rate, time.perf_counter() - compute_started)
            last = index == len(sentences) - 1
            pcm = trim_silence(pcm, self.sample_rate, LEAD_KEEP_S if index == 0 else 1.0, pause_after(text) if last else None)
            if "first_audio_s" not in job.stats:
                job.stats["first_audio_s"] = round(time.perf_counter() - job_started, 4)
            seconds += len(pcm) / self.sample_rate
            await job.emit_audio(pcm, self.sample_rate)
        await job.emit(TtsResult(clause=text.strip(), audio_s=round(seconds, 3), sample_rate=self.sample_rate).model_dump())

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)  # work still running must not lose its model
