"""``edgestream bench gateway-load``: how many talking WebRTC sessions one gateway process holds.

For each N, a fresh gateway process (``edgestream gateway``) takes N sessions
from aiortc clients (the Python SDK, in ``--clients`` other processes). Every
session speaks the same piper-made question in a loop (2.4 s of speech, then
silence while the answer plays), each from its own offset, so turns are
spread out in time. The question's Opus packets are encoded once and sent as
they are, so the clients spend their CPU on RTP, not on encoding.

Every turn goes the whole way through the gateway: WebRTC in, Opus decode,
resample, VAD and turn taking, the utterance streamed to an STT worker, the
transcript to an LLM worker, clauses to a TTS worker, the answer resampled
and played back over WebRTC. The workers are real worker servers speaking the
real protocol, with canned models (``gateway/harness/simulated.py``), so that no
model competes with the gateway for the machine: this measures the gateway.

Figures per N, over a ``--window`` of seconds after all sessions are up:
the gateway's CPU (% of one core); ingest lag p50/p99 (how late each received
audio frame reaches the turn detector against its session's media clock,
from the gateway's ``edgestream_ingest_lag_seconds`` histogram); audio frames
lost (timestamp gaps) and received against sent; the answer frames per second
each client received (min over sessions); turns answered; and the clients'
own pacing slip (if the clients are late, the load is not what it says). The
result is the largest N whose ingest lag p99 is under 20 ms.

The clients stand for N separate devices but run on the gateway's own cores.
``--clients-nice`` runs them at a lower CPU priority (``nice``), so that the
gateway gets the cores first, as on a box of its own; what they are late by
still counts against the gateway (the lag is measured from their media clock),
so a lower priority can only make the lag worse, never hide the gateway's.

``python -m gateway.harness.load_bench client URL N PACKETS`` is one client process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import pickle
import random
import signal
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from prometheus_client.parser import text_string_to_metric_families

from gateway.harness.simulated import CannedLlm, CannedTts, SimulatedStt
from stream.audio import OPUS_FRAME as FRAME
from stream.audio import OPUS_RATE as RATE
from stream.audio import FrameClock, OpusEncoder, opus_packet
from stream.http import get as http_get
from stream.protocol import WorkerKind
from stream.running import run
from workers.server import WorkerServer

from .figures import free_port, machine, median, percentile, rss_mb, work_dir
from .speech import piper_voice

QUESTION = "What is the capital of France?"
ANSWER = "Paris is the capital of France."
LOOP_SILENCE_S = 4.0
"""Silence after each question: the answer (about 2 s) plays, then the person asks again."""
LAG_TARGET_S = 0.020


# -- what the clients send ---------------------------------------------------------


def speech_packets() -> tuple[list[bytes], np.ndarray, int]:
    """(the question then silence, as 20 ms Opus packets; the answer's PCM and its rate), spoken by piper."""
    with piper_voice(rate=RATE) as say:
        question, answer = say(QUESTION), say(ANSWER)
    encoder = OpusEncoder()
    pcm = np.concatenate([question, np.zeros(int(LOOP_SILENCE_S * RATE), np.int16)])
    pcm = np.pad(pcm, (0, -len(pcm) % FRAME))
    packets = [p for start in range(0, len(pcm), FRAME) for p in encoder.encode(pcm[start : start + FRAME])]
    return packets + encoder.flush(), answer, RATE


class PacketTrack(MediaStreamTrack):
    """A microphone that loops pre-encoded Opus packets in real time, from a chosen offset; it records how late it is."""

    kind = "audio"

    def __init__(self, packets: list[bytes], offset: int) -> None:
        super().__init__()
        self.packets = packets
        self.index = offset
        self.sent = 0
        self.questions = 0
        """Times the question started from its beginning."""
        self.slip: deque[float] = deque(maxlen=10_000)
        self._clock = FrameClock(FRAME, RATE)

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        pts = await self._clock.tick()
        self.slip.append(max(0.0, time.time() - self._clock.due))
        position = self.index % len(self.packets)
        self.questions += position == 0
        packet = opus_packet(self.packets[position], pts)
        self.index += 1
        self.sent += 1
        return packet


# -- one client process ------------------------------------------------------------


async def run_client(url: str, sessions: int, packets_file: Path, seed: int) -> None:
    """Open ``sessions`` sessions; on stdin ``start`` reset the counts, on ``stop`` print them as JSON and exit."""
    from stream.sdk import GatewaySession

    packets = pickle.loads(packets_file.read_bytes())
    rng = random.Random(seed)
    opened: list[tuple[GatewaySession, PacketTrack]] = []
    failed = 0
    for _ in range(sessions):
        track = PacketTrack(packets, rng.randrange(len(packets)))
        try:
            session = await GatewaySession.connect(url, microphone=track, keep_answer_s=0, loopback_ice=True, timeout=30)
        except Exception as exc:
            failed += 1
            print(json.dumps({"connect_error": f"{type(exc).__name__}: {exc}"}), file=sys.stderr, flush=True)
            continue
        opened.append((session, track))
    print(json.dumps({"ready": len(opened), "failed": failed}), flush=True)
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    marks: list[tuple[int, int, int, int]] = []
    while line := (await reader.readline()).decode().strip():
        if line == "start":
            marks = [(t.sent, s.frames_received, len(s.events), t.questions) for s, t in opened]
            for _, track in opened:
                track.slip.clear()
            started = time.monotonic()
        elif line == "stop":
            window = time.monotonic() - started
            slips = sorted(x for _, t in opened for x in t.slip) or [0.0]
            fps, answered, errors, sent, questions, unanswered = [], 0, 0, 0, 0, 0
            for (session, track), (sent0, received0, events0, questions0) in zip(opened, marks, strict=True):
                sent += track.sent - sent0
                questions += track.questions - questions0
                fps.append((session.frames_received - received0) / window)
                new = session.events[events0:]
                done = sum(1 for e in new if e.get("type") == "answer.done")
                answered += done
                errors += sum(1 for e in new if e.get("type") == "error")
                # The window cuts one question at each end: more than one missing answer is a lost turn.
                unanswered += max(0, track.questions - questions0 - done - 1)
            print(
                json.dumps(
                    {
                        "sessions": len(opened),
                        "failed": failed,
                        "sent": sent,
                        "answers": answered,
                        "errors": errors,
                        "questions": questions,
                        "unanswered": unanswered,
                        "fps_back": fps,
                        "slip_p50_ms": percentile(slips, 0.5, 6) * 1000,
                        "slip_p99_ms": percentile(slips, 0.99, 6) * 1000,
                        "closed": sum(1 for s, _ in opened if s.closed.is_set()),
                    }
                ),
                flush=True,
            )
            break
    for session, _ in opened:
        with contextlib.suppress(Exception):
            await session.close()


# -- the orchestrator ----------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _metrics(text: str) -> dict[str, Any]:
    """The few series the benchmark reads (ingest lag buckets, frame and turn counters), for the
    whole gateway and, under ``"processes"``, for each of its processes (``/metrics?per_process=1``)."""
    per: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out = per.setdefault(sample.labels.get("process", "0"), {"lag_buckets": {}, "turns": {}})
            if sample.name == "edgestream_ingest_lag_seconds_bucket":
                out["lag_buckets"][float(sample.labels["le"])] = sample.value
            elif sample.name in ("edgestream_audio_frames_total", "edgestream_audio_frames_lost_total"):
                out[sample.name] = sample.value
            elif sample.name == "edgestream_turns_total":
                out["turns"][sample.labels["outcome"]] = sample.value
    total: dict[str, Any] = {"lag_buckets": collections.Counter(), "turns": collections.Counter(), "processes": per}
    for out in per.values():
        total["lag_buckets"].update(out["lag_buckets"])
        total["turns"].update(out["turns"])
        for name in ("edgestream_audio_frames_total", "edgestream_audio_frames_lost_total"):
            total[name] = total.get(name, 0.0) + out.get(name, 0.0)
    return total


async def _scrape(base: str) -> dict[str, Any]:
    return _metrics((await http_get(f"{base}/metrics?per_process=1"))[1])


async def _gateway_pids(base: str, supervisor: int) -> list[int]:
    """The pids of the gateway's processes (its own pid when it is one process)."""
    health = json.loads((await http_get(f"{base}/healthz"))[1])
    pids = [p["pid"] for p in health.get("processes", [])]
    return pids if health.get("processes_expected", 1) > 1 else [supervisor]


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """The q-quantile of cumulative ``{upper bound: count}`` buckets, interpolated linearly within a bucket (as Prometheus does)."""
    edges = sorted(buckets)
    total = buckets[edges[-1]]
    if total <= 0:
        return float("nan")
    rank = q * total
    lower, below = 0.0, 0.0
    for edge in edges:
        count = buckets[edge]
        if count >= rank:
            if edge == float("inf"):
                return lower
            return lower + (edge - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = edge, count
    return lower


@dataclass
class Harness:
    """The canned workers (in this process) and the packets the clients send."""

    workdir: Path
    packets_file: Path
    worker_urls: dict[str, str]
    servers: list[WorkerServer]
    clients_nice: int = 0
    """``nice`` of the client processes (0: the gateway's priority)."""


async def start_canned_workers(answer: np.ndarray, answer_rate: int) -> tuple[list[WorkerServer], dict[str, str]]:
    """STT, LLM and TTS worker servers on loopback whose models cost nothing: the servers and their URLs by kind."""
    servers, urls = [], {}
    for kind, engine in (
        (WorkerKind.STT, SimulatedStt(0.0, text=QUESTION)),
        (WorkerKind.LLM, CannedLlm(ANSWER)),
        (WorkerKind.TTS, CannedTts(answer, answer_rate, len(ANSWER))),
    ):
        server = WorkerServer(engine, capacity=1024, worker_id=f"canned-{kind.value}")
        urls[kind.value] = f"ws://127.0.0.1:{await server.start('127.0.0.1', 0)}"
        servers.append(server)
    return servers, urls


def gateway_config(port: int, worker_urls: dict[str, str], extra: str = "") -> str:
    """A gateway config using the canned workers (and no vision worker)."""
    return (
        f"[gateway]\nport = {port}\nloopback_ice = true\nvision_on_turn = false\n{extra}"
        f'[gateway.workers]\nstt = ["{worker_urls["stt"]}"]\nllm = ["{worker_urls["llm"]}"]\ntts = ["{worker_urls["tts"]}"]\n'
        'vision = ["ws://127.0.0.1:9"]\n'
    )


async def start_gateway(config: Path, port: int, log: Path) -> asyncio.subprocess.Process:
    """``edgestream gateway --config CONFIG`` in its own process, once ``/readyz`` says ready."""
    gateway = await _spawn("-m", "gateway", "gateway", "--config", str(config), log=log)
    async with asyncio.timeout(60):
        while True:
            with contextlib.suppress(OSError, ValueError):
                if (await http_get(f"http://127.0.0.1:{port}/readyz"))[0] == 200:
                    return gateway
            if gateway.returncode is not None:
                raise RuntimeError(f"the gateway exited: see {log}")
            await asyncio.sleep(0.2)


async def _start_harness(workdir: Path, clients_nice: int = 0) -> Harness:
    packets, answer, answer_rate = await asyncio.to_thread(speech_packets)
    packets_file = workdir / "question.opus.pickle"
    packets_file.write_bytes(pickle.dumps(packets))
    servers, urls = await start_canned_workers(answer, answer_rate)
    return Harness(workdir, packets_file, urls, servers, clients_nice)


async def _spawn(*args: str, log: Path, stdin: bool = False, nice: int = 0) -> asyncio.subprocess.Process:
    with log.open("ab") as stderr:
        return await asyncio.create_subprocess_exec(
            *(["nice", "-n", str(nice)] if nice else []),
            sys.executable,
            *args,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )


async def run_level(
    harness: Harness,
    sessions: int,
    clients: int,
    window_s: float,
    seed: int,
    profile: Path | None = None,
    sample_every_s: float | None = None,
    processes: int = 1,
) -> dict[str, Any]:
    """One fresh gateway of ``processes`` processes with ``sessions`` talking sessions: the figures over ``window_s``.

    With ``profile``, py-spy samples each gateway process's GIL-holding thread
    during the window and writes collapsed stacks there, one file per process
    (``py-spy`` must be installed).
    With ``sample_every_s``, the result has a ``timeline`` of the gateway's
    RSS and turn counts during the window (the soak run).
    """
    port = free_port()
    config = harness.workdir / f"gateway-{sessions}.toml"
    room = sessions + 10  # every limit above the load, so that only the gateway's work limits it
    config.write_text(
        gateway_config(
            port,
            harness.worker_urls,
            # Every client connects from 127.0.0.1: the per-address limits are the whole load's
            # (with the defaults a 2-process gateway refuses the 16th offer in a minute on a process).
            f"processes = {processes}\nmax_sessions = {room}\nmax_sessions_per_client = {room}\noffers_per_minute = {4 * room}\n"
            f"max_pending_signaling = {sessions + 64}\nmax_pending_signaling_per_address = {room}\nice_timeout_s = 60\n",
        )
    )
    gateway = await start_gateway(config, port, harness.workdir / f"gateway-{processes}x{sessions}.log")
    base = f"http://127.0.0.1:{port}"
    procs: list[asyncio.subprocess.Process] = []
    try:
        shares = [sessions // clients + (1 if i < sessions % clients else 0) for i in range(clients)]
        for i, share in enumerate(s for s in shares if s):
            procs.append(
                await _spawn(
                    "-m",
                    "gateway.harness.load_bench",
                    "client",
                    f"ws://127.0.0.1:{port}/session",
                    str(share),
                    str(harness.packets_file),
                    str(seed + i),
                    log=harness.workdir / f"client-{sessions}-{i}.log",
                    stdin=True,
                    nice=harness.clients_nice,
                )
            )
        ready = 0
        async with asyncio.timeout(60 + 0.5 * sessions):
            for proc in procs:
                ready += json.loads(await proc.stdout.readline())["ready"]
        await asyncio.sleep(3.0)  # every session talking, the first turns under way
        pids = await _gateway_pids(base, gateway.pid)
        before = await _scrape(base)
        cpu = {"gateway": _cpu_seconds(gateway.pid), "clients": sum(_cpu_seconds(p.pid) for p in procs), "workers": time.process_time()}
        cpu_per_process = [_cpu_seconds(pid) for pid in pids]
        for proc in procs:
            proc.stdin.write(b"start\n")
            await proc.stdin.drain()
        started = time.monotonic()
        spies = []
        for index, pid in enumerate(pids if profile is not None else []):
            assert profile is not None
            spy = await asyncio.create_subprocess_exec(
                "py-spy",
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(window_s)),
                "--gil",
                "--nonblocking",
                "--format",
                "raw",
                "--rate",
                "200",
                "--output",
                str(profile.with_name(f"{profile.stem}-p{index}{profile.suffix}")),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            spies.append(spy)
        timeline: list[dict[str, float]] = []
        if sample_every_s:
            while (t := time.monotonic() - started) < window_s:
                now = await _scrape(base)
                rss = sum(rss_mb(pid) for pid in {gateway.pid, *pids})  # all the gateway's processes
                timeline.append({"t_s": round(t, 1), "rss_mb": round(rss, 2), **{f"turns_{k}": v for k, v in now.get("turns", {}).items()}})
                await asyncio.sleep(min(sample_every_s, max(0.0, window_s - (time.monotonic() - started))))
        else:
            await asyncio.sleep(window_s)
        for spy in spies:
            await spy.wait()
        for proc in procs:
            proc.stdin.write(b"stop\n")
            await proc.stdin.drain()
        elapsed = time.monotonic() - started
        after = await _scrape(base)
        cpu_after = {"gateway": _cpu_seconds(gateway.pid), "clients": sum(_cpu_seconds(p.pid) for p in procs), "workers": time.process_time()}
        cpu_per_process = [(_cpu_seconds(pid) - start) for pid, start in zip(pids, cpu_per_process, strict=True)]
        rss = sum(rss_mb(pid) for pid in {gateway.pid, *pids})
        reports = []
        async with asyncio.timeout(60):
            for proc in procs:
                reports.append(json.loads(await proc.stdout.readline()))
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.stdin.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await asyncio.gather(*(p.wait() for p in procs))
        for proc in [*procs, gateway]:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM if proc is gateway else signal.SIGKILL)
        await asyncio.gather(*(p.wait() for p in [*procs, gateway]))
    lag = {le: after["lag_buckets"][le] - before["lag_buckets"].get(le, 0.0) for le in after["lag_buckets"]}
    per_process = []
    for index, seconds in enumerate(cpu_per_process):
        now, then = after["processes"].get(str(index), {}), before["processes"].get(str(index), {})
        buckets = {le: now["lag_buckets"][le] - then.get("lag_buckets", {}).get(le, 0.0) for le in now.get("lag_buckets", {})}
        per_process.append(
            {
                "cpu_pct": round(100 * seconds / elapsed, 1),
                "ingest_lag_p50_ms": round(1000 * histogram_quantile(0.5, buckets), 2) if buckets else None,
                "ingest_lag_p99_ms": round(1000 * histogram_quantile(0.99, buckets), 2) if buckets else None,
                "frames": int(now.get("edgestream_audio_frames_total", 0.0) - then.get("edgestream_audio_frames_total", 0.0)),
            }
        )
    frames = after["edgestream_audio_frames_total"] - before["edgestream_audio_frames_total"]
    within = lag.get(LAG_TARGET_S, 0.0) / max(lag[float("inf")], 1)
    fps = [x for r in reports for x in r["fps_back"]]
    sent = sum(r["sent"] for r in reports)
    turns_before, turns_after = before.get("turns", {}), after.get("turns", {})
    lost_frames = int(after["edgestream_audio_frames_lost_total"] - before["edgestream_audio_frames_lost_total"])
    unanswered = sum(r["unanswered"] for r in reports) + int(turns_after.get("failed", 0) - turns_before.get("failed", 0))
    gateway_seconds = cpu_after["gateway"] - cpu["gateway"] + (sum(cpu_per_process) if processes > 1 else 0.0)
    return {
        "processes": processes,
        "sessions": sessions,
        "connected": ready,
        "gateway_cpu_pct": round(100 * gateway_seconds / elapsed, 1),
        "cpu_pct_per_session": round(100 * gateway_seconds / elapsed / max(ready, 1), 2),
        "per_process": per_process,
        "clients_cpu_pct": round(100 * (cpu_after["clients"] - cpu["clients"]) / elapsed, 1),
        "workers_cpu_pct": round(100 * (cpu_after["workers"] - cpu["workers"]) / elapsed, 1),
        "gateway_rss_mb": round(rss, 1),
        "ingest_lag_p50_ms": round(1000 * histogram_quantile(0.5, lag), 2),
        "ingest_lag_p99_ms": round(1000 * histogram_quantile(0.99, lag), 2),
        "frames_within_20ms": round(within, 5),
        "frames_sent": sent,
        "frames_received": int(frames),
        "frames_lost": lost_frames,
        "answer_fps_min": round(min(fps), 1) if fps else 0.0,
        "answer_fps_median": median(fps) if fps else 0.0,
        "turns_answered": int(turns_after.get("answered", 0) - turns_before.get("answered", 0)),
        "turns_failed": int(turns_after.get("failed", 0) - turns_before.get("failed", 0)),
        "client_slip_p99_ms": round(max(r["slip_p99_ms"] for r in reports), 2),
        "sessions_closed_early": sum(r["closed"] for r in reports),
        "questions": sum(r["questions"] for r in reports),
        "unanswered": unanswered,
        "client_errors": sum(r["errors"] for r in reports),
        "turns_empty": int(turns_after.get("empty", 0) - turns_before.get("empty", 0)),
        "timeline": timeline,
        "passed": ready == sessions and within >= 0.99 and lost_frames == 0 and unanswered == 0,
    }


def _level_passes(runs: list[dict[str, Any]]) -> bool:
    """Every session connected in every run; p99 under the target, no lost frame and no lost turn in the median run."""
    if not runs or not all(r["connected"] == r["sessions"] for r in runs):
        return False
    ranked = sorted(runs, key=lambda r: r["ingest_lag_p99_ms"])
    return bool(ranked[(len(ranked) - 1) // 2]["passed"])


def _print_row(r: dict[str, Any]) -> None:
    per = " ".join(f"{p['cpu_pct']:g}%/{p['ingest_lag_p99_ms']}" for p in r["per_process"]) if r["processes"] > 1 else ""
    print(
        f"{r['processes']:>5} {r['sessions']:>8} {r['connected']:>9} {r['gateway_cpu_pct']:>7} {r['cpu_pct_per_session']:>6} {r['clients_cpu_pct']:>8} "
        f"{r['ingest_lag_p50_ms']:>8} {r['ingest_lag_p99_ms']:>8} {r['frames_lost']:>6} "
        f"{r['frames_received']:>8}/{r['frames_sent']:<8} {r['answer_fps_min']:>7} {r['turns_answered']:>7} "
        f"{r['client_slip_p99_ms']:>9} {'yes' if r['passed'] else 'no':>5} {per}",
        flush=True,
    )


async def run_load_bench(
    levels: list[int],
    clients: int,
    window_s: float,
    repeats: int,
    out: Path,
    profile_dir: Path | None = None,
    process_counts: tuple[int, ...] = (1,),
    logs: Path | None = None,
    clients_nice: int = 0,
) -> dict[str, Any]:
    """Every level on a gateway of each of ``process_counts`` processes, in one run (so their ratio is read off one machine state).

    The gateway's and clients' logs go to ``logs`` (kept), or to a temporary directory removed at the end.
    """
    with work_dir(logs, "edgestream-load-") as tmp:
        harness = await _start_harness(tmp, clients_nice)
        kept = "" if logs else " (removed at the end; --logs DIR keeps them)"
        niced = f" at nice {clients_nice}" if clients_nice else ""
        print(f"gateway-load: {window_s:g} s window per level, {clients} client processes{niced}, {repeats} run(s) per level; logs in {tmp}{kept}")
        print(
            f"{'procs':>5} {'sessions':>8} {'connected':>9} {'gw cpu%':>7} {'%/sess':>6} {'cli cpu%':>8} {'lag p50':>8} {'lag p99':>8} {'lost':>6} "
            f"{'recv/sent frames':>17} {'ans fps':>7} {'answers':>7} {'slip p99':>9} {'pass':>5} per process: cpu%/lag p99 ms"
        )
        runs: list[dict[str, Any]] = []
        try:
            for processes in process_counts:
                for sessions in levels:
                    level_runs = []
                    for repeat in range(repeats):
                        profile = None if profile_dir is None else profile_dir / f"gateway-{processes}x{sessions}-{repeat}.collapsed"
                        result = await run_level(harness, sessions, clients, window_s, seed=1000 * repeat + sessions, profile=profile, processes=processes)
                        _print_row(result)
                        level_runs.append(result)
                    runs += level_runs
                    if not any(r["passed"] for r in level_runs) and all(r["ingest_lag_p99_ms"] > 10 * LAG_TARGET_S * 1000 for r in level_runs):
                        print("  (far past the target: stopping here)")
                        break
        finally:
            for server in harness.servers:
                await server.close()
    passing = {
        processes: max((n for n in levels if _level_passes([r for r in runs if r["sessions"] == n and r["processes"] == processes])), default=0)
        for processes in process_counts
    }
    one = passing.get(1)
    summary = {
        "benchmark": "gateway-load",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "window_s": window_s,
        "clients": clients,
        "clients_nice": clients_nice,
        "repeats": repeats,
        "target": "ingest lag p99 < 20 ms, no lost frame, every turn answered",
        "max_sessions_passing": passing,
        "ratio_to_one_process": {p: round(n / one, 2) for p, n in passing.items()} if one else None,
        "runs": runs,
    }
    out.write_text(json.dumps(summary, indent=2))
    for processes, n in passing.items():
        ratio = f" ({n / one:.2f}x one process)" if one and processes != 1 else ""
        print(f"{processes} process(es): largest N passing (median over runs): {n}{ratio}")
    print(f"JSON in {out}")
    return summary


def _client_main() -> None:
    url, sessions, packets, seed = sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
    run(run_client(url, sessions, packets, seed))


if __name__ == "__main__" and sys.argv[1:2] == ["client"]:
    _client_main()


async def run_soak(sessions: int, seconds: float, sample_every_s: float, clients: int, out: Path) -> dict[str, Any]:
    """``sessions`` talking for ``seconds``: RSS over time, lost turns and errors (``edgestream soak``)."""
    with tempfile.TemporaryDirectory(prefix="edgestream-soak-") as tmp:
        harness = await _start_harness(Path(tmp))
        try:
            result = await run_level(harness, sessions, clients, seconds, seed=sessions, sample_every_s=sample_every_s)
        finally:
            for server in harness.servers:
                await server.close()
    timeline = result["timeline"]
    # Growth is measured from the end of the first tenth of the run: start-up allocations are not growth.
    settled = timeline[max(0, len(timeline) // 10)]["rss_mb"] if timeline else 0.0
    final = timeline[-1]["rss_mb"] if timeline else 0.0
    lost = result["turns_failed"] + result["turns_empty"] + result["unanswered"] + result["sessions_closed_early"]
    summary = {
        "command": "soak",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "sessions": sessions,
        "connected": result["connected"],
        "seconds": seconds,
        "questions": result["questions"],
        "turns_answered": result["turns_answered"],
        "lost_turns": lost,
        "client_errors": result["client_errors"],
        "rss_settled_mb": settled,
        "rss_final_mb": final,
        "rss_growth_pct": round(100 * (final - settled) / settled, 2) if settled else None,
        "targets": "RSS growth < 5%, no lost turn",
        "ingest_lag_p99_ms": result["ingest_lag_p99_ms"],
        "timeline": timeline,
    }
    out.write_text(json.dumps(summary, indent=2))
    print(
        f"soak: {sessions} sessions for {seconds:g} s: {result['questions']} questions, {result['turns_answered']} answered, "
        f"{lost} lost turns, {result['client_errors']} errors at clients"
    )
    print(f"  gateway RSS {settled:.1f} MB (after the first tenth) -> {final:.1f} MB: {summary['rss_growth_pct']}% (target < 5%); JSON in {out}")
    return summary
