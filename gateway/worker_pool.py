"""The gateway's workers: links to them, their health, and a lease per job.

Workers come from the config (static URLs) and from mDNS (``gateway/discovery.py``)
and may join and leave at any time. For each one the pool keeps a WebSocket
link (``wss://`` verified against ``[security] tls_ca``; with a worker key,
both ends prove it before any job: ``stream/protocol/auth.py``; reconnected with backoff; a link that keeps failing backs off longer, so
a flapping worker stays out of the way), pings it every ``ping_interval_s``
(the RTT feeds selection; a missed deadline means the worker is stalled: its
link is dropped, which fails its jobs over at once), and follows its load
reports.

A job holds a :class:`Lease` from :meth:`WorkerPool.lease` in an ``async
with``: the policy (``gateway/selection.py``) picks among the healthy workers
of the kind that serve the session's model and were not already tried for
this job. The lease reports the job's timing back (``observe``) and is given
back however the block ends: ``ok`` when it completes, ``failed`` when it
raises :class:`~stream.worker_client.JobFailed` (a :class:`Stalled` job also
drops the worker's link), ``cancelled`` when it is cancelled, so the
selection's estimate never keeps a phantom job in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from stream.backoff import Backoff
from stream.protocol import ErrorCode, WorkerKind
from stream.worker_client import JobFailed, WorkerClient
from stream.wyoming_client import WyomingClient

from .admission import WaitingLine
from .metrics import GatewayMetrics
from .selection import Job, LatencyAware, Policy, WorkerEstimate

log = logging.getLogger("edgestream.gateway")

ModelPin = tuple[str, str]
"""(model id, sha256): a session keeps one model per kind."""


WorkerLink = WorkerClient | WyomingClient


async def connect_worker(url: str, kind: WorkerKind, *, open_timeout: float, key: bytes | None, ssl_context: ssl.SSLContext | None) -> WorkerLink:
    """A link to the worker at ``url``: an edgestream worker (``ws://``, ``wss://``), or a Wyoming STT
    or TTS server (``tcp://``, through :class:`~stream.wyoming_client.WyomingClient`). Wyoming has no
    authentication or TLS: a ``tcp://`` entry in the config is the operator's choice to use one anyway."""
    if url.startswith("tcp://"):
        return await WyomingClient.connect(url, kind, open_timeout)
    return await WorkerClient.connect(url, kind, open_timeout, key=key, ssl_context=ssl_context)


NEVER_UP_WARN_S = 120.0
"""A worker never reached for this long is warned about (before that, it is probably loading its model)."""


class NoWorker(Exception):
    """No healthy worker of a kind (serving the session's model) is available."""

    def __init__(self, kind: WorkerKind, detail: str = "") -> None:
        super().__init__(f"no {kind.value} worker is available{detail}")
        self.kind = kind


@dataclass(frozen=True)
class PoolSettings:
    ping_interval_s: float = 0.5
    ping_timeout_s: float = 1.5
    """A worker that does not answer a ping within this is stalled: its link is dropped."""
    retry_min_s: float = 0.25
    retry_max_s: float = 8.0
    stable_after_s: float = 10.0
    """A link that lived this long resets the backoff; shorter ones count as flaps."""
    connect_timeout_s: float = 3.0
    max_waiting_jobs: int = 64
    """Jobs of one kind that may wait for a worker with room (``gateway/admission.py``)."""


class PooledWorker:
    """One worker URL: its link, kept alive, and its estimate."""

    def __init__(self, pool: WorkerPool, url: str, kind: WorkerKind, source: str, expect_model: ModelPin | None) -> None:
        self.pool = pool
        self.url = url
        self.kind = kind
        self.source = source
        self.expect_model = expect_model
        self.client: WorkerLink | None = None
        self.estimate = WorkerEstimate(worker_id=url, kind=kind, healthy=False)
        self.failures = 0
        self.problem = "not connected yet"
        self.ever_connected = False
        """Whether a link to it was ever up: before that, a refused dial is a worker still loading its model."""
        self.added_at = time.monotonic()
        self._told_unreachable = False
        self._task: asyncio.Task[None] | None = None

    @property
    def worker_id(self) -> str:
        return self.estimate.worker_id

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"worker link {self.url}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.client is not None:
            await self.client.close()

    async def _run(self) -> None:
        settings = self.pool.settings
        while True:
            connected_at = None
            try:
                self.client = await connect_worker(
                    self.url, self.kind, open_timeout=settings.connect_timeout_s, key=self.pool.key, ssl_context=self.pool.ssl_context
                )
                hello = self.client.hello
                if self.expect_model is not None and (hello.model_id, hello.model_sha256) != self.expect_model:
                    raise ValueError(f"serves {hello.model_id} {hello.model_sha256[:12]}, announced {self.expect_model[0]} {self.expect_model[1][:12]}")
                connected_at = time.monotonic()
                self.ever_connected = True
                self.estimate.worker_id = hello.worker_id
                self.estimate.capacity = hello.capacity
                self.estimate.model = (hello.model_id, hello.model_sha256)
                log.info("connected to %s worker %s at %s (%s)", self.kind.value, hello.worker_id, self.url, hello.model_id)
                await self._heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # refused, unreachable, wrong kind or model, stalled
                self.problem = str(exc) or type(exc).__name__
            finally:
                self.estimate.healthy = False
                if self.client is not None:
                    self.client.abort()
            if connected_at is not None and time.monotonic() - connected_at >= settings.stable_after_s:
                self.failures = 0
            self.failures += 1
            delay = Backoff(settings.retry_min_s, settings.retry_max_s, jitter=0.0).delay(self.failures)
            level = self._level_of_failure(connected_at is not None)
            log.log(level, "%s worker %s out of rotation: %s; retry in %.2g s", self.kind.value, self.url, self.problem, delay)
            await asyncio.sleep(delay)

    def _level_of_failure(self, was_connected: bool) -> int:
        """A lost link is a warning, and so is the first failed dial after it; a worker that was
        never up is probably loading its model (tens of seconds): said once, at warning level,
        only if it is still not there after ``NEVER_UP_WARN_S``."""
        if was_connected or (self.ever_connected and self.failures == 1):
            return logging.WARNING
        if not self.ever_connected and not self._told_unreachable and time.monotonic() - self.added_at >= NEVER_UP_WARN_S:
            self._told_unreachable = True
            return logging.WARNING
        return logging.DEBUG

    @property
    def state(self) -> str:
        """``ready``; ``starting`` (never connected yet: loading its model); ``down`` (was up, now away)."""
        if self.estimate.healthy:
            return "ready"
        return "down" if self.ever_connected else "starting"

    async def _heartbeat(self) -> None:
        """Ping until the link is lost or a pong misses its deadline."""
        assert self.client is not None
        settings = self.pool.settings
        client = self.client
        while not client.closed:
            try:
                latency = await asyncio.wait_for(client.ping(), settings.ping_timeout_s)
            except TimeoutError:
                raise TimeoutError(f"no pong within {settings.ping_timeout_s:g} s (stalled)") from None
            except Exception as exc:  # the connection went away
                raise ConnectionError(f"link lost: {exc}") from None
            self.estimate.rtt.observe(latency, self.pool.clock())
            if client.load is not None:  # other clients' jobs, as of the last report
                load = client.load
                self.estimate.others_running = max(0, load.running + load.queued - load.own_jobs)
            if not self.estimate.healthy:
                self.estimate.healthy = True
                self.problem = ""
            await asyncio.sleep(settings.ping_interval_s)
        raise ConnectionError("link lost")

    def snapshot(self) -> dict[str, object]:
        e = self.estimate
        return {
            "url": self.url,
            "kind": self.kind.value,
            "worker_id": e.worker_id,
            "source": self.source,
            "healthy": e.healthy,
            "problem": self.problem or None,
            "model": e.model[0] or None,
            "rtt_ms": None if e.rtt.value is None else round(e.rtt.value * 1000, 2),
            "ms_per_unit": None if e.seconds_per_unit.value is None else round(e.seconds_per_unit.value * 1000, 3),
            "in_flight": len(e.in_flight),
            "capacity": e.capacity,
            "jobs": e.jobs,
        }


class Stalled(JobFailed):
    """The worker gave a job no output within its deadline (``gateway/failover.py``)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INTERNAL, message)


class Lease:
    """One job's hold on one worker; an async context manager that gives it back on every path."""

    _ids = itertools.count(1)

    def __init__(self, pool: WorkerPool, member: PooledWorker, job: Job) -> None:
        assert member.client is not None
        self.id = next(self._ids)
        self.pool = pool
        self.member = member
        self.client: WorkerLink = member.client
        self.size = job.size_on(member.worker_id)
        self.worker_id = member.worker_id
        self.model = member.estimate.model
        member.estimate.in_flight[self.id] = (self.size, pool.clock())
        member.estimate.jobs += 1
        self._open = True

    @property
    def jobs_on_worker(self) -> int:
        """This gateway's jobs on the worker, this one included."""
        return len(self.member.estimate.in_flight)

    @property
    def capacity(self) -> int:
        return self.member.estimate.capacity

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self.release()
        elif isinstance(exc, JobFailed) and exc.code is ErrorCode.BUSY:
            self.release("busy", frees_slot=False)  # it never ran: no slot came free for whoever waits
        elif isinstance(exc, JobFailed):
            self.fail(str(exc), stalled=isinstance(exc, Stalled))
        elif isinstance(exc, asyncio.CancelledError):
            self.release("cancelled")
        else:
            self.release("error")

    def observe(self, seconds: float) -> None:
        """The job's measured latency (input complete to first useful output), for the worker's estimate."""
        estimate = self.member.estimate
        compute = max(seconds - (estimate.rtt.value or 0.0), 1e-4)
        estimate.seconds_per_unit.observe(compute / self.size, self.pool.clock())

    def release(self, outcome: str = "ok", *, frees_slot: bool = True) -> None:
        """Give the worker back; a job that ran (``frees_slot``) wakes the longest waiting of its kind."""
        if self._open:
            self._open = False
            self.member.estimate.in_flight.pop(self.id, None)
            self.pool.metrics.jobs.labels(self.member.kind.value, self.worker_id, outcome).inc()
            if frees_slot:
                self.pool.waiting[self.member.kind].freed()

    def fail(self, reason: str, *, stalled: bool = False) -> None:
        """The worker failed this job; a ``stalled`` one also loses its link (and leaves the rotation until it is back).
        A lease already released (the job was skipped) has nothing left to fail."""
        if not self._open:
            return
        self.release("failed")
        log.warning("%s worker %s failed a job: %s", self.member.kind.value, self.worker_id, reason)
        if stalled and self.client is self.member.client and not self.client.closed:
            self.client.abort()  # its other jobs fail over too; the link task reconnects


class WorkerPool:
    """All workers the gateway knows, by URL."""

    def __init__(
        self,
        urls: dict[WorkerKind, list[str]] | None = None,
        policy: Policy | None = None,
        settings: PoolSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: GatewayMetrics | None = None,
        *,
        key: bytes | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.key = key
        """The key workers must prove they hold (and this gateway proves to them); ``None``: no authentication."""
        self.ssl_context = ssl_context
        """Verifies ``wss://`` workers' certificates."""
        self.policy: Policy = policy or LatencyAware()
        self.metrics = metrics or GatewayMetrics()
        self.settings = settings or PoolSettings()
        self.clock = clock
        self.members: dict[str, PooledWorker] = {}
        self.waiting = {kind: WaitingLine(self.settings.max_waiting_jobs) for kind in WorkerKind}
        """Jobs refused as ``busy``, by kind: a job of that kind that ends here wakes the longest waiting."""
        self._flaps: dict[str, int] = {}
        """Backoff of workers that left, kept so that one that keeps coming and going stays damped."""
        self._started = False
        for kind, kind_urls in (urls or {}).items():
            for url in kind_urls:
                self.add(url, kind, source="config")

    def add(self, url: str, kind: WorkerKind, source: str = "config", expect_model: ModelPin | None = None) -> None:
        """Start following a worker (a URL already known is left as it is)."""
        if url in self.members:
            return
        member = PooledWorker(self, url, kind, source, expect_model)
        member.failures = self._flaps.get(url, 0)
        self.members[url] = member
        if self._started:
            member.start()

    async def remove(self, url: str) -> None:
        """Stop using a worker (it left); its jobs fail over."""
        member = self.members.pop(url, None)
        if member is not None:
            log.info("%s worker %s left", member.kind.value, url)
            self._flaps[url] = member.failures + 1
            await member.close()

    def start(self) -> None:
        self._started = True
        for member in self.members.values():
            member.start()

    async def close(self) -> None:
        for member in list(self.members.values()):
            await member.close()

    def estimates(self) -> list[WorkerEstimate]:
        return [m.estimate for m in self.members.values()]

    def available(self, kind: WorkerKind) -> bool:
        return any(m.kind is kind and m.estimate.healthy for m in self.members.values())

    def state(self, kind: WorkerKind) -> str:
        """The best state of ``kind``'s workers: ``ready``, ``starting``, ``down``, or ``none`` (no worker known)."""
        states = {m.state for m in self.members.values() if m.kind is kind}
        return next((s for s in ("ready", "starting", "down") if s in states), "none")

    def acquire(self, job: Job, *, model: ModelPin | None = None, exclude: frozenset[str] = frozenset()) -> Lease:
        """A lease on the worker the policy picks for ``job``; :class:`NoWorker` if none qualifies."""
        usable = self._usable(job.kind, model, exclude)
        if not usable:
            detail = f" with model {model[0]}" if model is not None and self.available(job.kind) else ""
            raise NoWorker(job.kind, detail)
        chosen = self.policy.choose(job, [m.estimate for m in usable.values()], self.clock())
        self.metrics.decisions.labels(job.kind.value, chosen.worker_id, self.policy.name, "retry" if exclude else "first").inc()
        return Lease(self, usable[chosen.worker_id], job)

    def lease(self, job: Job, *, model: ModelPin | None = None, exclude: frozenset[str] = frozenset()) -> Lease:
        """:meth:`acquire`, for use as ``async with pool.lease(job) as lease:``."""
        return self.acquire(job, model=model, exclude=exclude)

    def has_worker(self, kind: WorkerKind, *, model: ModelPin | None = None, exclude: frozenset[str] = frozenset()) -> bool:
        """Whether :meth:`acquire` would find a worker now (a job may move only if one is there)."""
        return bool(self._usable(kind, model, exclude))

    def _usable(self, kind: WorkerKind, model: ModelPin | None, exclude: frozenset[str]) -> dict[str, PooledWorker]:
        return {
            m.worker_id: m
            for m in self.members.values()
            if m.kind is kind
            and m.estimate.healthy
            and m.client is not None
            and not m.client.closed
            and m.worker_id not in exclude
            and (model is None or m.estimate.model == model)
        }

    def snapshot(self) -> list[dict[str, object]]:
        return [m.snapshot() for m in self.members.values()]

    async def wait_ready(self, kinds: list[WorkerKind], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            for kind in kinds:
                # Availability follows link events of every member: a 50 ms poll under the deadline is the plain reading.
                while not self.available(kind):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
