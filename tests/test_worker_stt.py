"""The STT worker on the real model (whisper tiny.en), over a real WebSocket."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from stream.protocol import JobResult, WorkerKind
from stream.protocol.jobs import STT_SAMPLE_RATE, SttResult
from stream.worker_client import JobFailed
from tests.conftest import word_error_rate

SENTENCES = [
    "Please turn on the kitchen lights.",
    "What is the weather like in Paris today?",
    "My favorite color is green.",
    "Can you read the sign on the door?",
    "The train to Boston leaves at seven.",
    "How many apples are in the basket?",
]


async def test_transcribes_piper_speech_with_low_word_error_rate(start_worker, connect, speak):
    _, url = await start_worker(WorkerKind.STT)
    stt = await connect(url)
    errors, words = 0.0, 0
    for sentence in SENTENCES:
        results = [r async for r in stt.transcribe(speak(sentence))]
        assert results[-1].final and not any(r.final for r in results[:-1])
        wer = word_error_rate(sentence, results[-1].text)
        # piper's voice varies from run to run and tiny.en slips on a word now and
        # then ("read the sign" -> "redesign"); the bar is the whole set's rate.
        assert wer <= 0.5, (sentence, results[-1].text)
        errors += wer * len(sentence.split())
        words += len(sentence.split())
    assert errors / words <= 0.15


async def test_partials_stream_while_audio_arrives(start_worker, connect, speak):
    _, url = await start_worker(WorkerKind.STT)
    stt = await connect(url)
    sentence = "The quick brown fox jumps over the lazy dog near the river bank."
    samples = speak(sentence)
    job = await stt.start_job({})
    partials_before_end: list[SttResult] = []
    results: list[SttResult] = []
    ended = asyncio.Event()

    async def collect() -> None:
        async for event in job.events():
            if isinstance(event, JobResult):
                result = SttResult.model_validate(event.data)
                results.append(result)
                if not ended.is_set():
                    partials_before_end.append(result)

    collector = asyncio.create_task(collect())
    step = STT_SAMPLE_RATE // 50  # 20 ms frames, paced like a live microphone
    for start in range(0, len(samples), step):
        await job.send_audio(samples[start : start + step])
        await asyncio.sleep(0.02)
    ended.set()
    await job.end()
    await asyncio.wait_for(collector, 30)
    seconds = len(samples) / STT_SAMPLE_RATE
    assert len(partials_before_end) >= int(seconds / 0.5) // 2, [r.audio_s for r in results]
    assert all(not r.final for r in partials_before_end)
    assert [r.audio_s for r in partials_before_end] == sorted(r.audio_s for r in partials_before_end)
    assert results[-1].final and word_error_rate(sentence, results[-1].text) <= 0.25
    assert job.done is not None and job.done.reason == "complete"


async def test_cancel_ends_the_job_and_frees_the_slot(start_worker, connect, speak):
    server, url = await start_worker(WorkerKind.STT)
    stt = await connect(url)
    job = await stt.start_job({})
    await job.send_audio(speak("Cancel this one please.")[:8000])
    await job.cancel()
    events = [e async for e in job.events()]
    assert all(not (isinstance(e, JobResult) and e.data["final"]) for e in events)
    assert job.done is not None and job.done.reason == "cancelled"
    assert (await stt.request_load()).running == 0 and server.running == 0


async def test_wrong_audio_format_fails_only_that_job(start_worker, connect, speak):
    _, url = await start_worker(WorkerKind.STT)
    stt = await connect(url)
    bad = await stt.start_job({})
    await bad.send_audio(np.zeros(4410, np.int16), sample_rate=44100)
    with pytest.raises(JobFailed) as info:
        async for _ in bad.events():
            pass
    assert info.value.code.value == "bad_format" and "16000 Hz" in info.value.message
    results = [r async for r in stt.transcribe(speak("My favorite color is green."))]
    assert word_error_rate("My favorite color is green.", results[-1].text) <= 0.2


async def test_english_only_model_refuses_another_language(start_worker, connect):
    _, url = await start_worker(WorkerKind.STT)
    stt = await connect(url)
    job = await stt.start_job({"language": "de"})
    with pytest.raises(JobFailed, match="English-only"):
        async for _ in job.events():
            pass
