"""Text to speech with piper: text in (whole or in pieces), PCM out, piece by piece.

Each ``job.text`` piece is one unit of speech, spoken in order (the gateway
cuts an answer into pieces with :class:`gateway.clauses.SpeechChunker`; the
worker never cuts again); ``params.text`` is a whole text at once. Within a
unit, piper's own sentence split (espeak-ng) is followed, and each
sentence's audio is sent as soon as it is synthesized. After each unit's
audio a ``job.result`` names it, so a client knows exactly what has been
spoken (failover resumes at the first piece not yet spoken). Cancel is
checked between sentences and between audio frames.

A sentence longer than :data:`MAX_SENTENCE_PHONEMES` is spoken in parts
(:func:`split_sentence`), so that the worker's memory has a bound: it is
sized for a part of that length at load and never grows after.

Piper puts 50-80 ms of near-silence before a sentence and several hundred
after it. The leading part only delays speech, so it is cut to
``LEAD_KEEP_S``; the trailing part becomes a pause that fits how the unit
ends (:func:`pause_after`): a full stop pauses, a piece cut between two
words of a sentence does not.
"""

from __future__ import annotations

import asyncio
import math
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
MAX_SENTENCE_PHONEMES = 100
"""The longest piece of a sentence synthesized at once (~20 words, 5-6 s of speech).

onnxruntime keeps the memory arena that piper's longest synthesis needed
for the process's life, and its size follows the audio made: 2-vCPU AMD
EPYC, RSS 170 MB before, 261 after a 20-word sentence, 468 after a 50-word
one, and shorter ones after that never give it back. So a longer sentence
is cut in parts (:func:`split_sentence`; fewer phonemes at a slower
``length_scale``), and each load synthesizes, once per slot at the same
time, a part longer in audio than any part can be (:data:`WARM_UP_TEXT` at
:data:`WARM_UP_LENGTH_SCALE`): the arena is at its bound from the start.
"""
WARM_UP_TEXT = "Well I think that you could take the long road by the old mill and then follow the river south to the stone bridge"
"""Ordinary speech, over 100 phonemes (natural speech runs 50-64 ms a phoneme with this voice)..."""
WARM_UP_LENGTH_SCALE = 1.6
"""...spoken slowly enough (~90 ms a phoneme) to outlast any part at its natural rate."""
PAUSE_PHONEMES = frozenset(",;:")
"""Phonemes (espeak-ng's punctuation) after which a long sentence is best cut."""


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


def split_sentence(phonemes: list[str], limit: int) -> list[list[str]]:
    """One sentence's phonemes in as few parts of at most ``limit`` as it takes, of about
    equal length: each cut after the pause (``,;:``) nearest that length, else at the
    word break nearest it, else (one huge word) at the limit."""
    parts = []
    while len(phonemes) > limit:
        target = math.ceil(len(phonemes) / math.ceil(len(phonemes) / limit))
        window = phonemes[:limit]
        pauses = [i + 1 for i, p in enumerate(window) if p in PAUSE_PHONEMES]
        spaces = [i for i, p in enumerate(window) if p == " " and i > 0]
        candidates = pauses or spaces or [limit]
        cut = min(candidates, key=lambda i: abs(i - target))
        parts.append(phonemes[:cut])
        phonemes = phonemes[cut:]
        while phonemes and phonemes[0] == " ":
            phonemes = phonemes[1:]
    if phonemes:
        parts.append(phonemes)
    return parts


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
        # onnxruntime's pool threads spin between operators by default: on a box whose other
        # cores are busy (the LLM answering) the spinning takes the CPU the work needs. 4 words
        # on a 2-vCPU AMD EPYC, one core busy: 98 ms with 1 thread, 116 with 2 spinning, 80 with
        # 2 not spinning (idle: 100, 72, 59).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.voice.session = onnxruntime.InferenceSession(str(model.path), sess_options=options, providers=["CPUExecutionProvider"])
        self.sample_rate = self.voice.config.sample_rate
        # espeak-ng (phonemization) keeps global state: one caller at a time.
        self._phonemize_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(settings.capacity, thread_name_prefix="tts")
        self._warm_up(settings.capacity)

    def _warm_up(self, slots: int) -> None:
        """Synthesize once at load: the voice's first synthesis costs several times a later
        one, and each slot's longest part sizes the memory arena for good (see
        :data:`MAX_SENTENCE_PHONEMES`): paid here, not in someone's answer."""
        self.synthesize("Hello.", SynthesisConfig())
        with self._phonemize_lock:
            longest = self.voice.phonemize(WARM_UP_TEXT)[0][:MAX_SENTENCE_PHONEMES]
        slow = SynthesisConfig(length_scale=WARM_UP_LENGTH_SCALE)
        for future in [self._pool.submit(self.sentence_audio, longest, slow) for _ in range(slots)]:
            future.result()

    def synthesize(self, text: str, config: SynthesisConfig, cancel: threading.Event | None = None) -> np.ndarray:
        """Mono int16 PCM of ``text`` at ``self.sample_rate``, as piper makes it (blocking)."""
        pieces = []
        for phonemes in self.phonemize(text, config.length_scale):
            if cancel is not None and cancel.is_set():
                break
            pieces.append(self.sentence_audio(phonemes, config))
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int16)

    def phonemize(self, text: str, length_scale: float | None = None) -> list[list[str]]:
        """Phonemes of ``text``, one list per sentence or part of a long one
        (:func:`split_sentence`; blocking, espeak-ng is serialized)."""
        return [part for _, part in self.phonemize_parts(text, length_scale)]

    def phonemize_parts(self, text: str, length_scale: float | None = None) -> list[tuple[bool, list[str]]]:
        """(ends a sentence, phonemes) of each piece of ``text`` synthesized at once, in order."""
        with self._phonemize_lock:
            sentences = [phonemes for phonemes in self.voice.phonemize(text) if phonemes]
        slower = max(1.0, (length_scale or 1.0) / self.voice.config.length_scale)
        out = []
        for sentence in sentences:
            parts = split_sentence(sentence, int(MAX_SENTENCE_PHONEMES / slower))
            out += [(i == len(parts) - 1, part) for i, part in enumerate(parts)]
        return out

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
        sentences = await loop.run_in_executor(self._pool, self.phonemize_parts, text, config.length_scale)
        seconds = 0.0
        continues = False  # this part goes on a sentence cut in parts: no pause before it either
        for index, (ends_sentence, phonemes) in enumerate(sentences):
            if job.cancelled:
                break
            compute_started = time.perf_counter()
            pcm = await loop.run_in_executor(self._pool, self.sentence_audio, phonemes, config)
            job.count(len(pcm) / self.sample_rate, time.perf_counter() - compute_started)
            last = index == len(sentences) - 1
            after = pause_after(text) if last else None if ends_sentence else pause_after("".join(phonemes))
            pcm = trim_silence(pcm, self.sample_rate, LEAD_KEEP_S if index == 0 or continues else 1.0, after)
            continues = not ends_sentence
            if "first_audio_s" not in job.stats:
                job.stats["first_audio_s"] = round(time.perf_counter() - job_started, 4)
            seconds += len(pcm) / self.sample_rate
            await job.emit_audio(pcm, self.sample_rate)
        await job.emit(TtsResult(clause=text.strip(), audio_s=round(seconds, 3), sample_rate=self.sample_rate).model_dump())

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)  # work still running must not lose its model
