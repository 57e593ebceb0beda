"""Which worker gets a job: the selection policies (pure: no sockets, no clocks, no I/O).

The gateway keeps a :class:`WorkerEstimate` per worker (``gateway/worker_pool.py``
feeds it: ping RTTs, jobs opened and finished, timings). A policy reads the
estimates and names a worker for one job.

:class:`LatencyAware`, the default, predicts each eligible worker's finish time
for the job and picks the lowest::

    finish = RTT + queueing + size / service rate
           = rtt + (work still to do on the worker) / capacity + seconds_per_unit * size

``size`` is in the kind's unit of work (:func:`job_size`); ``seconds_per_unit``
is learned online from the worker's own jobs as an exponentially weighted
moving average. A worker not measured yet is assumed to be as fast as the
fastest (so it is tried soon), and a slow estimate relaxes back towards the
kind's typical value when it has not been refreshed for a while, so a worker
that was slow once gets retried.
Workers within a small margin of the best are a tie, broken at random, so that
several gateways with the same view do not all herd onto one worker.

:class:`RoundRobin` and :class:`LeastLoaded` are here for comparison (the
selection benchmark runs all three).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from stream.ewma import Ewma
from stream.protocol import WorkerKind

PRIOR_SECONDS_PER_UNIT: dict[WorkerKind, float] = {
    WorkerKind.STT: 0.05,  # per utterance: end of speech to final transcript
    WorkerKind.LLM: 0.004,  # per prompt token not already in the worker's cache
    WorkerKind.TTS: 0.004,  # per character of the clause, to its first audio
    WorkerKind.VISION: 0.5,  # per frame
}
"""What a unit of work costs before a worker has been measured (the embedded models on 2 cores)."""


@dataclass
class WorkerEstimate:
    """What the gateway knows of one worker, for selection."""

    worker_id: str
    kind: WorkerKind
    capacity: int = 1
    model: tuple[str, str] = ("", "")
    """(model id, sha256) from the worker's hello."""
    healthy: bool = True
    rtt: Ewma = field(default_factory=lambda: Ewma(0.3))
    seconds_per_unit: Ewma = field(default_factory=lambda: Ewma(0.3))
    in_flight: dict[int, tuple[float, float]] = field(default_factory=dict)
    """(size in units, start time) of the jobs this gateway has open on the worker, by lease id."""
    others_running: int = 0
    """Jobs other clients (other gateways) run on it, from its load reports."""
    jobs: int = 0
    """Jobs sent to it so far."""

    def seconds_ahead(self, seconds_per_unit: float, now: float, typical_size: float) -> float:
        """Compute time still owed to the jobs already on the worker.

        Ours are known: the oldest ``capacity`` of them are running (jobs start
        in order), and the time they have run is subtracted from their cost.
        Other clients' jobs count at a typical size.
        """
        owed = 0.0
        for position, (size, started) in enumerate(sorted(self.in_flight.values(), key=lambda job: job[1])):
            cost = seconds_per_unit * size
            if position < self.capacity:
                cost = max(0.0, cost - (now - started))
            owed += cost
        return owed + self.others_running * seconds_per_unit * typical_size


@dataclass(frozen=True)
class Job:
    """One job to place: its kind, its size in units, and the worker that would find it cheaper."""

    kind: WorkerKind
    size: float = 1.0
    warm_worker: str | None = None
    """A worker that holds this job's context already (the LLM worker that answered the session's last turn)."""
    warm_size: float | None = None
    """The job's size on ``warm_worker`` (only the new prompt tokens)."""

    def size_on(self, worker_id: str) -> float:
        return self.warm_size if worker_id == self.warm_worker and self.warm_size is not None else self.size


def job_size(kind: WorkerKind, *, text: str = "", prompt_chars: int = 0) -> float:
    """A job's size in its kind's unit: utterances, prompt tokens (about 4 characters each), characters, frames."""
    if kind is WorkerKind.LLM:
        return max(1.0, prompt_chars / 4)
    if kind is WorkerKind.TTS:
        return float(max(1, len(text)))
    return 1.0


class Policy(Protocol):
    name: str

    def choose(self, job: Job, workers: Sequence[WorkerEstimate], now: float) -> WorkerEstimate: ...


