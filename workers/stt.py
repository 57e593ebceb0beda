"""Speech to text with faster-whisper (CTranslate2 Whisper).

A job is one utterance of 16 kHz mono PCM. While audio arrives, a partial
transcript of everything so far is produced every ``partial_interval_s`` of new
audio; at ``job.end`` the final transcript follows at once. Audio is buffered,
never dropped: if a decode is still running when more audio arrives, the next
partial simply covers more.

Decoding speed: faster-whisper's ``transcribe()`` pads every call to Whisper's
30 s window (~0.4-0.8 s here for any utterance). For utterances that fit a
shorter window we run the encoder on log-mel features padded only to the
nearest of 4/8/15 s, which gives the same transcript in ~0.1 s. The padding
policy lives in :func:`window_frames` alone.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer

from stream.config import SttSettings
from stream.protocol import ErrorCode, ProtocolError, WorkerKind
from stream.protocol.jobs import STT_SAMPLE_RATE, SttParams, SttResult

from .engine import Engine
from .job import Job, TextInput, require_pcm
from .model_files import ModelFile

FRAMES_PER_SECOND = 100  # Whisper's log-mel hop is 10 ms
SHORT_WINDOWS_S = (4, 8, 15)
"""Encoder windows tried before the full 30 s one; each fits a shorter utterance."""
WINDOW_MARGIN_S = 0.3


def window_frames(duration_s: float) -> int | None:
    """Feature frames to pad an utterance to, or ``None`` if it needs the full 30 s path."""
    for window in SHORT_WINDOWS_S:
        if duration_s + WINDOW_MARGIN_S <= window:
            return window * FRAMES_PER_SECOND
    return None


class SttEngine(Engine):
    kind = WorkerKind.STT
    rate_unit = "audio_s"

    def __init__(self, model: ModelFile, settings: SttSettings) -> None:
        super().__init__(model)
        self.settings = settings
        self.whisper = WhisperModel(
            str(model.path),
            device="cpu",
            compute_type=settings.compute_type,
            cpu_threads=settings.threads,
            num_workers=settings.capacity,
        )
        self._tokenizers: dict[str, Tokenizer] = {}
        self._pool = ThreadPoolExecutor(settings.capacity, thread_name_prefix="stt")

    def _tokenizer(self, language: str) -> Tokenizer:
        if language not in self._tokenizers:
            multilingual = self.whisper.model.is_multilingual
            if not multilingual and language != "en":
                raise ProtocolError(ErrorCode.BAD_PARAMS, f"this model is English-only, not {language!r}")
            self._tokenizers[language] = Tokenizer(
                self.whisper.hf_tokenizer, multilingual, task="transcribe", language=language if multilingual else None
            )
        return self._tokenizers[language]

    def transcribe(self, audio: np.ndarray, language: str = "en") -> str:
        """Transcribe float32 16 kHz mono audio (blocking)."""
        duration = len(audio) / STT_SAMPLE_RATE
        if duration < 0.1:
            return ""
        frames = window_frames(duration)
        if frames is None:
            segments, _ = self.whisper.transcribe(audio, language=language, beam_size=1, condition_on_previous_text=False)
            return " ".join(segment.text.strip() for segment in segments).strip()
        tokenizer = self._tokenizer(language)
        features = self.whisper.feature_extractor(audio)[:, :frames]
        features = np.pad(features, ((0, 0), (0, frames - features.shape[1])))
        encoded = self.whisper.encode(features)
        prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
        # About 3 words a second at most; the bound stops a rare repetition loop early.
        max_new_tokens = int(12 * duration) + 16
        result = self.whisper.model.generate(
            encoded,
            [prompt],
            beam_size=1,
            max_length=len(prompt) + max_new_tokens,
            suppress_blank=True,
            suppress_tokens=[-1],
            no_repeat_ngram_size=0,
        )[0]
        return tokenizer.decode(result.sequences_ids[0]).strip()

    async def _transcribe(self, job: Job, chunks: list[np.ndarray], language: str) -> tuple[str, float]:
        audio = np.concatenate(chunks).astype(np.float32) / 32768.0 if chunks else np.zeros(0, np.float32)
        started = time.perf_counter()
        text = await asyncio.get_running_loop().run_in_executor(self._pool, self.transcribe, audio, language)
        elapsed = time.perf_counter() - started
        job.count(0.0, elapsed)
        return text, len(audio) / STT_SAMPLE_RATE

    async def run(self, job: Job) -> None:
        params: SttParams = job.params
        self._tokenizer(params.language)  # refuse an unsupported language before any audio
        chunks: list[np.ndarray] = []
        samples = 0
        since_partial = 0
        partial_every = int(self.settings.partial_interval_s * STT_SAMPLE_RATE)
        max_samples = int(self.settings.max_utterance_s * STT_SAMPLE_RATE)
        partial: asyncio.Task[None] | None = None
        superseded = asyncio.Event()
        try:
            while (item := await job.next_input()) is not None:
                if isinstance(item, TextInput):
                    raise ProtocolError(ErrorCode.BAD_FORMAT, "speech-to-text jobs take PCM frames, not text", job.job_id)
                pcm = require_pcm(item, STT_SAMPLE_RATE)
                samples += len(pcm)
                if samples > max_samples:
                    raise ProtocolError(
                        ErrorCode.LIMIT, f"utterance longer than {self.settings.max_utterance_s:g} s", job.job_id
                    )
                chunks.append(pcm)
                since_partial += len(pcm)
                # One partial decode at a time: if one is still running, the next covers more audio.
                if params.partials and since_partial >= partial_every and (partial is None or partial.done()):
                    since_partial = 0
                    partial = asyncio.create_task(self._partial(job, list(chunks), params.language, superseded))
        finally:
            superseded.set()  # a partial still decoding must not follow the final transcript
        text, audio_s = await self._transcribe(job, chunks, params.language)
        job.count(audio_s, 0.0)
        job.stats["audio_s"] = round(audio_s, 3)
        await job.emit(SttResult(text=text, final=True, audio_s=round(audio_s, 3)).model_dump())

    async def _partial(self, job: Job, chunks: list[np.ndarray], language: str, superseded: asyncio.Event) -> None:
        try:
            text, audio_s = await self._transcribe(job, chunks, language)
            if not superseded.is_set():
                await job.emit(SttResult(text=text, final=False, audio_s=round(audio_s, 3)).model_dump())
        except Exception:  # the job itself reports failures; a lost partial is harmless
            pass

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
