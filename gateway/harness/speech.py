"""Questions spoken aloud for harnesses and tests: the embedded piper voice, and espeak-ng's voices and accents.

Written once here: every benchmark, chaos run and test that needs speech with
known words gets it from :func:`piper_voice` or :func:`espeak`.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from stream.audio import read_wav, resample
from stream.config import TtsSettings
from stream.protocol import WorkerKind
from stream.protocol.jobs import STT_SAMPLE_RATE

Say = Callable[[str], np.ndarray]
"""``say(text)``: the text spoken, as mono int16 at the rate asked for."""


@contextmanager
def piper_voice(settings: TtsSettings | None = None, rate: int = STT_SAMPLE_RATE) -> Iterator[Say]:
    """The piper voice of ``settings`` (default: the embedded one, one thread) as ``say``; loaded once, closed on exit.

    Loading costs ~0.5 s and ~100 MB; each sentence ~0.1-0.5 s on 2 cores.
    """
    from piper import SynthesisConfig

    from workers.launch import load_engine

    tts = load_engine(WorkerKind.TTS, settings or TtsSettings(threads=1))
    try:
        yield lambda text: resample(tts.synthesize(text, SynthesisConfig()), tts.sample_rate, rate)
    finally:
        tts.close()


def speak_with_piper(*texts: str, rate: int = STT_SAMPLE_RATE) -> list[np.ndarray]:
    """``texts`` spoken by the embedded piper voice, at ``rate``."""
    with piper_voice(rate=rate) as say:
        return [say(text) for text in texts]


def espeak(text: str, voice: str, words_per_minute: int = 160, rate: int = STT_SAMPLE_RATE) -> np.ndarray:
    """``text`` spoken by espeak-ng's ``voice`` (Debian's ``espeak-ng``), at ``rate``."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as wav:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(words_per_minute), "-w", wav.name, text], check=True, capture_output=True)
        pcm, source_rate = read_wav(wav.name)
    return resample(pcm, source_rate, rate)


def trim_silence(samples: np.ndarray, threshold: int = 300) -> np.ndarray:
    """``samples`` without the near-silence before the first and after the last loud sample."""
    loud = np.flatnonzero(np.abs(samples) > threshold)
    return samples[loud[0] : loud[-1] + 1] if loud.size else samples
