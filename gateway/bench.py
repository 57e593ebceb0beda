"""``edgestream bench voice``: voice-to-voice latency over WebRTC, everything on this box.

The gateway and one worker of each kind run as separate processes (as
``edgestream up`` runs them); this process is the client, speaking piper-made
questions through the SDK. Voice-to-voice is measured at the client: from the
moment the last sample of the question left the client's microphone track to
the arrival of the first audible answer frame. The gateway's per-turn latency
event gives the stages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from stream.config import Config
from stream.http import get as http_get
from stream.protocol import WorkerKind
from stream.sdk import GatewaySession

QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What color is the sky?",
    "Can you recommend a good book?",
    "What is two plus two?",
    "Where do penguins live?",
]
STAGES = ["end_of_turn", "stt_final", "first_token", "first_clause", "first_tts_audio", "first_audio_sent"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))], 1)


async def _start_system(config: Config, workdir: Path) -> tuple[list[asyncio.subprocess.Process], str]:
    ports = {kind: free_port() for kind in WorkerKind}
    gateway_port = free_port()
    lines = []
    for kind in WorkerKind:
        settings = config.workers.for_kind(kind)
        lines.append(f"[workers.{kind.value}]\nport = {ports[kind]}\ncapacity = {settings.capacity}\nthreads = {settings.threads}\n")
    g = config.gateway
    lines.append(
        f"[gateway]\nport = {gateway_port}\nloopback_ice = true\nend_silence_ms = {g.end_silence_ms}\n"
        f"speculate_after_ms = {g.speculate_after_ms}\nmax_answer_tokens = {g.max_answer_tokens}\n"
    )
    path = workdir / "bench.toml"
    path.write_text("".join(lines))
    processes = []
    for args in [["gateway"], *(["worker", kind.value] for kind in WorkerKind)]:
        processes.append(
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "stream", *args, "--config", str(path),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )
        )
    async with asyncio.timeout(120):
        while True:
            with contextlib.suppress(OSError, ValueError):
                status, _ = await http_get(f"http://127.0.0.1:{gateway_port}/readyz")
                if status == 200:
                    break
            await asyncio.sleep(0.2)
    return processes, f"ws://127.0.0.1:{gateway_port}/session"


async def speak_turn(session: GatewaySession, speech: np.ndarray, number: int) -> tuple[float, dict[str, Any]]:
    """Ask ``speech`` (16 kHz) as turn ``number``; (client-measured voice-to-voice ms, the turn's latency event), once the answer has played."""
    start_index = len(session.events)
    pad = np.zeros(4800, np.int16)  # 0.3 s of silence before the question
    speech_end = await session.say(np.concatenate([pad, speech]), 16_000)
    silence = session.say(np.zeros(16_000 * 3, np.int16), 16_000)  # the person waits
    latency = await session.wait_event("latency", timeout=60, after=start_index, turn=number)
    heard = None
    async with asyncio.timeout(10):
        while (heard := session.first_audible(after=speech_end)) is None:
            await asyncio.sleep(0.02)
    # Let the answer finish playing before the next question (no barge-in).
    async with asyncio.timeout(60):
        while True:
            # The gateway sends nothing between answers: no frame for 0.5 s, or only quiet ones, is the end.
            recent = [pcm for at, pcm in list(session.received)[-25:] if at > time.monotonic() - 0.5]
            if all(np.abs(pcm).max() < 300 for pcm in recent):
                break
            await asyncio.sleep(0.1)
    await silence
    return (heard - speech_end) * 1000, latency


async def run_voice_bench(turns: int, out: Path, config: Config) -> dict[str, Any]:
    from piper import SynthesisConfig

    from stream.audio import resample
    from workers.launch import load_engine
    from workers.bench import _machine

    tts = load_engine(WorkerKind.TTS, config.workers.tts)
    speech = [resample(tts.synthesize(q, SynthesisConfig()), tts.sample_rate, 16_000) for q in QUESTIONS]
    tts.close()
    with tempfile.TemporaryDirectory() as workdir:
        processes, url = await _start_system(config, Path(workdir))
        try:
            session = await GatewaySession.connect(url, loopback_ice=True)
            voice_to_voice, stages = [], []
            for number in range(1, turns + 2):  # turn 1 warms up and is not counted
                ms, latency = await speak_turn(session, speech[(number - 1) % len(speech)], number)
                if number > 1:
                    voice_to_voice.append(ms)
                    stages.append(latency)
                    print(f"turn {number - 1:>3}: voice-to-voice {ms:6.0f} ms   " + "  ".join(f"{s} {latency.get(s)}" for s in STAGES), flush=True)
            await session.close()
        finally:
            for process in processes:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            await asyncio.gather(*(p.wait() for p in processes))
    medians = {stage: round(statistics.median(t[stage] for t in stages if t.get(stage) is not None), 1) for stage in STAGES}
    medians["transport_and_playout"] = round(statistics.median(v - t["first_audio_sent"] for v, t in zip(voice_to_voice, stages)), 1)
    results = {
        "benchmark": "voice",
        "machine": _machine(),
        "turns": turns,
        "end_silence_ms": config.gateway.end_silence_ms,
        "speculate_after_ms": config.gateway.speculate_after_ms,
        "voice_to_voice_ms": {"p50": percentile(voice_to_voice, 0.5), "p95": percentile(voice_to_voice, 0.95), "all": [round(v, 1) for v in voice_to_voice]},
        "stage_medians_ms": medians,
    }
    print(f"voice-to-voice p50 {results['voice_to_voice_ms']['p50']} ms, p95 {results['voice_to_voice_ms']['p95']} ms over {turns} turns")
    print("stage medians (ms from end of speech): " + ", ".join(f"{k} {v}" for k, v in medians.items()))
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return results
