"""The gateway over real WebRTC (the SDK as client, aiortc on both ends) with the real models."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import pytest_asyncio

from gateway.server import Gateway
from stream.audio import rms_dbfs
from stream.config import GatewaySettings
from stream.protocol import WorkerKind
from stream.sdk import GatewaySession
from tests.conftest import word_error_rate

QUESTION = "What is the capital of France?"


@pytest_asyncio.fixture(loop_scope="session")
async def workers(start_worker):
    """One in-process worker of each kind on loopback; their servers, by kind."""
    servers, urls = {}, {}
    for kind in WorkerKind:
        servers[kind], url = await start_worker(kind, capacity=2)
        urls[kind] = [url]
    return servers, urls


@pytest_asyncio.fixture(loop_scope="session")
async def gateway(workers):
    _, urls = workers
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5), urls)
    port = await gateway.start("127.0.0.1", 0)
    await gateway.links.wait_ready(list(WorkerKind), timeout=10)
    gateway.url = f"ws://127.0.0.1:{port}/session"
    yield gateway
    await gateway.close()


def with_silence(samples: np.ndarray, before_s: float = 0.3, after_s: float = 0.8) -> np.ndarray:
    return np.concatenate([np.zeros(int(16000 * before_s), np.int16), samples, np.zeros(int(16000 * after_s), np.int16)])


async def test_a_spoken_question_gets_a_spoken_answer(gateway, speak):
    session = await GatewaySession.connect(gateway.url, loopback_ice=True)
    try:
        spoken = speak(QUESTION)
        speech_end = await session.say(with_silence(spoken, after_s=0.0), 16000)
        await session.say(np.zeros(16000, np.int16), 16000)
        partial = await session.wait_event("transcript.partial", timeout=20)
        final = await session.wait_event("transcript.final", timeout=20)
        assert word_error_rate(QUESTION, final["text"]) <= 0.2, final
        assert partial["turn"] == final["turn"] == 1
        token = await session.wait_event("answer.token", timeout=20)
        done = await session.wait_event("answer.done", timeout=30)
        assert token["text"] and done["text"].strip()
        latency = await session.wait_event("latency", timeout=30)
        for stage in ("end_of_turn", "stt_final", "first_token", "first_clause", "first_tts_audio", "first_audio_sent"):
            assert latency[stage] is not None and latency[stage] >= 0, latency
        assert latency["end_of_turn"] <= latency["stt_final"] <= latency["first_token"] <= latency["first_audio_sent"]
        heard = session.first_audible(after=speech_end)
        assert heard is not None
        # Wait until the answer has played out, then check what was heard.
        async with asyncio.timeout(30):
            while len(session.answer_audio(after=heard)) < 48000 * 0.5 or session.received[-1][0] - heard < 0.6:
                await asyncio.sleep(0.1)
        answer_audio = session.answer_audio(after=heard)
        assert len(answer_audio) / 48000 >= 0.5 and rms_dbfs(answer_audio) > -40
    finally:
        await session.close()
