"""``edgestream bench workers``: each worker kind, measured over a real WebSocket on loopback.

Figures are medians over ``runs`` repetitions, measured at the client (what
the gateway would see), with the worker's own compute time beside them. The
first request of each kind is a warm-up and not counted.
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
from workers.launch import load_engine
from workers.server import WorkerServer

from .figures import machine, median
from .speech import speak_with_piper

SENTENCES = [
    "Please turn on the kitchen lights.",
    "What is the weather like in Paris today?",
    "Remind me to call my sister tomorrow morning at nine.",
]
QUESTION = "Tell me a short story about a cat who learns to swim."
SPOKEN = "Sure, the nearest pharmacy is two blocks north, next to the bakery."


def _median(values: list[float]) -> float:
    return median(values, 4)


async def _bench_stt(client: WorkerClient, runs: int, speech: list[np.ndarray]) -> dict[str, Any]:
    rtf, final_ms = [], []
    for run in range(runs + 1):
        for samples in speech:
            job = await client.start_job({"partials": False})
            step = STT_SAMPLE_RATE // 50
            for start in range(0, len(samples), step):
                await job.send_audio(samples[start : start + step])
            ended = time.perf_counter()
            await job.end()
            async for _ in job.events():
                pass
            if run:
                final_ms.append((time.perf_counter() - ended) * 1000)
                rtf.append(job.done.stats["compute_s"] / job.done.stats["audio_s"])
    return {"rtf_median": _median(rtf), "final_after_end_ms_median": _median(final_ms), "utterance_s": [round(len(s) / STT_SAMPLE_RATE, 2) for s in speech]}


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


async def _bench_tts(client: WorkerClient, runs: int) -> dict[str, Any]:
    first_audio, rtf = [], []
    for run in range(runs + 1):
        job = await client.start_job(TtsParams(text=SPOKEN))
        started = time.perf_counter()
        await job.end()
        first = None
        async for event in job.events():
            if isinstance(event, MediaFrame):
                first = first or time.perf_counter()
        if run and first is not None:
            first_audio.append((first - started) * 1000)
            rtf.append(job.done.stats["compute_s"] / job.done.stats["audio_s"])
    return {"first_audio_ms_median": _median(first_audio), "rtf_median": _median(rtf)}


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


async def run_worker_bench(kinds: list[WorkerKind], runs: int, out: Path, config: Config) -> dict[str, Any]:
    results: dict[str, Any] = {"benchmark": "workers", "runs": runs, "machine": machine(), "kinds": {}}
    for kind in kinds:
        settings = config.workers.for_kind(kind)
        engine = load_engine(kind, settings)
        server = WorkerServer(engine, capacity=settings.capacity)
        port = await server.start("127.0.0.1", 0)
        client = await WorkerClient.connect(f"ws://127.0.0.1:{port}", kind)
        try:
            if kind is WorkerKind.STT:
                speech = speak_with_piper(*SENTENCES)
                figures = await _bench_stt(client, runs, speech)
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
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return results
