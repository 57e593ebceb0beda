"""``edgestream chaos``: worker processes killed (``kill -9``) during live turns; no turn may be lost.

Two worker processes of each kind (speech to text, language model, text to
speech) serve the real embedded models on loopback; one gateway and one SDK
session talk to them over real WebRTC and WebSockets. Turn after turn, a
question is spoken, and while the turn is live, the worker of the chosen kind
that holds the turn's job is killed with SIGKILL (kinds in rotation). The
gateway must move the job (``gateway/failover.py``) and answer in full; the
killed worker is started again and rejoins, and the next turn waits until it
has, so that every kill has somewhere to go.

A turn is lost if its transcript misses words (under 65% of the question's
words heard: a failover replays the whole utterance, so it should miss none), its answer is empty or cut, or the client is sent an
error for it. The figures go to the screen and to JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gateway.server import Gateway
from stream.config import GatewaySettings
from stream.protocol import WorkerKind
from stream.protocol.jobs import STT_SAMPLE_RATE
from stream.sdk import GatewaySession

from .figures import free_port, median
from .speech import speak_with_piper

log = logging.getLogger("edgestream.chaos")

KINDS = (WorkerKind.STT, WorkerKind.LLM, WorkerKind.TTS)
QUESTIONS = [
    "Please tell me a short story about a brave little dragon.",
    "What should I cook for dinner tonight with rice and beans?",
    "Describe a quiet morning at the beach in a few sentences.",
]
READY_TIMEOUT_S = 120.0
TURN_TIMEOUT_S = 90.0
MIN_WORDS_HEARD = 0.65


def words_heard(reference: str, transcript: str) -> float:
    """The share of the reference's words that the transcript has (a replayed failover must hear them all)."""

    def words(text: str) -> list[str]:
        return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()

    said, heard = words(reference), set(words(transcript))
    return sum(word in heard for word in said) / max(1, len(said))


@dataclass
class WorkerProcess:
    kind: WorkerKind
    port: int
    process: asyncio.subprocess.Process | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "gateway",
            "worker",
            self.kind.value,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--capacity",
            "1",
            "--threads",
            "1",
        ]
        output = open(self.log_path, "ab") if self.log_path else asyncio.subprocess.DEVNULL
        self.process = await asyncio.create_subprocess_exec(*argv, stdout=output, stderr=asyncio.subprocess.STDOUT)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@dataclass
class ChaosReport:
    kills: list[dict] = field(default_factory=list)
    turns: list[dict] = field(default_factory=list)
    missed: int = 0
    """Kills skipped because the job finished before it was seen (the turn still counts)."""

    @property
    def lost(self) -> list[dict]:
        return [turn for turn in self.turns if turn["lost"]]

    def summary(self, failovers: dict[str, float]) -> dict:
        durations = [t["seconds"] for t in self.turns if not t["lost"]]
        return {
            "kills": len(self.kills),
            "kills_by_kind": {k.value: sum(1 for x in self.kills if x["kind"] == k.value) for k in KINDS},
            "turns": len(self.turns),
            "lost_turns": len(self.lost),
            "missed_kills": self.missed,
            "failovers": failovers,
            "turn_seconds_p50": median(durations, 2) if durations else None,
            "lost": self.lost,
        }


async def wait_healthy(gateway: Gateway, timeout: float = READY_TIMEOUT_S) -> None:
    async with asyncio.timeout(timeout):
        while not all(member.estimate.healthy for member in gateway.pool.members.values()):
            await asyncio.sleep(0.1)


async def busy_worker(gateway: Gateway, workers: list[WorkerProcess], kind: WorkerKind, timeout: float) -> WorkerProcess | None:
    """The ``kind`` worker with a job of the turn in flight, once one shows up (polled every 5 ms)."""
    by_url = {w.url: w for w in workers}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        for member in gateway.pool.members.values():
            if member.kind is kind and member.estimate.in_flight and member.estimate.healthy:
                return by_url[member.url]
        await asyncio.sleep(0.005)
    return None


