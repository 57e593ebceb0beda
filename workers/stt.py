"""Speech to text with faster-whisper (CTranslate2 Whisper).

A job is one utterance of 16 kHz mono PCM. While audio arrives, a partial
transcript of everything so far is produced every ``partial_interval_s`` of new
audio (less often on a box too slow for that: :class:`_Utterance`); a
``job.flush`` gets a careful transcript of everything so far at once (the
gateway sends it when the person pauses), and ``job.end`` the final one.
Audio is buffered, never dropped: if a decode is still running when more
audio arrives, the next one simply covers more.

Decoding speed: faster-whisper's ``transcribe()`` pads every call to Whisper's
30 s window (~0.4-0.8 s here for any utterance). For utterances that fit a
shorter window we run the encoder on log-mel features padded (with zeros, as
faster-whisper pads) only to the nearest of 4/8/15 s, and decode with
timestamps so that text hallucinated into the padding can be cut off
(:func:`speech_tokens`); a loop or a second saying of the utterance inside
the audio is cut too (:func:`cut_loop`, :func:`cut_repeat`). Same
transcripts, ~10x faster. The padding policy lives in :func:`window_frames`
alone; a decode that still runs away falls back to the full 30 s path (1 of
the voice benchmark's 128 spoken questions, ~0.9 s against ~0.15 s, on a
2-vCPU AMD EPYC; 7 of 128 before :func:`cut_repeat`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer

from stream.config import SttSettings
from stream.protocol import ErrorCode, ProtocolError, WorkerKind
from stream.protocol.jobs import STT_SAMPLE_RATE, SttParams, SttResult

from .engine import Engine
from .job import FlushInput, Job, TextInput, require_pcm
from .model_files import ModelFile

FRAMES_PER_SECOND = 100  # Whisper's log-mel hop is 10 ms
SHORT_WINDOWS_S = (4, 8, 15)
"""Encoder windows tried before the full 30 s one; each fits a shorter utterance."""
WINDOW_MARGIN_S = 0.3
MAX_WORDS_PER_S = 5.0
"""Faster than anyone speaks: a transcript with more words is a decoding loop."""
PARTIAL_DUTY = 1 / 3
"""At most this share of one decode thread goes to a job's partial transcripts."""


def window_frames(duration_s: float) -> int | None:
    """Feature frames to pad an utterance to, or ``None`` if it needs the full 30 s path."""
    for window in SHORT_WINDOWS_S:
        if duration_s + WINDOW_MARGIN_S <= window:
            return window * FRAMES_PER_SECOND
    return None


def speech_tokens(tokens: list[int], timestamp_begin: int, duration_s: float) -> list[int]:
    """Text tokens of the segments that start inside the audio (not in the padding)."""
    kept: list[int] = []
    segment_start = 0.0
    for token in tokens:
        if token >= timestamp_begin:
            segment_start = (token - timestamp_begin) * 0.02  # Whisper timestamps are 20 ms steps
        elif segment_start < duration_s - 0.1:
            kept.append(token)
    return kept


