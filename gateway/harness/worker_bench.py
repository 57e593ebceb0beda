"""``edgestream bench workers``: each worker kind, measured over a real WebSocket on loopback.

Figures are medians over ``runs`` repetitions, measured at the client (what
the gateway would see), with the worker's own compute time beside them. The
first request of each kind is a warm-up and not counted.

STT is measured twice: on three sentences in the embedded piper voice
(its real-time factor, comparable from run to run), and on every question of
the voice benchmark in each of its eight voices and accents once (final
transcript after the end of speech at the median, p95 and worst, and the word
error rate): a slow tail there is a decode that fell back to Whisper's full
30 s window.

``--wyoming tcp://host:port`` (repeatable) measures a Wyoming STT or TTS
server (wyoming-faster-whisper, wyoming-piper) in the same run, with the
same requests, through the gateway's own adapter
(``stream/wyoming_client.py``), and prints it beside the native worker of
its kind. Wyoming reports no compute time: the figures compared are the
ones measured at the client (final transcript after the end of speech;
first audio, and audio seconds per wall second).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from stream.config import Config
from stream.protocol import JobResult, MediaFormat, MediaFrame, WorkerKind
from stream.protocol.jobs import STT_SAMPLE_RATE, LlmParams, TtsParams
from stream.worker_client import WorkerClient
from stream.wyoming_client import WyomingClient
from workers.launch import load_engine
from workers.server import WorkerServer

from .figures import machine, median
from .speech import speak_with_piper
from .voice_bench import Spoken, spoken_questions, word_errors

SENTENCES = [
    "Please turn on the kitchen lights.",
    "What is the weather like in Paris today?",
    "Remind me to call my sister tomorrow morning at nine.",
]
QUESTION = "Tell me a short story about a cat who learns to swim."
SPOKEN = "Sure, the nearest pharmacy is two blocks north, next to the bakery."


def _median(values: list[float]) -> float:
    return median(values, 4)


async def _transcribe_timed(client: WorkerClient | WyomingClient, samples: np.ndarray) -> tuple[str, float, Any]:
    """(final transcript, ms from the end of speech to it, the job's done stats) of one utterance, sent at once."""
    job = await client.start_job({"partials": False})
    step = STT_SAMPLE_RATE // 50
    for start in range(0, len(samples), step):
        await job.send_audio(samples[start : start + step])
    ended = time.perf_counter()
    await job.end()
    text = ""
    async for event in job.events():
        if isinstance(event, JobResult) and event.data.get("final"):
            text = event.data.get("text", "")
    return text, (time.perf_counter() - ended) * 1000, job.done.stats if job.done is not None else {}


async def _bench_stt(client: WorkerClient | WyomingClient, runs: int, speech: list[np.ndarray], voices: list[Spoken]) -> dict[str, Any]:
    rtf, final_ms = [], []
    for run in range(runs + 1):
        for samples in speech:
            _, ms, stats = await _transcribe_timed(client, samples)
            if run:
                final_ms.append(ms)
                if "compute_s" in stats:
                    rtf.append(stats["compute_s"] / stats["audio_s"])
    voiced_ms, errors, words = [], 0, 0
    for spoken in voices:
        text, ms, _ = await _transcribe_timed(client, spoken.samples)
        voiced_ms.append(ms)
        wrong, said = word_errors(spoken.text, text)
        errors, words = errors + wrong, words + said
    return {
        "rtf_median": _median(rtf) if rtf else None,
        "final_after_end_ms_median": _median(final_ms),
        "utterance_s": [round(len(s) / STT_SAMPLE_RATE, 2) for s in speech],
        "voices_utterances": len(voices),
        "voices_final_after_end_ms_median": _median(voiced_ms),
        "voices_final_after_end_ms_p95": round(float(np.percentile(voiced_ms, 95)), 1),
        "voices_final_after_end_ms_max": round(max(voiced_ms), 1),
        "voices_wer": round(errors / words, 3),
    }


async def _bench_llm(client: WorkerClient, runs: int) -> dict[str, Any]:
    ttft, rate, tokens = [], [], []
    for run in range(runs + 1):
        job = await client.start_job(LlmParams(messages=[{"role": "user", "content": QUESTION}], max_tokens=64, temperature=0.0))
        started = time.perf_counter()
        await job.end()
        first = None
        count = 0
        async for event in job.events():
            if isinstance(event, JobResult):
                count += 1
                first = first or time.perf_counter()
        finished = time.perf_counter()
        if run and first is not None:
            ttft.append((first - started) * 1000)
            if count > 1:
                rate.append((count - 1) / (finished - first))
            tokens.append(count)
    return {"ttft_ms_median": _median(ttft), "tokens_per_s_median": _median(rate), "tokens_median": _median(tokens)}


async def _bench_tts(client: WorkerClient | WyomingClient, runs: int) -> dict[str, Any]:
    first_audio, rtf, speed = [], [], []
    for run in range(runs + 1):
        job = await client.start_job(TtsParams(text=SPOKEN))
        started = time.perf_counter()
        await job.end()
        first, audio_s = None, 0.0
        async for event in job.events():
            if isinstance(event, MediaFrame):
                first = first or time.perf_counter()
                audio_s += event.audio_seconds
        if run and first is not None:
            first_audio.append((first - started) * 1000)
            speed.append(audio_s / (time.perf_counter() - started))
            if job.done is not None and "compute_s" in job.done.stats:
                rtf.append(job.done.stats["compute_s"] / job.done.stats["audio_s"])
    return {"first_audio_ms_median": _median(first_audio), "rtf_median": _median(rtf) if rtf else None, "audio_s_per_wall_s_median": _median(speed)}


async def _bench_vision(client: WorkerClient, runs: int) -> dict[str, Any]:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (640, 360), "white")
    ImageDraw.Draw(image).text((60, 140), "EXIT GATE 7", fill="black", font=ImageFont.load_default(size=64))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    round_trip, compute = [], []
    for run in range(runs + 1):
        started = time.perf_counter()
        job = await client.start_job({})
        await job.send_image(buffer.getvalue(), MediaFormat.PNG)
        await job.end()
        async for _ in job.events():
            pass
        if run:
            round_trip.append((time.perf_counter() - started) * 1000)
            compute.append(job.done.stats["ms"])
    return {"ms_per_frame_median": _median(round_trip), "compute_ms_median": _median(compute), "frame": "640x360 PNG"}