def eligible(workers: Sequence[WorkerEstimate], job: Job) -> list[WorkerEstimate]:
    return [w for w in workers if w.healthy and w.kind is job.kind]


class LatencyAware:
    """Lowest predicted finish time; near-ties broken at random."""

    name = "latency-aware"

    def __init__(
        self,
        rng: random.Random | None = None,
        *,
        tie_margin: float = 0.05,
        tie_floor_s: float = 0.002,
        relax_after_s: float = 30.0,
    ) -> None:
        self.rng = rng or random.Random()
        self.tie_margin = tie_margin
        """Workers predicted within this fraction of the best are a tie..."""
        self.tie_floor_s = tie_floor_s
        """...or within this many seconds of it."""
        self.relax_after_s = relax_after_s
        """An estimate not refreshed for this long drifts back towards the kind's typical cost."""

    def seconds_per_unit(self, worker: WorkerEstimate, workers: Sequence[WorkerEstimate], now: float) -> float:
        typical = self.typical_seconds_per_unit(worker.kind, workers)
        measured = worker.seconds_per_unit.value
        if measured is None:
            # Optimistic: a worker not measured yet is assumed as fast as the
            # fastest one, so that it gets a job and a measurement soon.
            known = [w.seconds_per_unit.value for w in workers if w.kind is worker.kind and w.seconds_per_unit.value is not None]
            return min([PRIOR_SECONDS_PER_UNIT[worker.kind], *known])
        age = max(0.0, now - worker.seconds_per_unit.at)
        trust = math.exp(-age / self.relax_after_s)
        return trust * measured + (1 - trust) * min(measured, typical)

    @staticmethod
    def typical_seconds_per_unit(kind: WorkerKind, workers: Sequence[WorkerEstimate]) -> float:
        """The (lower) median measured cost among workers of ``kind``, or the prior."""
        measured = sorted(w.seconds_per_unit.value for w in workers if w.kind is kind and w.seconds_per_unit.value is not None)
        return measured[(len(measured) - 1) // 2] if measured else PRIOR_SECONDS_PER_UNIT[kind]

    def predict(self, job: Job, worker: WorkerEstimate, workers: Sequence[WorkerEstimate], now: float) -> float:
        """Seconds until ``worker`` would have finished ``job`` if it got it now."""
        per_unit = self.seconds_per_unit(worker, workers, now)
        ahead = worker.seconds_ahead(per_unit, now, typical_size=job.size)
        return (worker.rtt.value or 0.0) + ahead / worker.capacity + per_unit * job.size_on(worker.worker_id)

    def choose(self, job: Job, workers: Sequence[WorkerEstimate], now: float) -> WorkerEstimate:
        candidates = eligible(workers, job)
        if not candidates:
            raise LookupError(f"no healthy {job.kind.value} worker")
        predicted = [(self.predict(job, w, workers, now), w) for w in candidates]
        best = min(p for p, _ in predicted)
        limit = best + max(best * self.tie_margin, self.tie_floor_s)
        return self.rng.choice([w for p, w in predicted if p <= limit])


class RoundRobin:
    """Each healthy worker in turn, ignoring speed and load."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next: dict[WorkerKind, int] = {}

    def choose(self, job: Job, workers: Sequence[WorkerEstimate], now: float) -> WorkerEstimate:
        candidates = sorted(eligible(workers, job), key=lambda w: w.worker_id)
        if not candidates:
            raise LookupError(f"no healthy {job.kind.value} worker")
        turn = self._next.get(job.kind, 0)
        self._next[job.kind] = turn + 1
        return candidates[turn % len(candidates)]


class LeastLoaded:
    """The fewest jobs in flight per unit of capacity (ties at random), ignoring speed and RTT."""

    name = "least-loaded"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def choose(self, job: Job, workers: Sequence[WorkerEstimate], now: float) -> WorkerEstimate:
        candidates = eligible(workers, job)
        if not candidates:
            raise LookupError(f"no healthy {job.kind.value} worker")
        load = {w.worker_id: (len(w.in_flight) + w.others_running) / w.capacity for w in candidates}
        least = min(load.values())
        return self.rng.choice([w for w in candidates if load[w.worker_id] == least])


POLICIES = {"latency-aware": LatencyAware, "round-robin": RoundRobin, "least-loaded": LeastLoaded}
