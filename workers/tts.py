"""Text to speech with piper: text in (whole or in pieces), PCM out per clause.

Text is cut into clauses (:class:`stream.clauses.ClauseChunker`) as it arrives,
and each complete clause is synthesized at once, so the first audio leaves
while later text is still coming. After each clause's audio a ``job.result``
names the clause, so a client knows exactly what has been spoken (failover
resumes at the first clause not yet played). Cancel is checked between
sentences and between audio frames.
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

from stream.clauses import ClauseChunker
from stream.config import TtsSettings
from stream.protocol import ErrorCode, ProtocolError, WorkerKind
from stream.protocol.jobs import TtsParams, TtsResult

from .engine import Engine
from .job import Job, TextInput
from .model_files import ModelFile


class TtsEngine(Engine):
    kind = WorkerKind.TTS
    rate_unit = "audio_s"

    def __init__(self, model: ModelFile, settings: TtsSettings) -> None:
        super().__init__(model)
        self.settings = settings
        config_path = settings.config_path or f"{model.path}.json"
        if not Path(config_path).is_file():
            raise FileNotFoundError(f"piper voice config not found: {config_path}")
        self.voice = PiperVoice.load(model.path, config_path=config_path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = settings.threads
        options.inter_op_num_threads = 1
        self.voice.session = onnxruntime.InferenceSession(
            str(model.path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.sample_rate = self.voice.config.sample_rate
        # espeak-ng (phonemization) keeps global state: one caller at a time.
        self._phonemize_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(settings.capacity, thread_name_prefix="tts")

    def synthesize(self, text: str, config: SynthesisConfig, cancel: threading.Event | None = None) -> np.ndarray:
        """Mono int16 PCM of ``text`` at ``self.sample_rate`` (blocking)."""
        with self._phonemize_lock:
            sentences = self.voice.phonemize(text)
        pieces = []
        for phonemes in sentences:
            if cancel is not None and cancel.is_set():
                break
            if not phonemes:
                continue
            audio = self.voice.phoneme_ids_to_audio(self.voice.phonemes_to_ids(phonemes), config)
            peak = float(np.max(np.abs(audio))) if audio.size else 0.0
            if peak > 1e-8:
                audio = audio / peak  # piper's own loudness normalization
            pieces.append((np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16))
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int16)

    async def run(self, job: Job) -> None:
        params: TtsParams = job.params
        config = SynthesisConfig(length_scale=params.length_scale)
        chunker = ClauseChunker()
        received = len(params.text)
        clauses = chunker.feed(params.text + " ") if params.text else []
        first_audio = True
        started = time.perf_counter()
        ended = False
        while True:
            for clause in clauses:
                compute_started = time.perf_counter()
                pcm = await asyncio.get_running_loop().run_in_executor(
                    self._pool, self.synthesize, clause, config, job.cancel_event
                )
                job.count(len(pcm) / self.sample_rate, time.perf_counter() - compute_started)
                if first_audio:
                    job.stats["first_audio_s"] = round(time.perf_counter() - started, 4)
                    first_audio = False
                await job.emit_audio(pcm, self.sample_rate)
                await job.emit(
                    TtsResult(clause=clause, audio_s=round(len(pcm) / self.sample_rate, 3), sample_rate=self.sample_rate).model_dump()
                )
            if ended:
                break
            item = await job.next_input()
            if item is None:
                ended = True
                clauses = chunker.flush()
                continue
            if not isinstance(item, TextInput):
                raise ProtocolError(ErrorCode.BAD_FORMAT, "text-to-speech jobs take job.text, not media", job.job_id)
            received += len(item.text)
            if received > self.settings.max_text_chars:
                raise ProtocolError(ErrorCode.LIMIT, f"more than {self.settings.max_text_chars} characters of text", job.job_id)
            clauses = chunker.feed(item.text)
        job.stats["audio_s"] = round(job.work_units, 3)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
