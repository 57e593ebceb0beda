"""``edgestream bench overhead``: the pipeline's own share of a turn, with models that take no time.

One gateway process, canned STT, LLM and TTS workers (``gateway/harness/simulated.py``:
real worker servers and protocol, models that answer at once) and one SDK
client speaking a piper-made question over real WebRTC, turn after turn.
Speculation is off, so every stage is on the critical path.

With no model compute, what is left between the moment the gateway knows the
turn is over (``end_of_turn``: the configured end-of-turn silence has passed)
and the first answer audio on the wire (``first_audio_sent``) is the
pipeline's own cost: orchestration, the worker protocol and its WebSockets,
clause chunking, resampling, and waiting for the next 20 ms playout tick.
That is the overhead, per turn; the benchmark prints its median and p95 and
the stage gaps that make it up. It also prints how far past the configured
silence the end of turn was detected (VAD chunks of 32 ms, and the audio's
trip through WebRTC and the decoder), which is turn-taking, not overhead.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from stream.config import GatewaySettings
from stream.protocol.jobs import STT_SAMPLE_RATE
from stream.sdk import GatewaySession

from .figures import free_port, median, percentile
from .load_bench import (
    ANSWER,
    QUESTION,
    gateway_config,
    start_canned_workers,
    start_gateway,
)
from .speech import speak_with_piper
from .voice_bench import STAGES, speak_turn

GAPS = [
    ("end_of_turn", "stt_final", "final transcript"),
    ("stt_final", "first_token", "first token"),
    ("first_token", "first_clause", "first clause"),
    ("first_clause", "first_tts_audio", "first TTS audio"),
    ("first_tts_audio", "first_audio_sent", "playout"),
]


async def run_overhead_bench(turns: int, out: Path) -> dict[str, Any]:
    question, answer = await asyncio.to_thread(speak_with_piper, QUESTION, ANSWER)
    servers, urls = await start_canned_workers(answer, STT_SAMPLE_RATE)
    end_silence_ms = GatewaySettings().end_silence_ms
    with tempfile.TemporaryDirectory(prefix="edgestream-overhead-") as tmp:
        port = free_port()
        config = Path(tmp) / "gateway.toml"
        config.write_text(gateway_config(port, urls, "speculate_after_ms = 0\n"))
        gateway = await start_gateway(config, port, Path(tmp) / "gateway.log")
        rows: list[dict[str, float]] = []
        try:
            session = await GatewaySession.connect(f"ws://127.0.0.1:{port}/session", loopback_ice=True)
            await speak_turn(session, question)  # warm-up
            for _ in range(turns):
                heard_ms, latency, _ = await speak_turn(session, question)
                marks = {stage: latency[stage] for stage in STAGES}
                rows.append({**marks, "heard_ms": heard_ms, "overhead_ms": marks["first_audio_sent"] - marks["end_of_turn"]})
            await session.close()
        finally:
            gateway.send_signal(signal.SIGTERM)
            await gateway.wait()
            for server in servers:
                await server.close()
    overhead = [r["overhead_ms"] for r in rows]
    detection = [r["end_of_turn"] - end_silence_ms for r in rows]
    gaps = {name: statistics.median(r[b] - r[a] for r in rows) for a, b, name in GAPS}
    summary = {
        "benchmark": "overhead",
        "machine": f"{os.cpu_count()} CPUs, {sys.platform}",
        "date": time.strftime("%Y-%m-%d"),
        "turns": len(rows),
        "overhead_p50_ms": median(overhead),
        "overhead_p95_ms": percentile(overhead, 0.95),
        "overhead_min_ms": round(min(overhead), 1),
        "stage_gaps_p50_ms": {k: round(v, 1) for k, v in gaps.items()},
        "end_detection_beyond_silence_p50_ms": median(detection),
        "client_voice_to_voice_p50_ms": median(r["heard_ms"] for r in rows),
        "target": "overhead p50 < 10 ms",
        "turns_detail": rows,
    }
    out.write_text(json.dumps(summary, indent=2))
    print(f"overhead over {len(rows)} turns (canned models, speculation off; ms from end of turn to first answer audio sent):")
    print(f"  p50 {summary['overhead_p50_ms']}  p95 {summary['overhead_p95_ms']}  min {summary['overhead_min_ms']}   (target p50 < 10)")
    print("  median gap per stage: " + ", ".join(f"{k} {v}" for k, v in summary["stage_gaps_p50_ms"].items()))
    print(f"  end of turn detected {summary['end_detection_beyond_silence_p50_ms']} ms past the {end_silence_ms:g} ms silence (p50, turn-taking)")
    print(f"  client-measured voice-to-voice p50 {summary['client_voice_to_voice_p50_ms']} ms; JSON in {out}")
    return summary