def cut_loop(tokens: list[int], min_period: int = 2) -> tuple[list[int], bool]:
    """Cut a decode that loops to the first turn of the loop.

    Whisper sometimes repeats an utterance (``A A A``) or a fragment
    (``... bank. B... B... B...``) into padded silence when no timestamp stops
    it. A tail that repeats exactly, at least twice if it is the whole decode
    and three times otherwise, is that loop, not speech.
    """
    n = len(tokens)
    for start in range(n):
        for period in range(min_period, (n - start) // 2 + 1):
            turns = (n - start) / period
            if turns >= (2 if start == 0 else 3) and tokens[start + period :] == tokens[start : n - period]:
                return tokens[: start + period], True
    return tokens, False


MIN_REPEAT_WORDS = 3
"""A repeat of fewer words ("no, no", "thank you, thank you") may well have been said."""


def cut_repeat(text: str) -> tuple[str, bool]:
    """Cut a transcript that says the utterance again to its first saying.

    tiny.en sometimes squeezes the whole utterance into the first second or
    two of its timeline and then says it again inside the audio ("Describe the
    ocean. Describe the ocean. Describe the"), where no timestamp marks the
    copy as padding and :func:`cut_loop` misses it because the copies differ
    in capitals and punctuation. Compared word by word (lower case, no
    punctuation): if, from word ``p`` on (``p >= MIN_REPEAT_WORDS``), every
    word repeats the one ``p`` before it, the text is one saying and copies.
    """
    words = text.split()
    normal = ["".join(c for c in word.lower() if c.isalnum()) for word in words]
    spoken = [index for index, word in enumerate(normal) if word]
    said = [normal[index] for index in spoken]
    for period in range(MIN_REPEAT_WORDS, len(said) - MIN_REPEAT_WORDS + 1):
        if all(said[i] == said[i - period] for i in range(period, len(said))):
            return " ".join(words[: spoken[period]]), True
    return text, False


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
            # One model replica per decode thread below: a final never waits for a replica.
            num_workers=2 * settings.capacity,
        )
        self._tokenizers: dict[str, Tokenizer] = {}
        self._decodes: set[Future[str]] = set()
        """Decodes submitted and not done (those of jobs already over included)."""
        self._decode_pool = ThreadPoolExecutor(settings.capacity, thread_name_prefix="stt-final")
        """Flushes and finals: what a client waits for."""
        self._partial_pool = ThreadPoolExecutor(settings.capacity, thread_name_prefix="stt-partial")
        self._warm_up()

    def _warm_up(self) -> None:
        """Decode once on every model replica at load: a replica's first decode costs several times a
        later one, and would otherwise land on someone's first transcript (and in the selection's estimate)."""
        noise = np.random.default_rng(0).normal(0, 0.01, STT_SAMPLE_RATE).astype(np.float32)
        pools = [self._decode_pool, self._partial_pool] * self.settings.capacity
        for future in [pool.submit(self.transcribe, noise) for pool in pools]:
            future.result()

    def _tokenizer(self, language: str) -> Tokenizer:
        if language not in self._tokenizers:
            multilingual = self.whisper.model.is_multilingual
            if not multilingual and language != "en":
                raise ProtocolError(ErrorCode.BAD_PARAMS, f"this model is English-only, not {language!r}")
            self._tokenizers[language] = Tokenizer(self.whisper.hf_tokenizer, multilingual, task="transcribe", language=language if multilingual else None)
        return self._tokenizers[language]

    def transcribe(self, audio: np.ndarray, language: str = "en") -> str:
        """Transcribe float32 16 kHz mono audio (blocking)."""
        duration = len(audio) / STT_SAMPLE_RATE
        if duration < 0.1:
            return ""
        frames = window_frames(duration)
        if frames is None:
            return self._transcribe_full(audio, language)
        tokenizer = self._tokenizer(language)
        features = self.whisper.feature_extractor(audio)[:, :frames]
        features = np.pad(features, ((0, 0), (0, frames - features.shape[1])))
        encoded = self.whisper.encode(features)
        # Timestamps on: without them tiny.en often repeats the utterance into
        # the padded silence; with them, text whose segment starts after the
        # audio ends is recognisably padding and is dropped.
        prompt = list(tokenizer.sot_sequence)
        max_new_tokens = int(12 * duration) + 24  # ~3 words/s at most, plus timestamps
        result = self.whisper.model.generate(
            encoded,
            [prompt],
            beam_size=1,
            max_length=len(prompt) + max_new_tokens,
            suppress_blank=True,
            suppress_tokens=[-1],
        )[0]
        tokens = speech_tokens(result.sequences_ids[0], tokenizer.timestamp_begin, duration)
        tokens, looped = cut_loop(tokens)
        if not looped and len(result.sequences_ids[0]) >= max_new_tokens:
            return self._transcribe_full(audio, language)  # ran away: the slow, robust path
        text, _ = cut_repeat(tokenizer.decode(tokens).strip())
        if len(text.split()) > MAX_WORDS_PER_S * duration + 2:
            # More words than anyone says in that time: a loop that cut_loop could not see
            # (its copies differ, "basket. ... basket?"). The slow, robust path.
            return self._transcribe_full(audio, language)
        return text

    def _transcribe_full(self, audio: np.ndarray, language: str) -> str:
        # One temperature: faster-whisper's default decodes again at five more
        # when the text compresses too well, which speech that repeats itself
        # does; 29 s of a person saying the same four questions again took 10 s
        # instead of 1.35 s, for the same transcript (2-vCPU AMD EPYC). A true
        # loop is bounded by Whisper's 448 tokens per 30 s window.
        segments, _ = self.whisper.transcribe(audio, language=language, beam_size=1, condition_on_previous_text=False, temperature=0.0)
        return " ".join(segment.text.strip() for segment in segments).strip()

    async def _transcribe(self, job: Job, chunks: list[np.ndarray], language: str, pool: ThreadPoolExecutor) -> tuple[str, float, float]:
        """(text, audio seconds, compute seconds) of ``chunks``, decoded in ``pool`` (cancelled: dropped if
        not started yet, else it runs on, counted in :meth:`settled`)."""
        audio = np.concatenate(chunks).astype(np.float32) / 32768.0 if chunks else np.zeros(0, np.float32)
        started = time.perf_counter()
        decode = pool.submit(self.transcribe, audio, language)
        self._decodes.add(decode)
        decode.add_done_callback(self._decodes.discard)  # in the decoding thread: a set's discard is atomic
        text = await asyncio.wrap_future(decode)
        elapsed = time.perf_counter() - started
        job.count(0.0, elapsed)
        return text, len(audio) / STT_SAMPLE_RATE, elapsed

    async def run(self, job: Job) -> None:
        params: SttParams = job.params
        self._tokenizer(params.language)  # refuse an unsupported language before any audio
        utterance = _Utterance(job, self, params)
        try:
            while (item := await job.next_input(flushes=True)) is not None:
                if isinstance(item, FlushInput):
                    utterance.flush()
                    continue
                if isinstance(item, TextInput):
                    raise ProtocolError(ErrorCode.BAD_FORMAT, "speech-to-text jobs take PCM frames, not text", job.job_id)
                pcm = require_pcm(item, STT_SAMPLE_RATE)
                if utterance.samples + len(pcm) > self.settings.max_utterance_s * STT_SAMPLE_RATE:
                    raise ProtocolError(ErrorCode.LIMIT, f"utterance longer than {self.settings.max_utterance_s:g} s", job.job_id)
                utterance.add(pcm)
            text, audio_s = await utterance.final()
        finally:
            utterance.close()
        job.count(max(0.0, audio_s - utterance.counted_s), 0.0)
        job.stats["audio_s"] = round(audio_s, 3)
        await job.emit(SttResult(text=text, final=True, audio_s=round(audio_s, 3)).model_dump())

    async def settled(self) -> None:
        """Return once no decode runs, a cancelled job's included."""
        while running := [decode for decode in list(self._decodes) if not decode.done()]:
            await asyncio.wait([asyncio.wrap_future(decode) for decode in running])

    def close(self) -> None:
        self._decode_pool.shutdown(wait=True, cancel_futures=True)  # a decode still running must not lose its model
        self._partial_pool.shutdown(wait=True, cancel_futures=True)


