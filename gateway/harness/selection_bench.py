"""``edgestream bench selection``: the selection policies on heterogeneous STT workers, at several loads.

Three worker servers on loopback, each running one job at a time (jobs queue
on the worker): ``fast`` (the baseline), ``slow`` (4x slower compute) and
``far`` (as fast, behind a relay that adds 40 ms to each round trip). Jobs
arrive as a Poisson stream at a fraction of the three workers' total capacity
and go through the real pool, leases and WebSocket protocol; only the model is
simulated, so that the workers' speeds are what the benchmark says they are
and not whatever two shared cores give three real models: a job of ``a``
seconds of audio costs ``a * 0.02`` s of compute (the embedded whisper's
real-time factor is about 0.015), times 4 on the slow worker.

Policies: latency-aware (the default), round-robin, least-loaded, and an
oracle that knows every job's exact cost and every worker's queue and RTT and
sends each job where it will finish first (a greedy clairvoyant baseline).
Job latency is from arrival to the final result, as the gateway sees it.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.harness.delay_relay import start_relay
from gateway.harness.simulated import SimulatedStt
from gateway.selection import (
    Job,
    LatencyAware,
    LeastLoaded,
    Policy,
    RoundRobin,
    WorkerEstimate,
)
from gateway.worker_pool import PoolSettings, WorkerPool
from stream.protocol import JobResult, WorkerKind
from stream.protocol.jobs import STT_SAMPLE_RATE
from workers.server import WorkerServer

from .figures import median, percentile

SECONDS_PER_AUDIO_SECOND = 0.02
AUDIO_SECONDS = (1.0, 3.0)
"""Utterance lengths, uniform: 20-60 ms of compute on the fast workers."""
FAR_DELAY_S = 0.020  # each way


@dataclass(frozen=True)
class SimulatedWorker:
    name: str
    slowdown: float
    delay_s: float


WORKERS = (SimulatedWorker("fast", 1.0, 0.0), SimulatedWorker("slow", 4.0, 0.0), SimulatedWorker("far", 1.0, FAR_DELAY_S))


class Oracle:
    """Knows each job's true cost on each worker, each worker's queue and its RTT: earliest finish wins."""

    name = "oracle"

    def __init__(self, cost: dict[str, float], rtt: dict[str, float]) -> None:
        self.cost = cost
        """Seconds of compute per audio second, by worker id."""
        self.rtt = rtt
        self.busy_until: dict[str, float] = dict.fromkeys(cost, 0.0)

    def choose(self, job: Job, workers: Sequence[WorkerEstimate], now: float) -> WorkerEstimate:
        def finish(w: WorkerEstimate) -> float:
            arrives = now + self.rtt[w.worker_id] / 2
            return max(arrives, self.busy_until[w.worker_id]) + job.size * self.cost[w.worker_id] + self.rtt[w.worker_id] / 2

        best = min(workers, key=finish)
        self.busy_until[best.worker_id] = finish(best) - self.rtt[best.worker_id] / 2
        return best


async def run_level(policy_name: str, load: float, jobs: int, seed: int) -> dict[str, object]:
    """One policy at one load: the jobs' latencies and where they went."""
    servers: list[WorkerServer] = []
    relays: list[asyncio.Server] = []
    urls: list[str] = []
    cost: dict[str, float] = {}
    rtt: dict[str, float] = {}
    for spec in WORKERS:
        server = WorkerServer(SimulatedStt(SECONDS_PER_AUDIO_SECOND * spec.slowdown), capacity=1, max_queue=10_000, worker_id=spec.name)
        port = await server.start("127.0.0.1", 0)
        servers.append(server)
        if spec.delay_s:
            relay = await start_relay("127.0.0.1", 0, "127.0.0.1", port, spec.delay_s)
            relays.append(relay)
            port = relay.sockets[0].getsockname()[1]
        urls.append(f"ws://127.0.0.1:{port}")
        cost[spec.name] = SECONDS_PER_AUDIO_SECOND * spec.slowdown
        rtt[spec.name] = 2 * spec.delay_s
    rng = random.Random(seed)
    policy: Policy = {
        "latency-aware": lambda: LatencyAware(random.Random(seed)),
        "round-robin": RoundRobin,
        "least-loaded": lambda: LeastLoaded(random.Random(seed)),
        "oracle": lambda: Oracle(cost, rtt),
    }[policy_name]()
    pool = WorkerPool({WorkerKind.STT: urls}, policy=policy, settings=PoolSettings(ping_interval_s=0.25), clock=time.monotonic)
    pool.start()
    try:
        await pool.wait_ready([WorkerKind.STT], timeout=10)
        async with asyncio.timeout(10):
            while not all(m.estimate.healthy and m.estimate.rtt.value is not None for m in pool.members.values()):
                await asyncio.sleep(0.05)
        mean_audio = sum(AUDIO_SECONDS) / 2
        capacity_per_s = sum(1 / (mean_audio * SECONDS_PER_AUDIO_SECOND * spec.slowdown) for spec in WORKERS)
        rate = load * capacity_per_s
        latencies: list[float] = []
        placed: dict[str, int] = {}

        async def one(audio_s: float) -> None:
            arrived = time.monotonic()
            lease = pool.acquire(Job(WorkerKind.STT, size=audio_s))
            placed[lease.worker_id] = placed.get(lease.worker_id, 0) + 1
            try:
                job = await lease.client.start_job({})
                await job.send_audio(np.zeros(int(audio_s * STT_SAMPLE_RATE), np.int16))
                await job.end()
                async for event in job.events():
                    if isinstance(event, JobResult):
                        break
                async for _ in job.events():
                    pass
                latency = time.monotonic() - arrived
                queued = job.done.stats.get("queued_s", 0.0) if job.done else 0.0
                lease.observe(latency - queued)  # the service part; queueing is predicted from jobs in flight
                latencies.append(latency)
            finally:
                lease.release()

        tasks = []
        next_at = time.monotonic()
        for _ in range(jobs):
            next_at += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            tasks.append(asyncio.create_task(one(rng.uniform(*AUDIO_SECONDS))))
        await asyncio.gather(*tasks)
        ordered = sorted(latencies)
        return {
            "policy": policy_name,
            "load": load,
            "jobs": len(ordered),
            "p50_ms": median(1000 * s for s in ordered),
            "p95_ms": percentile((1000 * s for s in ordered), 0.95),
            "placed": placed,
        }
    finally:
        await pool.close()
        for relay in relays:
            relay.close()
        for server in servers:
            await server.close()


