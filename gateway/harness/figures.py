"""What every harness reports with: medians and percentiles, the machine, free ports, process memory, its working directory.

One home for these so that two benchmarks never compute "p95" two ways.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import statistics
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def percentile(values: Iterable[float], q: float, digits: int = 1) -> float:
    """The ``q``-quantile (0..1) of ``values``, nearest rank: a value that was measured, never interpolated."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], digits)


def median(values: Iterable[float], digits: int = 1) -> float:
    """The median, rounded; ``nan`` for no values (a benchmark row that measured nothing says so)."""
    values = list(values)
    return round(statistics.median(values), digits) if values else float("nan")


def machine() -> dict[str, Any]:
    """The box a figure was measured on: every benchmark's JSON carries it."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "date": datetime.now(UTC).isoformat(timespec="seconds")}


@contextlib.contextmanager
def work_dir(keep: Path | None, prefix: str) -> Iterator[Path]:
    """``keep`` (made if missing, left in place: a run's logs to read afterwards), or a temporary directory removed at the end."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def free_port() -> int:
    """A TCP port free on loopback now (another process may still take it before it is bound)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """The children of process ``pid`` (Linux ``/proc``; none when it is gone)."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (Linux ``/proc``; 0.0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
