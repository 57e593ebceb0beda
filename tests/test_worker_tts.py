"""The TTS worker on the real voice (piper en_US-joe-medium)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.audio import rms_dbfs
from stream.protocol import JobResult, MediaFrame, WorkerKind
from stream.protocol.jobs import TtsParams, TtsResult
from stream.worker_client import JobFailed, SpeechChunk
from workers.tts import MAX_SENTENCE_PHONEMES

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


PHONEMES = st.lists(st.sampled_from([*"aeiouɪəˈˌmnszt", " ", " ", ",", ";", ":"]), max_size=400)


@settings(max_examples=300, deadline=None)
@given(PHONEMES, st.integers(min_value=4, max_value=120))
def test_a_long_sentence_is_cut_in_parts_within_the_limit_and_nothing_is_lost(phonemes, limit):
    from workers.tts import split_sentence

    parts = split_sentence(phonemes, limit)
    assert all(0 < len(part) <= limit for part in parts)
    assert all(part[0] != " " for part in parts[1:])  # a part never starts with the word break it was cut at
    assert "".join(phonemes).replace(" ", "") == "".join("".join(p) for p in parts).replace(" ", "")
    if len(phonemes) <= limit:
        assert parts == ([phonemes] if phonemes else [])


def test_a_long_sentence_is_cut_after_a_pause_into_parts_of_about_equal_length():
    from workers.tts import split_sentence

    words = [*"abc def,", " ", *"ghi jkl mno pqr st"]
    parts = split_sentence(words, 20)
    assert ["".join(p) for p in parts] == ["abc def,", "ghi jkl mno pqr st"]  # after the pause, not at the middle
    plain = list(" ".join(["word"] * 30))  # 149 phonemes, no pause: cut at word breaks, not 100 + 49
    lengths = [len(p) for p in split_sentence(plain, 100)]
    assert len(lengths) == 2 and max(lengths) - min(lengths) <= 5


def test_a_long_sentence_does_not_grow_the_workers_memory():
    """onnxruntime keeps the arena piper's longest synthesis needed: the load sizes it for the longest part."""
    from piper import SynthesisConfig

    from stream.memory import trim
    from tests.conftest import engine_for

    engine = engine_for(WorkerKind.TTS)
    long = " ".join(
        ["when you travel through the mountains in the early spring with the snow still lying on the high passes"]
        + ["and the rivers running fast and cold below the old stone bridges you will find that every village has its own bread"] * 2
    )
    assert max(len(s) for s in engine.voice.phonemize(long)) > 2 * MAX_SENTENCE_PHONEMES
    trim()
    before = _rss_mb()
    for scale in (None, 2.0):
        assert len(engine.synthesize(long, SynthesisConfig(length_scale=scale))) > 10 * engine.sample_rate
    trim()
    assert _rss_mb() < before * 1.05, (before, _rss_mb())


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024
