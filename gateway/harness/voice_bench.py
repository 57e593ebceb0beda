"""``edgestream bench voice``: voice-to-voice latency over WebRTC on open questions, everything on this box.

The gateway and one worker of each kind run as separate processes (as
``edgestream up`` runs them); this process is the client, speaking through
the SDK. Voice-to-voice is measured at the client: from the moment the last
sample of the question left the client's microphone track to the arrival of
the first audible answer frame. The gateway's per-turn latency event gives
the stages.

What is asked looks like real use, not like the benchmark's own voice:

- open questions whose answers are sentences (:data:`QUESTIONS`), spoken by
  piper and by espeak-ng in several accents, voices and rates
  (:data:`VOICES`, one per question in rotation); some with a pause in the
  middle (longer than ``speculate_after_ms``, shorter than the end of turn),
  so the speculative answer is dropped and made again;
- two modes: ``fresh`` (one new session per question) and ``conversation``
  (every question in one session, turn after turn, so the history grows and
  is trimmed);
- in the same run and on the same worker processes, the idle floor of each
  model: what a stage costs with nothing else running.

``--slowdown stt=8,tts=3`` runs those workers in cgroups with a CPU quota of
1/8 and 1/3 of a core: an emulated slower edge box (the AMD EPYC box of
``shared/models.md`` is about that much slower than this Intel one for these
models), named as such in the output. ``--tree DIR`` runs the gateway and
workers from another checkout (a baseline measured in the same run); the
client is always this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stream.config import Config
from stream.http import get as http_get
from stream.protocol import JobResult, MediaFrame, WorkerKind
from stream.protocol.jobs import STT_SAMPLE_RATE, LlmParams, SttResult, TtsParams
from stream.sdk import GatewaySession
from stream.worker_client import WorkerClient

from .figures import free_port, machine, median, percentile
from .speech import espeak, piper_voice, trim_silence

QUESTIONS = [
    "How far is the nearest train station?",
    "Tell me a short joke about robots.",
    "What should I pack for a weekend camping trip?",
    "Why is the sky blue during the day?",
    "How do I make a good cup of tea?",
    "What is a good way to fall asleep faster?",
    "Can you explain how a rainbow forms?",
    "What are some fun things to do on a rainy day?",
    "How do bees make honey?",
    "What is the difference between weather and climate?",
    "Give me one tip for learning a new language.",
    "Why do cats purr when they are happy?",
    "What should I cook for dinner tonight?",
    "How does a bicycle stay upright when it moves?",
    "Describe the ocean in a couple of sentences.",
    "What is your favorite season, and why?",
]
"""Open questions whose answers are sentences, not one word."""

PAUSED = {2: 4, 6: 3, 10: 4, 14: 3}
"""Questions (by index) spoken with a pause after this many words."""
PAUSE_S = 0.2
"""Longer than ``speculate_after_ms`` (128), shorter than ``end_silence_ms`` (320) with the VAD's own lag."""


@dataclass(frozen=True)
class Voice:
    engine: str
    """``piper`` or ``espeak``."""
    name: str
    rate_wpm: int = 165

    def __str__(self) -> str:
        return f"{self.engine}:{self.name}" + (f"@{self.rate_wpm}" if self.engine == "espeak" else "")


VOICES = [
    Voice("piper", "en_US-joe-medium"),
    Voice("espeak", "en-us+m3", 170),
    Voice("espeak", "en-gb-scotland+f3", 160),
    Voice("espeak", "en-029+m1", 165),
    Voice("espeak", "en-gb-x-rp+f2", 175),
    Voice("espeak", "en-us-nyc+m5", 165),
    Voice("espeak", "en-gb-x-gbcwmd+Andrea", 155),
    Voice("espeak", "hi+m2", 160),
]
"""Speakers, in rotation: the TTS's own voice once, and espeak-ng's American, Scottish,
Caribbean, English (RP), New York, West Midlands and Indian accents, men and women."""

STAGES = ["end_of_turn", "stt_final", "first_token", "first_clause", "first_tts_audio", "first_audio_sent"]
READY_TIMEOUT_S = 180.0
TURN_TIMEOUT_S = 90.0
THINK_S = 0.6
"""A person's pause between hearing an answer and asking the next question."""


# -- the spoken questions ------------------------------------------------------------------


@dataclass
class Spoken:
    text: str
    voice: Voice
    samples: np.ndarray
    """16 kHz mono int16."""
    paused: bool


