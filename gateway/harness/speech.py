"""Questions spoken aloud for harnesses and tests: the embedded piper voice, and espeak-ng's voices and accents.

Every benchmark, chaos run and test that needs speech with known words gets
it from :func:`piper_voice` (written once, in ``workers/samples.py``) or :func:`espeak`.
"""

from __future__ import annotations

import subprocess
import tempfile

import numpy as np

from stream.audio import read_wav, resample
from stream.protocol.jobs import STT_SAMPLE_RATE
from workers.samples import Say, piper_voice

__all__ = ["Say", "espeak", "piper_voice", "speak_with_piper", "trim_silence"]


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
