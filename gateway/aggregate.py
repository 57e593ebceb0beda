"""One gateway's health and metrics from the reports of its processes (policy, no I/O).

A gateway of several processes (``gateway/processes.py``) answers
``/healthz``, ``/readyz`` and ``/metrics`` for the whole gateway from
whichever process took the request: that process gathers every process's
report through the supervisor and merges them here.

Metrics: samples with the same name and labels are added up (counters,
histogram buckets, sessions open, jobs in flight), except the per-worker
gauges in :data:`MERGED_BY`, which say something about the worker and not
about how many processes look at it. ``per_process`` keeps each process's
samples apart instead, with a ``process`` label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

MERGED_BY: dict[str, Callable[[float, float], float]] = {
    "edgestream_worker_up": max,  # in rotation for some process: the worker is up
    "edgestream_worker_rtt_seconds": max,  # the slowest link any process has to it
    "edgestream_worker_jobs_others": min,  # each process counts its siblings' jobs as others'
}
STATE_ORDER = ("ready", "starting", "down", "none")
"""A kind's state for the whole gateway is the worst of its processes' (a session may land in any)."""


def merge_metrics(texts: Mapping[int, str], per_process: bool = False) -> bytes:
    """Prometheus text from each process's exposition (``texts`` by process index) as one."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for index, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            merge = MERGED_BY.get(family.name, _add)
            samples = values[family.name]
            for sample in family.samples:
                if sample.name.endswith("_created"):  # when each process made it: not a figure of the gateway
                    continue
                labels = {**sample.labels, "process": str(index)} if per_process else sample.labels
                key = (sample.name, tuple(sorted(labels.items())))
                samples[key] = merge(samples[key], sample.value) if key in samples else sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry()
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


def _add(a: float, b: float) -> float:
    return a + b


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_health(reports: list[dict[str, Any]], expected: int) -> dict[str, Any]:
    """``/healthz`` for the whole gateway from each process's own (``expected``: processes it should have).

    Sessions add up; a kind is available where every process has a worker of
    it in rotation, and its state is the worst of the processes'.
    """
    kinds = list(reports[0]["workers"]) if reports else []
    return {
        "ok": True,
        "sessions": sum(r["sessions"] for r in reports),
        "workers": {kind: all(r["workers"][kind] for r in reports) for kind in kinds},
        "states": {kind: max((r["states"][kind] for r in reports), key=STATE_ORDER.index) for kind in kinds},
        "required": reports[0]["required"] if reports else [],
        "pool": merge_pool([r["pool"] for r in reports]),
        "processes": [{"process": r["process"], "pid": r["pid"], "sessions": r["sessions"]} for r in reports],
        "processes_expected": expected,
        "closing": any(r.get("closing") for r in reports),
    }


def merge_pool(pools: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The workers as the whole gateway sees them, from each process's ``pool`` rows.

    Jobs in flight and jobs run add up (each process runs its own sessions' jobs);
    a worker is healthy where every process sees it healthy (a session may land in
    any); latency figures are the slowest any process measured.
    """
    merged: dict[str, dict[str, Any]] = {}
    for pool in pools:
        for row in pool:
            seen = merged.get(row["url"])
            if seen is None:
                merged[row["url"]] = {**row, "processes": 1}
                continue
            seen["processes"] += 1
            seen["healthy"] = seen["healthy"] and row["healthy"]
            seen["problem"] = seen["problem"] or row["problem"]
            seen["in_flight"] += row["in_flight"]
            seen["jobs"] += row["jobs"]
            for figure in ("rtt_ms", "ms_per_unit"):
                seen[figure] = max((v for v in (seen[figure], row[figure]) if v is not None), default=None)
    for row in merged.values():  # a worker that some process has not found yet is not in every session's reach
        row["healthy"] = row["healthy"] and row["processes"] == len(pools)
    return list(merged.values())


def missing_for_ready(health: dict[str, Any]) -> list[str]:
    """What keeps the gateway from being ready (``/readyz``): required kinds without a worker, processes not up."""
    missing = [kind for kind in health["required"] if not health["workers"].get(kind)]
    absent = health["processes_expected"] - len(health["processes"])
    if absent > 0:
        missing.append(f"{absent} gateway process{'es' if absent > 1 else ''} starting")
    if health["closing"]:
        missing.append("shutting_down")
    return missing