async def run_selection_bench(loads: list[float], jobs: int, repeats: int, out: Path) -> dict[str, object]:
    policies = ["latency-aware", "round-robin", "least-loaded", "oracle"]
    runs = []
    for repeat in range(repeats):
        for load in loads:
            for name in policies:  # same seed per load and repeat: the same arrivals for every policy
                run = await run_level(name, load, jobs, seed=1000 * repeat + int(load * 100))
                runs.append(run)
                print(
                    f"  run {repeat + 1}/{repeats} load {load:.2f} {name:>13}: p50 {run['p50_ms']:7.1f} ms  p95 {run['p95_ms']:7.1f} ms  {run['placed']}",
                    flush=True,
                )
    summary = []
    for load in loads:
        row: dict[str, object] = {"load": load}
        for name in policies:
            mine = [r for r in runs if r["load"] == load and r["policy"] == name]
            row[name] = {"p50_ms": statistics.median(r["p50_ms"] for r in mine), "p95_ms": statistics.median(r["p95_ms"] for r in mine)}
        # Ratios within each repeat (same arrivals, same machine state), then their median.
        by_repeat = [{r["policy"]: r for r in runs[i : i + len(policies)] if r["load"] == load} for i in range(0, len(runs), len(policies))]
        by_repeat = [group for group in by_repeat if group]
        row["p95_vs_oracle"] = round(statistics.median(g["latency-aware"]["p95_ms"] / g["oracle"]["p95_ms"] for g in by_repeat), 3)
        row["round_robin_p95_over_ours"] = round(statistics.median(g["round-robin"]["p95_ms"] / g["latency-aware"]["p95_ms"] for g in by_repeat), 2)
        summary.append(row)
    result = {
        "benchmark": "selection",
        "workers": [spec.__dict__ for spec in WORKERS],
        "seconds_per_audio_second": SECONDS_PER_AUDIO_SECOND,
        "audio_seconds": AUDIO_SECONDS,
        "jobs_per_run": jobs,
        "repeats": repeats,
        "summary": summary,
        "runs": runs,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"{'load':>5}  " + "  ".join(f"{name + ' p50/p95 ms':>26}" for name in policies) + "  ours/oracle p95  rr/ours p95")
    for row in summary:
        cells = "  ".join(f"{row[name]['p50_ms']:>12.1f} /{row[name]['p95_ms']:>11.1f}" for name in policies)
        print(f"{row['load']:>5.2f}  {cells}  {row['p95_vs_oracle']:>15.3f}  {row['round_robin_p95_over_ours']:>11.2f}")
    print(f"wrote {out}")
    return result
