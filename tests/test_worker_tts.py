"""The TTS worker on the real voice (piper en_US-joe-medium)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from stream.audio import rms_dbfs
from stream.protocol import JobResult, MediaFrame, WorkerKind
from stream.protocol.jobs import TtsParams, TtsResult
from stream.worker_client import JobFailed, SpeechChunk

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
    assert [c.clause for c in clauses] == ["Hello there, this is a short test of the speech worker.", "It should sound clear."]
    assert abs(sum(c.audio_s for c in clauses) - seconds) < 0.01


async def test_text_in_pieces_speaks_the_first_clause_before_the_rest_arrives(start_worker, connect):
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
    for token in ["Sure", ",", " the", " answer", " is", " forty", " two", ".", " And"]:
        await job.send_text(token)
    # The first clause is complete; its audio comes although the job is still open.
    await asyncio.wait_for(first_audio.wait(), 10)
    assert [r.clause for r in results] in ([], ["Sure, the answer is forty two."])
    for token in [" that", " is", " all"]:
        await job.send_text(token)
    await job.end()
    await asyncio.wait_for(collector, 10)
    assert [r.clause for r in results] == ["Sure, the answer is forty two.", "And that is all"]


async def test_cancel_stops_speech(start_worker, connect):
    _, url = await start_worker(WorkerKind.TTS)
    tts = await connect(url)
    long_text = " ".join(f"This is sentence number {n} of a long answer." for n in range(40))
    job = await tts.start_job(TtsParams(text=long_text))
    await job.end()
    clauses = 0
    async for event in job.events():
        if isinstance(event, JobResult):
            clauses += 1
            if clauses == 1:
                await job.cancel()
    assert job.done.reason == "cancelled"
    assert clauses < 40


async def test_media_input_is_refused(start_worker, connect):
    _, url = await start_worker(WorkerKind.TTS)
    tts = await connect(url)
    job = await tts.start_job(TtsParams())
    await job.send_audio(np.zeros(160, np.int16))
    with pytest.raises(JobFailed, match="bad_format"):
        [e async for e in job.events()]