class _SttSpeech:
    """The STT benchmark's speech, made once for the native worker and every Wyoming server."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._made: tuple[list[np.ndarray], list[Spoken]] | None = None

    def get(self) -> tuple[list[np.ndarray], list[Spoken]]:
        if self._made is None:
            self._made = speak_with_piper(*SENTENCES), spoken_questions(self.config, every_voice=True)
        return self._made


async def _bench_wyoming(url: str, runs: int, speech: _SttSpeech) -> tuple[WorkerKind, dict[str, Any]]:
    client = await WyomingClient.connect(url)
    try:
        if client.kind is WorkerKind.STT:
            figures = await _bench_stt(client, runs, *speech.get())
        else:
            figures = await _bench_tts(client, runs)
    finally:
        await client.close()
    figures.update(model=client.hello.model_id, server=client.hello.software)
    return client.kind, figures


def _print_side_by_side(kind: str, native: dict[str, Any], wyoming: dict[str, Any]) -> None:
    print(f"{kind:>6}  {'':<28} {'edgestream':>14} {'Wyoming':>14}")
    for key in native:
        if key in ("model", "threads", "utterance_s"):
            continue
        print(f"          {key:<28} {native[key]!s:>14} {wyoming.get(key)!s:>14}")
    print(f"          edgestream: {native.get('model')}, {native.get('threads')} thread(s); Wyoming: {wyoming.get('server')}")


async def run_worker_bench(kinds: list[WorkerKind], runs: int, out: Path, config: Config, wyoming: list[str] | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {"benchmark": "workers", "runs": runs, "machine": machine(), "kinds": {}, "wyoming": {}}
    speech = _SttSpeech(config)
    for kind in kinds:
        settings = config.workers.for_kind(kind)
        engine = load_engine(kind, settings)
        server = WorkerServer(engine, capacity=settings.capacity)
        port = await server.start("127.0.0.1", 0)
        client = await WorkerClient.connect(f"ws://127.0.0.1:{port}", kind)
        try:
            if kind is WorkerKind.STT:
                figures = await _bench_stt(client, runs, *speech.get())
            elif kind is WorkerKind.LLM:
                figures = await _bench_llm(client, runs)
            elif kind is WorkerKind.TTS:
                figures = await _bench_tts(client, runs)
            else:
                figures = await _bench_vision(client, runs)
        finally:
            await client.close()
            await server.close()
            engine.close()
        figures.update(model=engine.model.model_id, threads=settings.threads)
        results["kinds"][kind.value] = figures
        print(f"{kind.value:>6}  {engine.model.model_id}")
        for key, value in figures.items():
            if key not in ("model",):
                print(f"          {key:<28} {value}")
    for url in wyoming or []:
        kind, figures = await _bench_wyoming(url, runs, speech)
        results["wyoming"][url] = {"kind": kind.value, **figures}
        native = results["kinds"].get(kind.value)
        if native is not None:
            _print_side_by_side(kind.value, native, figures)
        else:
            print(f"{kind.value:>6}  Wyoming {url}: {figures}")
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return results