class _Utterance:
    """One job's audio and the decodes running on it.

    Three kinds of decode, in two thread pools, so that the one a client
    waits for never queues behind one it does not: *partials* (every
    ``partial_interval_s`` of new audio, one at a time, in the partial pool)
    and *flushes* and the *final* (in the decode pool). A partial waits at
    least ``1 / PARTIAL_DUTY - 1`` times as long as the last one took, so on a
    box too slow to keep up partials thin out instead of piling up. Results
    go out in order of the audio they cover: a partial that finishes after a
    flush covering more audio is dropped.

    Flushes are coalesced: at most one decodes at a time, and the flushes that
    come meanwhile become one, of all the audio by the time it starts, whose
    transcript answers each of them (the protocol promises one flushed result
    per ``job.flush``, in order; the gateway counts them). A
    person who talks on with short pauses (a monologue: a flush at every
    pause) so costs at most one decode in flight and one waiting per job,
    never a line of 20-30 s decodes that the final queues behind (measured
    before: no output for 20 s, the worker dropped as stalled).

    A job that ends early (cancelled, refused, failed) starts no new decode;
    one not started yet is dropped, but one running cannot be stopped
    (CTranslate2 runs it to the end: up to ~2 s for 30 s of audio on a
    2-vCPU box). The job ends at once all the same, and the worker's idle
    trim waits for such decodes (:meth:`SttEngine.settled`): trimmed before
    they ended, the heap kept what they freed after (measured: +66% RSS
    after a monologue).
    """

    def __init__(self, job: Job, engine: SttEngine, params: SttParams, clock: Callable[[], float] = time.perf_counter) -> None:
        self.job = job
        self.clock = clock
        self.engine = engine
        self.params = params
        self.chunks: list[np.ndarray] = []
        self.samples = 0
        self._since_partial = 0
        self._partial_every = int(engine.settings.partial_interval_s * STT_SAMPLE_RATE)
        self._partial: asyncio.Task[None] | None = None
        self._partial_allowed_at = 0.0
        self._flush: asyncio.Task[str] | None = None
        self._flush_to = -1
        """Samples the last flush asked for (-1: none yet)..."""
        self._flush_chunks = 0
        """...and the chunks that hold them."""
        self._flushes = self._flushes_answered = 0
        """``job.flush`` messages received, and answered (each gets one flushed result)."""
        self._covered = 0
        """Samples covered by the last result sent; an older one is not sent after it."""
        self._counted = 0
        """Samples counted as work done (for the worker's service rate)."""

    def add(self, pcm: np.ndarray) -> None:
        self.chunks.append(pcm)
        self.samples += len(pcm)
        self._since_partial += len(pcm)
        if (
            self.params.partials
            and self._since_partial >= self._partial_every
            and (self._partial is None or self._partial.done())
            and (self._flush is None or self._flush.done())
            and self.clock() >= self._partial_allowed_at
        ):
            self._since_partial = 0
            self._partial = asyncio.create_task(self._run_partial(list(self.chunks), self.samples))

    def flush(self) -> None:
        """Decode everything so far: now, or right after the flush decoding now (results stay in order)."""
        self._flush_to, self._flush_chunks = self.samples, len(self.chunks)
        self._flushes += 1
        if self._flush is None or self._flush.done():
            self._flush = asyncio.create_task(self._run_flushes())

    async def final(self) -> tuple[str, float]:
        """The final transcript: the last flush's, if no audio came after it."""
        if self._flush is not None and self._flush_to == self.samples:
            return await self._flush, self.samples / STT_SAMPLE_RATE
        text, audio_s, _ = await self.engine._transcribe(self.job, self.chunks, self.params.language, self.engine._decode_pool)
        return text, audio_s

    @property
    def counted_s(self) -> float:
        return self._counted / STT_SAMPLE_RATE

    def close(self) -> None:
        """Start no more decodes, and drop the ones not started (see the class)."""
        for task in (self._partial, self._flush):
            if task is None:
                continue
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # seen: a flush that failed after the job did is not news

    async def _run_partial(self, chunks: list[np.ndarray], samples: int) -> None:
        try:
            text, audio_s, took = await self.engine._transcribe(self.job, chunks, self.params.language, self.engine._partial_pool)
            self._partial_allowed_at = self.clock() + took * (1 / PARTIAL_DUTY - 1)
            if samples > self._covered:
                self._covered = samples
                await self.job.emit(SttResult(text=text, final=False, audio_s=round(audio_s, 3)).model_dump())
        except Exception:  # the job itself reports failures; a lost partial is harmless
            pass

    async def _run_flushes(self) -> str:
        """Flush until the latest flush asked for is decoded; its text."""
        text = ""
        while self._flushes_answered < self._flushes:
            flushed, asked = self._flush_to, self._flushes
            text, audio_s, _ = await self.engine._transcribe(self.job, self.chunks[: self._flush_chunks], self.params.language, self.engine._decode_pool)
            self.job.count(max(0, flushed - self._counted) / STT_SAMPLE_RATE, 0.0)  # the service rate counts this audio
            self._counted = max(self._counted, flushed)
            self._covered = max(self._covered, flushed)
            result = SttResult(text=text, final=False, flushed=True, audio_s=round(audio_s, 3)).model_dump()
            while self._flushes_answered < asked:
                self._flushes_answered += 1
                await self.job.emit(result)
        return text
