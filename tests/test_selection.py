"""The selection policies on constructed states: no sockets, no clocks."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from gateway.selection import (
    PRIOR_SECONDS_PER_UNIT,
    Job,
    LatencyAware,
    LeastLoaded,
    RoundRobin,
    WorkerEstimate,
)
from stream.protocol import WorkerKind

STT = WorkerKind.STT


def worker(
    name: str,
    *,
    rtt: float = 0.001,
    per_unit: float | None = 0.05,
    at: float = 0.0,
    capacity: int = 2,
    in_flight: dict[int, float] | None = None,
    kind: WorkerKind = STT,
    healthy: bool = True,
) -> WorkerEstimate:
    w = WorkerEstimate(worker_id=name, kind=kind, capacity=capacity, healthy=healthy)
    w.rtt.observe(rtt, at)
    if per_unit is not None:
        w.seconds_per_unit.observe(per_unit, at)
    w.in_flight = {lease: (size, 0.0) for lease, size in (in_flight or {}).items()}  # all started at time 0
    return w


def picks(policy, job: Job, workers: list[WorkerEstimate], n: int = 200, now: float = 0.0) -> Counter:
    return Counter(policy.choose(job, workers, now).worker_id for _ in range(n))


def test_the_near_idle_worker_wins():
    near, far = worker("near", rtt=0.001), worker("far", rtt=0.040)
    assert picks(LatencyAware(random.Random(1)), Job(STT), [near, far]) == {"near": 200}


def test_a_slow_worker_loses_to_a_farther_fast_one():
    slow = worker("slow", rtt=0.001, per_unit=0.200)  # 4x slower box
    fast = worker("fast", rtt=0.040, per_unit=0.050)
    assert picks(LatencyAware(random.Random(1)), Job(STT), [slow, fast]) == {"fast": 200}


def test_queueing_moves_work_to_a_slower_idle_worker():
    busy = worker("busy", per_unit=0.05, capacity=1, in_flight={1: 1.0, 2: 1.0, 3: 1.0})  # 0.05 * (1 + 3) = 0.2 s
    idle = worker("idle", per_unit=0.10, capacity=1)  # 0.1 s
    assert LatencyAware().choose(Job(STT), [busy, idle], 0.0).worker_id == "idle"
    busy.in_flight = {1: (1.0, 0.0)}  # 0.05 * 2 = 0.1 s: now a tie, either may win
    assert set(picks(LatencyAware(random.Random(3)), Job(STT), [busy, idle])) == {"busy", "idle"}


def test_ties_are_broken_at_random_so_gateways_do_not_herd():
    workers = [worker(f"w{i}") for i in range(3)]
    counts = picks(LatencyAware(random.Random(7)), Job(STT), workers, n=600)
    assert set(counts) == {"w0", "w1", "w2"} and min(counts.values()) > 120


def test_a_worker_holding_the_context_is_cheaper_for_the_llm():
    warm = worker("warm", kind=WorkerKind.LLM, per_unit=0.004)
    cold = worker("cold", kind=WorkerKind.LLM, per_unit=0.004, rtt=0.0)
    job = Job(WorkerKind.LLM, size=600, warm_worker="warm", warm_size=30)
    assert picks(LatencyAware(random.Random(1)), job, [cold, warm]) == {"warm": 200}
    # Unless the warm one is far busier than re-evaluating the prompt elsewhere costs.
    warm.in_flight = {1: (600.0, 0.0), 2: (600.0, 0.0), 3: (600.0, 0.0)}
    assert LatencyAware().choose(job, [cold, warm], 0.0).worker_id == "cold"


def test_an_unmeasured_worker_is_assumed_fast_and_gets_tried():
    measured = [worker("a", per_unit=0.03), worker("b", per_unit=0.2)]
    new = worker("new", per_unit=None, rtt=0.0005)
    policy = LatencyAware()
    assert policy.seconds_per_unit(new, [*measured, new], 0.0) == pytest.approx(0.03)  # the fastest measured
    assert "new" in picks(LatencyAware(random.Random(2)), Job(STT), [*measured, new])
    # Even when the only measured worker is slow, a newcomer is tried at once.
    slow = worker("slow", per_unit=0.5)
    assert policy.choose(Job(STT), [slow, new], 0.0).worker_id == "new"
    alone = worker("alone", per_unit=None)
    assert policy.seconds_per_unit(alone, [alone], 0.0) == PRIOR_SECONDS_PER_UNIT[STT]


def test_a_slow_estimate_relaxes_with_age_so_a_recovered_worker_is_retried():
    policy = LatencyAware(relax_after_s=10.0)  # relaxed fully after 100 s
    slow = worker("slow", per_unit=0.2, at=0.0)
    others = [worker("a", per_unit=0.05, at=100.0), worker("b", per_unit=0.05, at=100.0)]
    fresh = policy.seconds_per_unit(slow, [slow, *others], now=0.0)
    stale = policy.seconds_per_unit(slow, [slow, *others], now=100.0)
    assert fresh == pytest.approx(0.2) and stale == pytest.approx(0.05, rel=0.01)
    assert "slow" in picks(LatencyAware(random.Random(4), relax_after_s=10.0), Job(STT), [slow, *others], now=100.0)
    # A fast estimate does not decay upwards.
    fast = worker("fast", per_unit=0.01, at=0.0)
    assert policy.seconds_per_unit(fast, [fast, *others], now=100.0) == pytest.approx(0.01)


def test_unhealthy_and_other_kinds_are_never_chosen():
    workers = [worker("sick", healthy=False), worker("tts", kind=WorkerKind.TTS), worker("ok", rtt=0.5)]
    for policy in (LatencyAware(), RoundRobin(), LeastLoaded()):
        assert picks(policy, Job(STT), workers, n=20) == {"ok": 20}
    with pytest.raises(LookupError):
        LatencyAware().choose(Job(WorkerKind.VISION), workers, 0.0)


def test_round_robin_cycles_and_least_loaded_counts_jobs():
    workers = [worker("a"), worker("b", rtt=1.0), worker("c", per_unit=5.0)]
    rr = RoundRobin()
    assert [rr.choose(Job(STT), workers, 0).worker_id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    workers[0].in_flight = {1: (1.0, 0.0)}
    workers[1].others_running = 1
    assert LeastLoaded().choose(Job(STT), workers, 0).worker_id == "c"  # blind to its speed


def test_time_already_run_is_not_counted_again():
    policy = LatencyAware(random.Random(1))
    half_done = worker("half-done", per_unit=0.1, capacity=1)
    half_done.in_flight = {1: (1.0, 0.0)}  # a 0.1 s job that started at 0
    fresh = worker("fresh", per_unit=0.1, capacity=1)
    fresh.in_flight = {2: (1.0, 0.09)}  # the same job, started just now
    assert policy.predict(Job(STT), half_done, [half_done, fresh], now=0.09) == pytest.approx(0.001 + 0.01 + 0.1)
    assert policy.predict(Job(STT), fresh, [half_done, fresh], now=0.09) == pytest.approx(0.001 + 0.1 + 0.1)
    assert policy.choose(Job(STT), [half_done, fresh], now=0.09).worker_id == "half-done"
    # Queued behind the running one, a job owes its whole cost.
    half_done.in_flight[3] = (1.0, 0.05)
    assert policy.predict(Job(STT), half_done, [half_done], now=0.09) == pytest.approx(0.001 + 0.01 + 0.1 + 0.1)


def test_other_gateways_jobs_count_as_queueing():
    shared = worker("shared", capacity=1)
    shared.others_running = 4
    alone = worker("alone", per_unit=0.1, capacity=1)
    assert LatencyAware().choose(Job(STT), [shared, alone], 0.0).worker_id == "alone"