async def chaos_turn(
    session: GatewaySession, gateway: Gateway, workers: list[WorkerProcess], kind: WorkerKind, speech: np.ndarray, question: str
) -> tuple[dict, WorkerProcess | None]:
    """One spoken question; the ``kind`` worker holding its job is killed mid-job."""
    after = len(session.events)
    started = time.monotonic()
    spoken = session.microphone.queue(speech, STT_SAMPLE_RATE)
    moment = {WorkerKind.STT: "transcript.partial", WorkerKind.LLM: "answer.token", WorkerKind.TTS: "answer.token"}[kind]
    victim = None
    try:
        await session.wait_event(moment, timeout=TURN_TIMEOUT_S, after=after)
        victim = await busy_worker(gateway, workers, kind, timeout=5.0)
        if victim is not None:
            victim.kill()
        await spoken
        final = await session.wait_event("transcript.final", timeout=TURN_TIMEOUT_S, after=after)
        done = await session.wait_event("answer.done", timeout=TURN_TIMEOUT_S, after=after)
        problem = None
        heard = words_heard(question, final["text"])
        if heard < MIN_WORDS_HEARD:
            problem = f"misheard ({heard:.0%} of the words): {final['text']!r}"
        elif not done["text"].strip() or done["interrupted"]:
            problem = f"answer empty or cut: {done}"
    except (TimeoutError, Exception) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    # A limit notice (the answer reached max_answer_tokens) is an error event too, but the turn is whole.
    errors = [e for e in session.events[after:] if e["type"] == "error" and e["code"] != "answer_truncated"]
    if errors and problem is None:
        problem = f"errors: {errors}"
    return {
        "kind": kind.value,
        "lost": problem is not None,
        "problem": problem,
        "seconds": round(time.monotonic() - started, 2),
        "victim": victim.url if victim else None,
    }, victim


async def run_chaos(kills: int, out: Path, logs_dir: Path | None = None) -> dict:
    """Kill workers during live turns until ``kills`` kills landed; report lost turns."""
    quiet = np.zeros(int(0.8 * STT_SAMPLE_RATE), np.int16)
    speeches = [np.concatenate([quiet, pcm, quiet]) for pcm in await asyncio.to_thread(speak_with_piper, *QUESTIONS)]
    workers = [WorkerProcess(kind, free_port()) for kind in KINDS for _ in range(2)]
    if logs_dir is not None:
        logs_dir.mkdir(parents=True, exist_ok=True)
        for i, worker in enumerate(workers):
            worker.log_path = logs_dir / f"{worker.kind.value}-{i % 2}.log"
    urls = {kind: [w.url for w in workers if w.kind is kind] for kind in KINDS}
    settings = GatewaySettings(loopback_ice=True, port=0, job_deadline_s=3.0, max_answer_tokens=32, vision_on_turn=False)
    gateway = Gateway(settings, urls)
    report = ChaosReport()
    session = None
    try:
        await asyncio.gather(*(w.start() for w in workers))
        port = await gateway.start("127.0.0.1", 0)
        await wait_healthy(gateway)
        session = await GatewaySession.connect(f"ws://127.0.0.1:{port}/session", loopback_ice=True, keep_answer_s=5)
        print(f"chaos: 2 workers each of {', '.join(k.value for k in KINDS)}; killing until {kills} kills", flush=True)
        turn = 0
        while len(report.kills) < kills:
            kind = KINDS[turn % len(KINDS)]
            result, victim = await chaos_turn(session, gateway, workers, kind, speeches[turn % len(speeches)], QUESTIONS[turn % len(QUESTIONS)])
            turn += 1
            report.turns.append(result)
            if victim is None:
                report.missed += 1
            else:
                report.kills.append({"kind": kind.value, "worker": victim.url, "turn": turn})
                await victim.process.wait()
                await victim.start()  # the box comes back; the pool reconnects by itself
            mark = "LOST " + result["problem"] if result["lost"] else "ok"
            print(f"  turn {turn:3d}  kill {kind.value:3s} {'(missed)' if victim is None else victim.url:22s} {result['seconds']:5.1f} s  {mark}", flush=True)
            await wait_healthy(gateway)
    finally:
        if session is not None:
            await session.close()
        failovers = {k.value: gateway.metrics.failovers.labels(k.value)._value.get() for k in KINDS}
        await gateway.close()
        await asyncio.gather(*(w.stop() for w in workers))
    summary = report.summary(failovers)
    out.write_text(json.dumps(summary, indent=2))
    print(
        f"chaos: {summary['kills']} kills ({summary['kills_by_kind']}), {summary['turns']} turns, "
        f"{summary['lost_turns']} lost, {summary['missed_kills']} kills missed (job done before seen); "
        f"failovers {failovers}; turn p50 {summary['turn_seconds_p50']} s; JSON in {out}",
        flush=True,
    )
    return summary
