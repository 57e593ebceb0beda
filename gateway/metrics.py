"""The gateway's Prometheus metrics (prometheus-client), served at ``GET /metrics``.

Each :class:`GatewayMetrics` has its own registry (a process may hold several
gateways, as the tests do). Counters and histograms are updated where things
happen (``session.py``, ``runner.py``, ``worker_pool.py``), except what is
counted for every audio frame (:class:`IngestCounts`); gauges (open
sessions, each worker's health, RTT and jobs in flight, answer audio queued)
are read from the live objects when Prometheus scrapes.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from .session import Session
    from .worker_pool import WorkerPool

STAGES = ("end_of_turn", "stt_final", "first_token", "first_clause", "first_tts_audio", "voice_to_voice")
"""Stages of a turn, each timed from the end of speech (``voice_to_voice``: the first answer audio sent)."""
STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Ingest lag: the 20 ms target sits on a bucket edge, so "p99 < 20 ms" is read exactly."""


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.stage_seconds = Histogram(
            "edgestream_turn_stage_seconds", "Time from the end of speech to each stage of a turn.", ["stage"], buckets=STAGE_BUCKETS, registry=r
        )
        self.turns = Counter(
            "edgestream_turns", "Turns, by how they ended (answered, interrupted, failed, empty, merged into the next).", ["outcome"], registry=r
        )
        self.sessions = Counter("edgestream_sessions", "Sessions opened.", registry=r)
        self.errors = Counter("edgestream_errors", "Errors sent to clients (signaling and session events), by code.", ["code"], registry=r)
        self.jobs = Counter(
            "edgestream_jobs",
            "Jobs given to workers, by outcome (ok, failed, cancelled, error, skipped: a prefill not worth the last free slot).",
            ["kind", "worker", "outcome"],
            registry=r,
        )
        self.decisions = Counter(
            "edgestream_selection_decisions",
            "Workers chosen by the selection policy (attempt: first, or retry after a failure).",
            ["kind", "worker", "policy", "attempt"],
            registry=r,
        )
        self.client_messages_dropped = Counter("edgestream_client_messages_dropped", "Messages on the events channel dropped by the rate limit.", registry=r)
        self.failovers = Counter("edgestream_failovers", "Jobs moved to another worker mid-turn.", ["kind"], registry=r)
        self.ingest = IngestCounts()
        """Counted for each received audio frame, so in plain integers: exported at scrape time."""
        r.register(_IngestExport(self.ingest))

    def observe_stages(self, marks_ms: dict[str, float]) -> None:
        """One turn's latency marks (ms from the end of speech), as the Latency event carries them."""
        for stage in STAGES:
            mark = marks_ms.get("first_audio_sent" if stage == "voice_to_voice" else stage)
            if mark is not None:
                self.stage_seconds.labels(stage).observe(max(mark, 0.0) / 1000)

    def watch(self, pool: WorkerPool, sessions: Callable[[], Iterable[Session]]) -> None:
        """Report the live state of ``pool`` and the sessions at each scrape."""
        self.registry.register(_LiveState(pool, sessions))


class IngestCounts:
    """What the media loop counts for every received audio frame (50 a second a session): plain
    integers, ~0.5 us a frame, where a prometheus-client Histogram and two Counters take a lock each."""

    def __init__(self) -> None:
        self.frames = 0
        self.lost = 0
        self.lag_counts = [0] * (len(LAG_BUCKETS) + 1)
        """Frames by lag bucket (not cumulative; the last: above every bound)."""
        self.lag_sum = 0.0

    def frame(self, lag_s: float, lost: int) -> None:
        """One frame received ``lag_s`` late against its media clock, after ``lost`` missing ones."""
        self.frames += 1
        self.lost += lost
        self.lag_counts[bisect.bisect_left(LAG_BUCKETS, lag_s)] += 1  # le: a lag equal to a bound is in it
        self.lag_sum += lag_s


class _IngestExport(Collector):
    def __init__(self, counts: IngestCounts) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        c = self.counts
        yield CounterMetricFamily("edgestream_audio_frames", "Audio frames received from clients.", value=c.frames)
        yield CounterMetricFamily("edgestream_audio_frames_lost", "Audio frames missing from what clients sent (gaps in the media clock).", value=c.lost)
        cumulative = list(itertools.accumulate(c.lag_counts))
        buckets = [(floatToGoString(le), n) for le, n in zip(LAG_BUCKETS, cumulative, strict=False)] + [("+Inf", cumulative[-1])]
        yield HistogramMetricFamily(
            "edgestream_ingest_lag_seconds",
            "How late each received audio frame reaches the turn detector, against the media clock of its session.",
            buckets=buckets,
            sum_value=c.lag_sum,
        )


class _LiveState(Collector):
    def __init__(self, pool: WorkerPool, sessions: Callable[[], Iterable[Session]]) -> None:
        self.pool = pool
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        sessions = list(self.sessions())
        yield GaugeMetricFamily("edgestream_sessions_open", "Sessions open now.", value=len(sessions))
        yield GaugeMetricFamily(
            "edgestream_answer_audio_queued_seconds", "Answer audio queued for playout, all sessions.", value=sum(s.answer_track.buffered_s for s in sessions)
        )
        labels = ["kind", "worker"]
        up = GaugeMetricFamily("edgestream_worker_up", "1 if the worker is in rotation.", labels=labels)
        rtt = GaugeMetricFamily("edgestream_worker_rtt_seconds", "Smoothed WebSocket ping RTT to the worker.", labels=labels)
        in_flight = GaugeMetricFamily("edgestream_worker_jobs_in_flight", "This gateway's jobs on the worker.", labels=labels)
        others = GaugeMetricFamily("edgestream_worker_jobs_others", "Other clients' jobs on the worker, from its load report.", labels=labels)
        for member in self.pool.members.values():
            e = member.estimate
            values = [member.kind.value, e.worker_id]
            up.add_metric(values, 1.0 if e.healthy else 0.0)
            if e.rtt.value is not None:
                rtt.add_metric(values, e.rtt.value)
            in_flight.add_metric(values, len(e.in_flight))
            others.add_metric(values, e.others_running)
        yield from (up, rtt, in_flight, others)
