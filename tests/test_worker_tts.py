"""The TTS worker on the real voice (piper en_US-joe-medium)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from stream.audio import rms_dbfs
from stream.protocol import JobResult, MediaFrame, WorkerKind
from stream.protocol.jobs import TtsParams, TtsResult
from stream.worker_client import JobFailed, SpeechChunk

pytestmark = pytest.mark.models  # real models or processes of the system: the slow tier

TEXT = "Hello there, this is a short test of the speech worker. It should sound clear."


async def test_speech_has_plausible_duration_and_energy(start_worker, connect):
    _, url = await start_worker(WorkerKind.TTS)
    tts = await connect(url)
    chunks, clauses = [], []
    async for item in tts.synthesize(TEXT):
        (chunks if isinstance(item, SpeechChunk) else clauses).append(item)
    pcm = np.concatenate([c.pcm for c in chunks])
    rate = chunks[0].sample_rate
    assert rate == 22050 and all(c.sample_rate == rate for c in chunks)
    seconds = len(pcm) / rate
    words = len(TEXT.split())
    assert 1.2 <= words / seconds <= 5.0, seconds  # people speak 2-3 words a second
    assert rms_dbfs(pcm) > -35
    assert [c.clause for c in clauses] == [TEXT]  # a whole text is one unit, spoken sentence by sentence
    assert abs(sum(c.audio_s for c in clauses) - seconds) < 0.01


async def test_each_piece_is_spoken_as_it_comes_while_the_job_stays_open(start_worker, connect):
    _, url = await start_worker(WorkerKind.TTS)
    tts = await connect(url)
    job = await tts.start_job(TtsParams())
    first_audio = asyncio.Event()
    results: list[TtsResult] = []

    async def collect() -> None:
        async for event in job.events():
            if isinstance(event, MediaFrame):
                first_audio.set()
            elif isinstance(event, JobResult):
                results.append(TtsResult.model_validate(event.data))

    collector = asyncio.create_task(collect())
    await job.send_text("Sure, the answer")  # a piece is a unit: no waiting for punctuation
    await asyncio.wait_for(first_audio.wait(), 10)
    await job.send_text("is forty two.")
    await job.end()
    await asyncio.wait_for(collector, 10)
    assert [r.clause for r in results] == ["Sure, the answer", "is forty two."]


async def speak_piece(tts, text: str) -> np.ndarray:
    job = await tts.start_job(TtsParams())
    await job.send_text(text)
    await job.end()
    return np.concatenate([np.frombuffer(e.payload, "<i2") async for e in job.events() if isinstance(e, MediaFrame)])


async def test_speech_starts_without_leading_silence_and_pauses_as_the_text_ends(start_worker, connect, speak):
    from workers.tts import LEAD_KEEP_S, SILENCE_LEVEL

    _, url = await start_worker(WorkerKind.TTS)
    tts = await connect(url)
    rate = 22050
    loud = SILENCE_LEVEL * 32767

    def silence_at_edges(pcm: np.ndarray) -> tuple[float, float]:
        voiced = np.flatnonzero(np.abs(pcm) > loud)
        return voiced[0] / rate, (len(pcm) - 1 - voiced[-1]) / rate

    for text in ("The nearest train station", "Sure.", "Five"):
        lead, _ = silence_at_edges(await speak_piece(tts, text))
        assert lead <= LEAD_KEEP_S + 0.002, (text, lead)  # piper alone starts with 30-60 ms of it
    _, tail_mid_sentence = silence_at_edges(await speak_piece(tts, "The nearest train station"))
    _, tail_sentence = silence_at_edges(await speak_piece(tts, "It is near."))
    assert tail_mid_sentence <= 0.035 < tail_sentence <= 0.26  # a cut between words carries straight on


async def test_cancel_stops_speech(start_worker, connect):
    _, url = await start_worker(WorkerKind.TTS)
    tts = await connect(url)
    long_text = " ".join(f"This is sentence number {n} of a long answer." for n in range(40))
    job = await tts.start_job(TtsParams(text=long_text))
    await job.end()
    seconds, results = 0.0, 0
    async for event in job.events():
        if isinstance(event, MediaFrame):
            if seconds == 0.0:
                await job.cancel()  # the first sentence is out: stop
            seconds += len(event.payload) / 2 / event.sample_rate
        else:
            results += 1
    assert job.done.reason == "cancelled"
    assert results == 0 and 0 < seconds < 40 * 1.5  # sentence by sentence: stopped long before the end


async def test_media_input_is_refused(start_worker, connect):
    _, url = await start_worker(WorkerKind.TTS)
    tts = await connect(url)
    job = await tts.start_job(TtsParams())
    await job.send_audio(np.zeros(160, np.int16))
    with pytest.raises(JobFailed, match="bad_format"):
        [e async for e in job.events()]


async def test_text_over_the_limit_is_refused_as_it_arrives_not_after_it_is_queued(start_worker, connect):
    from tests.conftest import engine_for

    engine = engine_for(WorkerKind.TTS, max_text_chars=1000)
    _server, url = await start_worker(WorkerKind.TTS, capacity=1, engine=engine, max_queue=1)
    tts = await connect(url)
    busy = await tts.start_job(TtsParams())  # holds the one slot: the next job waits, its text queued
    await busy.send_text("Hello there, this keeps the worker busy for a moment.")
    waiting = await tts.start_job(TtsParams())
    for _ in range(4):
        await waiting.send_text("." * 300)  # 1,200 characters: over the limit at the fourth piece
    with pytest.raises(JobFailed) as info:
        async with asyncio.timeout(10):  # refused while still waiting for a slot: not read, not spoken
            [e async for e in waiting.events()]
    assert info.value.code.value == "limit" and "1000 characters" in info.value.message
    await busy.end()
    assert [e async for e in busy.events() if isinstance(e, MediaFrame)]  # the busy job, and the link, are fine
