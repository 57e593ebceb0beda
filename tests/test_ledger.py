"""The gateway's session ledger and the merging of its processes' reports: pure, no sockets."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.aggregate import merge_health, merge_metrics, merge_pool, missing_for_ready
from gateway.ledger import SessionLedger
from stream.config import GatewaySettings


def test_the_limits_count_every_owners_sessions():
    ledger = SessionLedger(max_sessions=3, max_sessions_per_client=2)
    assert ledger.claim(1, "a", "kitchen") is None
    assert ledger.claim(2, "b", "kitchen") is None
    refusal = ledger.claim(1, "c", "kitchen")
    assert refusal is not None and refusal.code == "too_many_client_sessions" and "kitchen" in refusal.message
    assert ledger.claim(2, "c", "hall") is None
    refusal = ledger.claim(1, "d", "garage")
    assert refusal is not None and refusal.code == "too_many_sessions"
    assert len(ledger) == 3 and ledger.held_by(1) == 1 and ledger.held_by(2) == 2


def test_a_refused_claim_takes_nothing_and_a_release_frees_the_place():
    ledger = SessionLedger(max_sessions=1, max_sessions_per_client=1)
    assert ledger.claim(1, "a", "x") is None
    assert ledger.claim(1, "b", "y") is not None
    ledger.release("b")  # never held: nothing
    assert len(ledger) == 1
    ledger.release("a")
    ledger.release("a")  # again: nothing
    assert len(ledger) == 0 and ledger.claim(2, "b", "x") is None


def test_the_same_session_cannot_be_claimed_twice():
    ledger = SessionLedger(max_sessions=5, max_sessions_per_client=5)
    assert ledger.claim(1, "a", "x") is None
    assert ledger.claim(2, "a", "y") is not None
    assert len(ledger) == 1


def test_an_owner_that_dies_lets_go_of_every_place_it_held():
    ledger = SessionLedger(max_sessions=4, max_sessions_per_client=2)
    for owner, session, client in ((1, "a", "x"), (1, "b", "x"), (2, "c", "y")):
        assert ledger.claim(owner, session, client) is None
    assert sorted(ledger.drop(1)) == ["a", "b"]
    assert ledger.drop(1) == []
    assert len(ledger) == 1 and ledger.claim(3, "d", "x") is None and ledger.claim(3, "e", "x") is None


def _exposition(turns: float, sessions_open: float, lag: list[float], worker_up: float, others: float) -> str:
    registry = CollectorRegistry()
    Counter("edgestream_turns", "Turns.", ["outcome"], registry=registry).labels("answered").inc(turns)
    Gauge("edgestream_sessions_open", "Open.", registry=registry).set(sessions_open)
    histogram = Histogram("edgestream_ingest_lag_seconds", "Lag.", buckets=(0.01, 0.02), registry=registry)
    for value in lag:
        histogram.observe(value)
    up = Gauge("edgestream_worker_up", "Up.", ["kind", "worker"], registry=registry)
    up.labels("stt", "w1").set(worker_up)
    Gauge("edgestream_worker_jobs_others", "Others.", ["kind", "worker"], registry=registry).labels("stt", "w1").set(others)
    return generate_latest(registry).decode()


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def test_metrics_of_two_processes_add_up_except_what_describes_a_worker():
    merged = _samples(merge_metrics({0: _exposition(3, 2, [0.005, 0.015], worker_up=1, others=4), 1: _exposition(5, 1, [0.005, 0.5], worker_up=0, others=2)}))
    assert merged[("edgestream_turns_total", (("outcome", "answered"),))] == 8
    assert merged[("edgestream_sessions_open", ())] == 3
    assert merged[("edgestream_ingest_lag_seconds_bucket", (("le", "0.01"),))] == 2
    assert merged[("edgestream_ingest_lag_seconds_bucket", (("le", "0.02"),))] == 3
    assert merged[("edgestream_ingest_lag_seconds_count", ())] == 4
    assert merged[("edgestream_worker_up", (("kind", "stt"), ("worker", "w1")))] == 1  # up for one process: up
    assert merged[("edgestream_worker_jobs_others", (("kind", "stt"), ("worker", "w1")))] == 2
    assert not any(name.endswith("_created") for name, _ in merged)


def test_metrics_per_process_keep_each_process_apart():
    merged = _samples(merge_metrics({0: _exposition(3, 2, [], 1, 0), 1: _exposition(5, 1, [], 1, 0)}, per_process=True))
    assert merged[("edgestream_turns_total", (("outcome", "answered"), ("process", "0")))] == 3
    assert merged[("edgestream_turns_total", (("outcome", "answered"), ("process", "1")))] == 5


def _health(process: int, sessions: int, llm: bool, llm_state: str, closing: bool = False) -> dict:
    return {
        "process": process,
        "pid": 100 + process,
        "sessions": sessions,
        "workers": {"stt": True, "llm": llm, "tts": True, "vision": False},
        "states": {"stt": "ready", "llm": llm_state, "tts": "ready", "vision": "none"},
        "required": ["stt", "llm", "tts"],
        "pool": [],
        "closing": closing,
    }


def test_health_of_the_gateway_is_the_worst_of_its_processes():
    health = merge_health([_health(0, 2, True, "ready"), _health(1, 3, False, "down")], expected=2)
    assert health["sessions"] == 5
    assert health["workers"]["llm"] is False and health["workers"]["stt"] is True
    assert health["states"]["llm"] == "down" and health["states"]["vision"] == "none"
    assert [p["pid"] for p in health["processes"]] == [100, 101]
    assert missing_for_ready(health) == ["llm"]


def test_a_process_missing_or_closing_keeps_the_gateway_from_ready():
    health = merge_health([_health(0, 0, True, "ready")], expected=2)
    assert missing_for_ready(health) == ["1 gateway process starting"]
    health = merge_health([_health(0, 0, True, "ready"), _health(1, 0, True, "ready", closing=True)], expected=2)
    assert missing_for_ready(health) == ["shutting_down"]
    assert missing_for_ready(merge_health([_health(0, 0, True, "ready"), _health(1, 0, True, "starting")], expected=2)) == []


def _worker(url: str, healthy: bool, in_flight: int, jobs: int, rtt_ms: float | None) -> dict:
    return {"url": url, "worker_id": url, "healthy": healthy, "problem": None if healthy else "stalled",
            "rtt_ms": rtt_ms, "ms_per_unit": None, "in_flight": in_flight, "jobs": jobs, "capacity": 2}  # fmt: skip


def test_the_pool_of_the_gateway_adds_up_each_process_s_jobs():
    """A job in flight in any process shows in /healthz, wherever the request landed."""
    pool = merge_pool(
        [
            [_worker("ws://a", True, 0, 3, 1.0), _worker("ws://b", True, 0, 0, None)],
            [_worker("ws://a", True, 1, 2, 4.0), _worker("ws://b", False, 0, 0, 2.0), _worker("ws://c", True, 0, 0, 1.0)],
        ]
    )
    rows = {row["url"]: row for row in pool}
    assert rows["ws://a"]["in_flight"] == 1 and rows["ws://a"]["jobs"] == 5 and rows["ws://a"]["rtt_ms"] == 4.0
    assert rows["ws://a"]["healthy"] and rows["ws://a"]["processes"] == 2
    assert not rows["ws://b"]["healthy"] and rows["ws://b"]["problem"] == "stalled" and rows["ws://b"]["rtt_ms"] == 2.0
    assert not rows["ws://c"]["healthy"]  # only one process has found it: not every session can reach it
    assert merge_pool([[_worker("ws://a", True, 2, 2, None)]])[0]["in_flight"] == 2


def test_limits_checked_where_a_connection_lands_are_shared_out_over_the_processes():
    settings = GatewaySettings(max_pending_signaling=64, max_pending_signaling_per_address=8, offers_per_minute=30)
    share = settings.share_of(2)
    assert (share.max_pending_signaling, share.max_pending_signaling_per_address, share.offers_per_minute) == (32, 4, 15)
    assert share.max_sessions == settings.max_sessions  # the ledger holds those for the whole gateway
    assert settings.share_of(1) is settings
    assert GatewaySettings(max_pending_signaling_per_address=1).share_of(4).max_pending_signaling_per_address == 1
