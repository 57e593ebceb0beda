"""A worker's Prometheus metrics (prometheus-client), served at ``GET /metrics``.

Each :class:`WorkerServer` has its own registry, so several workers in one
process (as in the tests) never share counters. Counters and histograms are
updated as jobs run; the gauges (jobs running and queued, connections,
service rate) are read from the server when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .server import WorkerServer

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class WorkerMetrics:
    def __init__(self, server: WorkerServer) -> None:
        self.registry = CollectorRegistry()
        kind = server.kind.value
        self.jobs = Counter(
            "edgestream_worker_jobs", "Jobs that ended, by outcome (complete, cancelled, failed, refused).", ["kind", "outcome"], registry=self.registry
        )
        self.errors = Counter("edgestream_worker_errors", "Protocol errors sent to clients, by code.", ["kind", "code"], registry=self.registry)
        # One worker serves one kind: the histograms' label is bound once.
        self.queued_seconds = Histogram(
            "edgestream_worker_queue_seconds", "Time a job waited for a free slot.", ["kind"], buckets=SECONDS_BUCKETS, registry=self.registry
        ).labels(kind)
        self.compute_seconds = Histogram(
            "edgestream_worker_compute_seconds", "Model compute time of a finished job.", ["kind"], buckets=SECONDS_BUCKETS, registry=self.registry
        ).labels(kind)
        self.first_output_seconds = Histogram(
            "edgestream_worker_first_output_seconds",
            "From job.start to the job's first result or audio frame (LLM first token, TTS first audio).",
            ["kind"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        ).labels(kind)
        self.registry.register(_LiveState(server))
        self.kind = kind

    def job_ended(self, outcome: str) -> None:
        self.jobs.labels(self.kind, outcome).inc()

    def error_sent(self, code: str) -> None:
        self.errors.labels(self.kind, code).inc()


class _LiveState(Collector):
    """Gauges read from the server at scrape time."""

    def __init__(self, server: WorkerServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        s = self.server
        labels = ["kind", "worker"]
        values = [s.kind.value, s.worker_id]
        info = InfoMetricFamily("edgestream_worker", "The worker and its model.", labels=labels)
        info.add_metric(values, {"model": s.engine.model.model_id, "sha256": s.engine.model.sha256})
        yield info
        for name, doc, value in (
            ("edgestream_worker_jobs_running", "Jobs running now.", s.running),
            ("edgestream_worker_jobs_queued", "Jobs waiting for a slot (queue depth).", s.queued),
            ("edgestream_worker_capacity", "Jobs run at once.", s.capacity),
            ("edgestream_worker_connections", "Client connections (gateways, probes).", len(s.sessions)),
            ("edgestream_worker_service_rate", f"Measured work units ({s.engine.rate_unit}) per compute second.", s.rate.value),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            gauge.add_metric(values, value)
            yield gauge
