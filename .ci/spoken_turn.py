"""One spoken turn against a running gateway, as a client would: CI's check of an installed wheel.

    python spoken_turn.py URL QUESTION.wav

Exits 0 when the question is transcribed, answered in text and the answer's
speech arrives; 1 with one line saying what was missing otherwise.
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np

from stream.audio import read_wav
from stream.sdk import GatewaySession


async def main(url: str, wav: str) -> int:
    samples, rate = read_wav(wav)
    session = await GatewaySession.connect(url, loopback_ice=True)
    try:
        await session.say(np.concatenate([samples, np.zeros(rate, np.int16)]), rate)
        heard = (await session.wait_event("transcript.final", timeout=60))["text"]
        answer = (await session.wait_event("answer.done", timeout=120))["text"]
        print(f"heard: {heard!r}\nanswer: {answer!r}")
        if not heard.strip() or not answer.strip():
            print("error: an empty transcript or answer")
            return 1
        try:  # the answer is spoken: loud frames arrive (the track carries silence between answers)
            async with asyncio.timeout(60):
                while not any(np.abs(pcm).max() > 2000 for _, pcm in session.received):
                    await asyncio.sleep(0.1)
        except TimeoutError:
            print(f"error: no answer speech in {session.frames_received} frames received")
            return 1
        print(f"answer speech received ({session.frames_received} frames)")
        return 0
    finally:
        await session.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2])))
