"""Sample inputs made on this box, with the embedded models: a spoken question and a sign to read.

``edgestream samples DIR`` writes them, so that every example in the README
works on a fresh install without files from elsewhere. The piper voice here
is also how the harnesses and tests speak (``gateway/harness/speech.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stream.audio import resample, write_wav
from stream.config import TtsSettings
from stream.protocol import WorkerKind
from stream.protocol.jobs import STT_SAMPLE_RATE

if TYPE_CHECKING:
    from PIL.Image import Image

Say = Callable[[str], np.ndarray]
"""``say(text)``: the text spoken, as mono int16 at the rate asked for."""

QUESTION = "What is the capital of France?"
SIGN_TEXT = "EXIT GATE 7"


@contextmanager
def piper_voice(settings: TtsSettings | None = None, rate: int = STT_SAMPLE_RATE) -> Iterator[Say]:
    """The piper voice of ``settings`` (default: the embedded one, one thread) as ``say``; loaded once, closed on exit.

    Loading costs ~0.5 s and ~100 MB; each sentence ~0.1-0.5 s on 2 cores.
    """
    from piper import SynthesisConfig

    from .launch import load_engine

    tts = load_engine(WorkerKind.TTS, settings or TtsSettings(threads=1))
    try:
        yield lambda text: resample(tts.synthesize(text, SynthesisConfig()), tts.sample_rate, rate)
    finally:
        tts.close()


def sign_image(text: str = SIGN_TEXT, size: tuple[int, int] = (640, 360)) -> Image.Image:
    """A sign with ``text`` on it, as a camera would see one head-on (Pillow: a dependency of the vision and gateway extras)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((30, 100, size[0] - 30, 260), fill=(20, 90, 40))
    draw.text((60, 140), text, fill="white", font=ImageFont.load_default(size=64))
    return image


def write_samples(directory: Path) -> list[Path]:
    """Write ``question.wav`` (16 kHz, the question with a little silence around it) and ``sign.png``."""
    directory.mkdir(parents=True, exist_ok=True)
    with piper_voice() as say:
        speech = say(QUESTION)
    quiet = np.zeros(STT_SAMPLE_RATE // 2, np.int16)
    question, sign = directory / "question.wav", directory / "sign.png"
    write_wav(question, np.concatenate([quiet, speech, quiet]), STT_SAMPLE_RATE)
    sign_image().save(sign)
    return [question, sign]