def spoken_questions(config: Config, every_voice: bool = False) -> list[Spoken]:
    """Every question in its voice (in rotation), with the pauses of :data:`PAUSED`;
    or, with ``every_voice``, every question in each of the voices, without pauses."""
    out = []
    with piper_voice(config.workers.tts) as piper:

        def say(text: str, voice: Voice) -> np.ndarray:
            return trim_silence(piper(text) if voice.engine == "piper" else espeak(text, voice.name, voice.rate_wpm))

        if every_voice:
            return [Spoken(text, voice, say(text, voice), False) for voice in VOICES for text in QUESTIONS]
        for index, text in enumerate(QUESTIONS):
            voice = VOICES[index % len(VOICES)]
            if index in PAUSED:
                words = text.split()
                head, tail = " ".join(words[: PAUSED[index]]), " ".join(words[PAUSED[index] :])
                pause = np.zeros(int(PAUSE_S * STT_SAMPLE_RATE), np.int16)
                samples = np.concatenate([say(head, voice), pause, say(tail, voice)])
            else:
                samples = say(text, voice)
            out.append(Spoken(text, voice, samples, index in PAUSED))
    return out


# -- the system under test ------------------------------------------------------------------


class SlowBox:
    """Worker processes in cgroups with a CPU quota: an emulated slower box (cgroup v2 or v1 ``cpu``)."""

    PERIOD_US = 100_000
    """CFS bandwidth is handed out in slices of 5 ms: a shorter period would throttle far more than its quota says."""

    def __init__(self, factors: dict[str, float]) -> None:
        self.factors = factors
        self.paths: list[Path] = []
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        self.root = Path("/sys/fs/cgroup") if v2.exists() else Path("/sys/fs/cgroup/cpu")
        self.v2 = v2.exists()
        if factors and not os.access(self.root, os.W_OK):
            raise RuntimeError(f"--slowdown needs a writable cgroup hierarchy at {self.root} (run as root)")

    def confine(self, name: str, pid: int) -> None:
        factor = self.factors.get(name)
        if not factor or factor <= 1:
            return
        path = self.root / f"edgestream-bench-{name}-{os.getpid()}"
        path.mkdir(exist_ok=True)
        quota = max(1000, int(self.PERIOD_US / factor))
        if self.v2:
            (path / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
        else:
            (path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (path / "cpu.cfs_quota_us").write_text(str(quota))
        (path / "cgroup.procs").write_text(str(pid))
        self.paths.append(path)

    def release(self) -> None:
        for path in self.paths:
            with contextlib.suppress(OSError):
                path.rmdir()
        self.paths.clear()


@dataclass
class System:
    url: str
    workers: dict[WorkerKind, str]
    pids: dict[str, int] = field(default_factory=dict)
    """Process ids by name: ``gateway``, ``stt``, ``llm``, ``tts``, ``vision``."""


@contextlib.asynccontextmanager
async def running_system(
    config: Config,
    slow: SlowBox,
    tree: Path | None,
    first_piece_words: int | None,
    logs: Path | None = None,
    gateway_options: dict[str, str] | None = None,
) -> AsyncIterator[System]:
    """The gateway and one worker of each kind as processes, ready; stopped (SIGTERM) on the way out."""
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
    if first_piece_words is not None:  # only then: a baseline tree may not know the key
        lines.append(f"first_piece_words = {first_piece_words}\n")
    for key, value in (gateway_options or {}).items():
        lines.append(f"{key} = {value}\n")
    processes: list[asyncio.subprocess.Process] = []
    env = dict(os.environ)
    cwd = None
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
        cwd = str(tree)
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "bench.toml"
        path.write_text("".join(lines))
        try:
            for name, args in [("gateway", ["gateway"]), *((kind.value, ["worker", kind.value]) for kind in WorkerKind)]:
                output = open(logs / f"{name}.log", "ab") if logs is not None else asyncio.subprocess.DEVNULL
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "gateway",
                    *args,
                    "--config",
                    str(path),
                    stdout=output,
                    stderr=asyncio.subprocess.STDOUT,
                    env=env,
                    cwd=cwd,
                )
                processes.append(process)
                slow.confine(name, process.pid)
            async with asyncio.timeout(READY_TIMEOUT_S):
                while True:
                    with contextlib.suppress(OSError, ValueError):
                        status, _ = await http_get(f"http://127.0.0.1:{gateway_port}/readyz")
                        if status == 200:
                            break
                    if any(p.returncode is not None for p in processes):
                        raise RuntimeError("a process of the system exited while starting")
                    await asyncio.sleep(0.2)
            names = ["gateway", *(kind.value for kind in WorkerKind)]
            pids = {name: process.pid for name, process in zip(names, processes, strict=True)}
            yield System(f"ws://127.0.0.1:{gateway_port}/session", {k: f"ws://127.0.0.1:{p}" for k, p in ports.items()}, pids)
        finally:
            for process in processes:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(20):
                    await asyncio.gather(*(p.wait() for p in processes))
            for process in processes:
                if process.returncode is None:
                    process.kill()
            slow.release()


# -- idle floors -----------------------------------------------------------------------------------


async def idle_floors(system: System, speech: np.ndarray, reps: int = 3) -> dict[str, float]:
    """Each model's cost on this box with nothing else running, over the real protocol (medians)."""
    floors: dict[str, list[float]] = {
        "stt_final_after_end_ms": [],
        "llm_first_token_ms": [],
        "llm_tokens_per_s": [],
        "tts_first_audio_4_words_ms": [],
        "tts_first_audio_8_words_ms": [],
    }
    async with await WorkerClient.connect(system.workers[WorkerKind.STT]) as stt:
        for _ in range(reps + 1):
            job = await stt.start_job({"partials": False})
            for start in range(0, len(speech), 320):
                await job.send_audio(speech[start : start + 320])
            ended = time.perf_counter()
            await job.end()
            async for event in job.events():
                if isinstance(event, JobResult) and SttResult.model_validate(event.data).final:
                    floors["stt_final_after_end_ms"].append((time.perf_counter() - ended) * 1000)
    async with await WorkerClient.connect(system.workers[WorkerKind.LLM]) as llm:
        system_prompt = Config().gateway.system_prompt
        for n in range(reps + 1):
            question = QUESTIONS[n % len(QUESTIONS)]
            job = await llm.start_job(
                LlmParams(messages=[{"role": "system", "content": system_prompt}, {"role": "user", "content": question}], max_tokens=32, temperature=0.0)
            )
            started = time.perf_counter()
            await job.end()
            stamps = [time.perf_counter() async for event in job.events() if isinstance(event, JobResult)]
            if stamps:
                floors["llm_first_token_ms"].append((stamps[0] - started) * 1000)
                if len(stamps) > 2:
                    floors["llm_tokens_per_s"].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    async with await WorkerClient.connect(system.workers[WorkerKind.TTS]) as tts:
        for key, text in (
            ("tts_first_audio_4_words_ms", "The nearest train station"),
            ("tts_first_audio_8_words_ms", "Sure, the nearest pharmacy is two blocks north."),
        ):
            for _ in range(reps + 1):
                job = await tts.start_job(TtsParams())
                started = time.perf_counter()
                await job.send_text(text)
                await job.end()
                first = None
                async for event in job.events():
                    if isinstance(event, MediaFrame) and first is None:
                        first = time.perf_counter()
                floors[key].append(((first or time.perf_counter()) - started) * 1000)
    # The first of each is a warm-up.
    return {key: round(statistics.median(values[1:] if len(values) > 1 else values), 1) for key, values in floors.items() if values}


# -- asking ------------------------------------------------------------------------------------------


async def speak_turn(session: GatewaySession, speech: np.ndarray) -> tuple[float, dict[str, Any], int]:
    """Ask ``speech`` (16 kHz); (client-measured voice-to-voice ms, the answered turn's latency event, the
    number of turns the gateway heard in it), once the answer has played.

    A question the gateway heard as two turns (the person paused too long) is
    answered in the last one: its answer is the one measured.
    """
    first = start_index = len(session.events)
    pad = np.zeros(4800, np.int16)  # 0.3 s of silence before the question
    speech_end = await session.say(np.concatenate([pad, speech]), 16_000)
    silence = asyncio.ensure_future(session.say(np.zeros(16_000 * 2, np.int16), 16_000))  # the person waits
    try:
        async with asyncio.timeout(TURN_TIMEOUT_S):
            while True:
                done = await session.wait_event("answer.done", timeout=TURN_TIMEOUT_S, after=start_index)
                start_index = session.events.index(done) + 1
                if not done["interrupted"]:
                    break
        number = done["turn"]
        latency = await session.wait_event("latency", timeout=TURN_TIMEOUT_S, turn=number)
        heard = await _first_audible(session, speech_end)
        if heard is None:
            raise RuntimeError(f"turn {number} was answered but nothing audible arrived")
        await silence
    finally:
        silence.cancel()
    turns = len({e["turn"] for e in session.events[first:] if e["type"] == "transcript.final"})
    return (heard - speech_end) * 1000, latency, turns


async def _first_audible(session: GatewaySession, after: float, wait_s: float = 5.0) -> float | None:
    """When the answer was first audible; waits for it a while (a gateway that reports ``answer.done``
    before its audio has played, as the baseline does, has it still coming). Polls once a frame:
    the client has no event for audio."""
    deadline = time.monotonic() + wait_s
    while (heard := session.first_audible(after=after)) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return heard


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def word_errors(reference: str, transcript: str) -> tuple[int, int]:
    """(word errors, words said): substitutions, deletions and insertions against ``reference``, lower case, no punctuation."""
    import jiwer

    said = " ".join(_words(reference))
    errors = jiwer.process_words(said, " ".join(_words(transcript)) or "<empty>")
    return errors.substitutions + errors.deletions + errors.insertions, len(said.split())


def _turn_row(question: Spoken, v2v_ms: float, latency: dict[str, Any], events: list[dict[str, Any]], turns: int) -> dict[str, Any]:
    number = latency["turn"]
    heard = [e for e in events if e["type"] == "transcript.final" and number - turns < e.get("turn", 0) <= number]
    transcript = " ".join(e["text"] for e in heard)
    done = next((e for e in events if e["type"] == "answer.done" and e.get("turn") == number), {})
    answer = done.get("text", "")
    errors, words = word_errors(question.text, transcript)
    row = {
        "question": question.text,
        "voice": str(question.voice),
        "paused": question.paused,
        "voice_to_voice_ms": round(v2v_ms, 1),
        **{s: latency.get(s) for s in STAGES},
        "transcript": transcript,
        "turns_heard": turns,
        "word_errors": errors,
        "words": words,
        "answer": answer,
        "answer_gaps": done.get("gaps"),
        "answer_gap_ms": done.get("gap_ms"),
        "workers": latency.get("workers", {}),
    }
    if latency.get("first_audio_sent") is not None and latency.get("first_token") is not None:
        row["first_audio_after_first_token_ms"] = round(latency["first_audio_sent"] - latency["first_token"], 1)
    return row


async def ask_fresh(url: str, questions: list[Spoken]) -> list[dict[str, Any]]:
    """Each question in a new session (one warm-up question first, not counted)."""
    rows = []
    for index, question in enumerate([questions[0], *questions]):
        session = await GatewaySession.connect(url, loopback_ice=True)
        try:
            v2v, latency, turns = await speak_turn(session, question.samples)
            if index:
                rows.append(_turn_row(question, v2v, latency, session.events, turns))
                _print_turn(len(rows), rows[-1])
        finally:
            await session.close()
    return rows


async def ask_conversation(url: str, questions: list[Spoken], turns: int) -> list[dict[str, Any]]:
    """``turns`` questions in one session, after a warm-up turn (not counted)."""
    rows = []
    session = await GatewaySession.connect(url, loopback_ice=True)
    try:
        for number in range(1, turns + 2):
            question = questions[(number - 1) % len(questions)]
            v2v, latency, turns = await speak_turn(session, question.samples)
            if number > 1:
                rows.append(_turn_row(question, v2v, latency, session.events, turns))
                _print_turn(len(rows), rows[-1])
            await asyncio.sleep(THINK_S)
    finally:
        await session.close()
    return rows


def _print_turn(n: int, row: dict[str, Any]) -> None:
    stages = "  ".join(f"{s} {row.get(s)}" for s in STAGES)
    print(f"  {n:>3} {row['voice']:<32} v2v {row['voice_to_voice_ms']:6.0f} ms  {stages}  wer {row['word_errors']}/{row['words']}", flush=True)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    v2v = [r["voice_to_voice_ms"] for r in rows]
    p50 = statistics.median(v2v)
    medians = {}
    for stage in STAGES:
        values = [r[stage] for r in rows if r.get(stage) is not None]
        if values:
            medians[stage] = round(statistics.median(values), 1)
    medians["transport_and_playout"] = round(
        statistics.median(r["voice_to_voice_ms"] - r["first_audio_sent"] for r in rows if r.get("first_audio_sent") is not None), 1
    )
    after_token = [r["first_audio_after_first_token_ms"] for r in rows if "first_audio_after_first_token_ms" in r]
    gapped = [r["answer_gap_ms"] for r in rows if r.get("answer_gaps")]  # absent from a baseline tree's events
    return {
        "turns": len(rows),
        "p50_ms": round(p50, 1),
        "p95_ms": percentile(v2v, 0.95),
        "max_ms": round(max(v2v), 1),
        "turns_above_2x_p50": sum(v > 2 * p50 for v in v2v),
        "stage_medians_ms": medians,
        "first_audio_after_first_token_p50_ms": round(statistics.median(after_token), 1) if after_token else None,
        "word_error_rate": round(sum(r["word_errors"] for r in rows) / max(1, sum(r["words"] for r in rows)), 3),
        "questions_heard_as_two_turns": sum(r["turns_heard"] > 1 for r in rows),
        "answers_with_a_gap": len(gapped),
        "answer_gap_ms_max": max(gapped, default=0.0),
    }


def _median_of(runs: list[dict[str, Any]], key: str) -> float:
    return median(run[key] for run in runs)


async def run_voice_bench(
    modes: list[str],
    turns: int,
    runs: int,
    out: Path,
    config: Config,
    *,
    slowdown: dict[str, float] | None = None,
    tree: Path | None = None,
    first_piece_words: int | None = None,
    logs: Path | None = None,
    gateway_options: dict[str, str] | None = None,
) -> dict[str, Any]:

    questions = await asyncio.to_thread(spoken_questions, config)
    slow = SlowBox(slowdown or {})
    box = machine()
    if slowdown:
        box["emulated"] = "CPU quota per process: " + ", ".join(f"{k} 1/{v:g} of a core" for k, v in slowdown.items())
    results: dict[str, Any] = {
        "benchmark": "voice",
        "machine": box,
        "tree": str(tree or "this checkout"),
        "modes": modes,
        "runs": [],
        "questions": len(questions),
        "voices": [str(v) for v in VOICES],
        "end_silence_ms": config.gateway.end_silence_ms,
        "speculate_after_ms": config.gateway.speculate_after_ms,
        "first_piece_words": first_piece_words,
        "gateway_options": gateway_options or {},
    }
    for run in range(runs):
        print(f"run {run + 1}/{runs}" + (f" ({box['emulated']})" if slowdown else ""), flush=True)
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
        async with running_system(config, slow, tree, first_piece_words, logs, gateway_options) as system:
            floors = await idle_floors(system, questions[0].samples)
            print("  idle floors: " + ", ".join(f"{k} {v}" for k, v in floors.items()), flush=True)
            record: dict[str, Any] = {"idle_floors": floors}
            if "fresh" in modes:
                print("  fresh sessions, one question each:", flush=True)
                rows = await ask_fresh(system.url, questions)
                record["fresh"] = {"summary": summarize(rows), "turns": rows}
            if "conversation" in modes:
                print(f"  one conversation, {turns} turns:", flush=True)
                rows = await ask_conversation(system.url, questions, turns)
                record["conversation"] = {"summary": summarize(rows), "turns": rows}
        results["runs"].append(record)
        for mode in modes:
            s = record[mode]["summary"]
            print(f"  {mode}: p50 {s['p50_ms']} ms, p95 {s['p95_ms']} ms, max {s['max_ms']} ms, WER {s['word_error_rate']}", flush=True)
    results["summary"] = {}
    for mode in modes:
        summaries = [run[mode]["summary"] for run in results["runs"]]
        pooled = summarize([row for run in results["runs"] for row in run[mode]["turns"]])
        results["summary"][mode] = {
            "p50_ms_median_of_runs": _median_of(summaries, "p50_ms"),
            "p95_ms_median_of_runs": _median_of(summaries, "p95_ms"),
            "p50_ms_runs": [s["p50_ms"] for s in summaries],
            "p95_ms_runs": [s["p95_ms"] for s in summaries],
            "pooled": pooled,
        }
    floors = {key: round(statistics.median(run["idle_floors"][key] for run in results["runs"]), 1) for key in results["runs"][0]["idle_floors"]}
    results["summary"]["idle_floors"] = floors
    print(f"\nvoice to voice on {box['cpu']} ({box['cores']} cores){', ' + box['emulated'] if slowdown else ''}, {runs} run(s):")
    for mode in modes:
        s = results["summary"][mode]
        pooled = s["pooled"]
        print(
            f"  {mode:<12} p50 {s['p50_ms_median_of_runs']} ms  p95 {s['p95_ms_median_of_runs']} ms (medians of runs: {s['p50_ms_runs']} / {s['p95_ms_runs']})"
        )
        print(f"  {'':<12} stage medians: " + ", ".join(f"{k} {v}" for k, v in pooled["stage_medians_ms"].items()))
        print(
            f"  {'':<12} first audio after first token p50 {pooled['first_audio_after_first_token_p50_ms']} ms; "
            f"WER {pooled['word_error_rate']}; max {pooled['max_ms']} ms; turns above 2x p50: {pooled['turns_above_2x_p50']}; "
            f"answers whose audio ran out mid-answer: {pooled['answers_with_a_gap']} of {pooled['turns']} (longest {pooled['answer_gap_ms_max']} ms)"
        )
    print("  idle floors: " + ", ".join(f"{k} {v}" for k, v in floors.items()))
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return results
