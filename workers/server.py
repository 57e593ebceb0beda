"""The worker's asyncio shell: WebSocket server, job admission, load reports.

Everything protocol-shaped is decided by :class:`stream.protocol.Connection`;
this module moves frames between it, the socket and the engine, and keeps the
worker's shared state (capacity, service rate) across connections.

The same port answers plain HTTP: ``GET /healthz`` (the process is up),
``GET /readyz`` (200 while it takes another job, 503 when full) and ``GET
/metrics`` (Prometheus, ``workers/metrics.py``). Any other path is the worker
protocol's WebSocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import websockets
from pydantic import ValidationError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from stream import __version__, logs
from stream.http import get_and_head_only, json_response, metrics_response, readiness_response
from stream.memory import IdleTrim
from stream.protocol import (
    DEFAULT_LIMITS,
    Auth,
    Connection,
    Error,
    ErrorCode,
    Hello,
    JobCancel,
    JobDone,
    JobEnd,
    JobFlush,
    JobResult,
    JobStart,
    JobText,
    Limits,
    LoadReport,
    LoadRequest,
    MediaFormat,
    MediaFrame,
    Message,
    ProtocolError,
    Role,
)
from stream.protocol.auth import new_nonce
from stream.protocol.jobs import PARAMS_BY_KIND

from .engine import Engine
from .job import FlushInput, Job, JobCancelled, TextInput
from .metrics import WorkerMetrics
from .service_rate import ServiceRate

log = logging.getLogger("edgestream.worker")

CLOSE_S = 15.0
"""How long closing the server may wait for its connections (the closing handshake takes up to 10 s)."""
AUTH_TIMEOUT_S = 10.0
"""A client of a worker with a key must prove it within this, or is disconnected."""


class WorkerServer:
    """Serves one engine to any number of client connections."""

    def __init__(
        self,
        engine: Engine,
        *,
        capacity: int,
        max_queue: int = 0,
        worker_id: str = "",
        report_interval_s: float = 1.0,
        limits: Limits = DEFAULT_LIMITS,
        key: bytes | None = None,
        idle_input_s: float | None = None,
    ) -> None:
        self.engine = engine
        self.idle_input_s = idle_input_s
        """A job waiting longer than this for its next input fails with ``limit`` (``None``: no cap)."""
        self.key = key
        """The key shared with gateways: with it, only a client that proves it may run jobs."""
        self.kind = engine.kind
        self.capacity = capacity
        self.max_queue = max_queue
        self.worker_id = worker_id
        self.report_interval_s = report_interval_s
        self.limits = limits
        self.rate = ServiceRate()
        self.running = 0
        self._idle_trim = IdleTrim()
        self.queued = 0
        self.jobs_completed = 0
        self.jobs_cancelled = 0
        self.sessions: set[WorkerSession] = set()
        self._slots = asyncio.Semaphore(capacity)
        self._server: Server | None = None
        self.metrics = WorkerMetrics(self)
        logs.install()

    # -- lifecycle ------------------------------------------------------------

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen on ``host:port`` (0 picks a free port), over TLS with ``ssl_context``; return the bound port."""
        self._server = await serve(
            self._handle,
            host,
            port,
            process_request=get_and_head_only(self._http),
            # One limit above the protocol's own, so that an oversized text
            # message gets a protocol error and only a truly huge frame makes
            # websockets close the connection (code 1009).
            max_size=max(self.limits.max_frame_bytes, self.limits.max_text_bytes),
            max_queue=64,
            compression=None,  # PCM barely compresses; see stream/worker_client.py
            ping_interval=5,
            ping_timeout=15,
            ssl=ssl_context,
        )
        bound = self._server.sockets[0].getsockname()[1]
        if not self.worker_id:
            self.worker_id = f"{self.kind.value}@{host}:{bound}"
        return bound

    async def close(self) -> None:
        """Stop listening and close every connection (their jobs are abandoned), within ``CLOSE_S``."""
        if self._server is not None:
            self._server.close()
            try:
                async with asyncio.timeout(CLOSE_S):
                    await self._server.wait_closed()
            except TimeoutError:
                log.warning("%s: connections still open %g s after close; going on without them", self.worker_id, CLOSE_S)
        await self._idle_trim.close()

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    # -- HTTP -------------------------------------------------------------------

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/metrics":
            return metrics_response(self.metrics.registry)
        if path in ("/healthz", "/readyz"):
            state = {
                "worker_id": self.worker_id,
                "kind": self.kind.value,
                "model": self.engine.model.model_id,
                "load": self.load_report().model_dump(exclude={"v", "type", "own_jobs"}),
            }
            if path == "/healthz":
                return json_response({"ok": True, **state})
            # Not ready while full: another job would be refused with ``busy``.
            missing = [] if self.admits_another() else ["capacity"]
            return readiness_response(missing, state)
        return None  # the worker protocol's WebSocket handshake goes on

    # -- shared state -----------------------------------------------------------

    def hello(self, challenge: str | None = None) -> Hello:
        return Hello(
            worker_id=self.worker_id,
            kind=self.kind,
            model_id=self.engine.model.model_id,
            model_sha256=self.engine.model.sha256,
            capacity=self.capacity,
            software=f"edgestream/{__version__}",
            max_text_bytes=self.limits.max_text_bytes,
            max_frame_bytes=self.limits.max_frame_bytes,
            challenge=challenge,
        )

    def load_report(self, own_jobs: int = 0) -> LoadReport:
        return LoadReport(
            running=self.running,
            queued=self.queued,
            capacity=self.capacity,
            service_rate=round(self.rate.value, 6),
            rate_unit=self.engine.rate_unit,
            jobs_completed=self.jobs_completed,
            own_jobs=own_jobs,
        )

    def admits_another(self) -> bool:
        return self.running + self.queued < self.capacity + self.max_queue

    def unqueue(self, job: Job) -> None:
        """The admitted ``job`` no longer waits (it runs, or it is over); safe to call twice."""
        if job.waiting:
            job.waiting = False
            self.queued -= 1

    def admit(self) -> bool:
        """Take one more job if it fits (``capacity`` running plus ``max_queue`` waiting), counted at once
        as waiting: two ``job.start`` in a row can never both take the last place."""
        if not self.admits_another():
            return False
        self.queued += 1
        return True

    async def _handle(self, websocket: ServerConnection) -> None:
        session = WorkerSession(self, websocket)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)

    async def run_job(self, job: Job) -> None:
        """Wait for a slot, run the job on the engine, account for it (the job was :meth:`admit`-ted)."""
        since = time.perf_counter()
        try:
            async with self._slots:
                self.unqueue(job)
                job.stats["queued_s"] = round(time.perf_counter() - since, 4)
                self.metrics.queued_seconds.observe(job.stats["queued_s"])
                self.running += 1
                try:
                    await self.engine.run(job)
                finally:
                    self.running -= 1
            self.jobs_completed += 1
        finally:
            self.unqueue(job)
            if self.running == 0 and self.queued == 0:
                self._idle_trim.soon(self.engine.settled)  # what the jobs' buffers held goes back, once their threads are done
            if job.work_units > 0:  # a cancelled job did work too (an STT job after its flush)
                self.rate.observe(job.work_units, job.compute_s)
                self.metrics.compute_seconds.observe(job.compute_s)


class WorkerSession:
    """One client connection: the receive loop and the jobs it started."""

    def __init__(self, server: WorkerServer, websocket: ServerConnection) -> None:
        self.server = server
        self.websocket = websocket
        self.protocol = Connection(Role.WORKER, server.kind, server.limits, key=server.key)
        self.jobs: dict[int, tuple[Job, asyncio.Task[None]]] = {}
        self.peer = logs.peer_label(websocket.remote_address)

    async def run(self) -> None:
        reporter: asyncio.Task[None] | None = None
        try:
            await self._send(self.server.hello(challenge=new_nonce() if self.server.key else None))
            if not self.protocol.authenticated and not await self._authenticate():
                return
            reporter = asyncio.create_task(self._report_load_periodically())
            async for data in self.websocket:
                await self._receive(data)
        except websockets.ConnectionClosed:
            pass
        finally:
            if reporter is not None:
                reporter.cancel()
            await self._abandon_jobs()

    async def _authenticate(self) -> bool:
        """Take the client's ``auth`` and answer ``auth.ok``; refuse and close on anything else."""
        try:
            async with asyncio.timeout(AUTH_TIMEOUT_S):
                data = await self.websocket.recv()
            message = self.protocol.receive_text(data) if isinstance(data, str) else self.protocol.receive_binary(data)
            if not isinstance(message, Auth):
                raise ProtocolError(ErrorCode.UNAUTHORIZED, "this worker needs proof of the key first")
        except TimeoutError:
            await self._reject(ProtocolError(ErrorCode.UNAUTHORIZED, f"no auth within {AUTH_TIMEOUT_S:g} s"))
            return False
        except ProtocolError as exc:
            await self._reject(exc)
            return False
        await self._send(self.protocol.auth_ok())
        log.info("%s %s: client authenticated", self.server.worker_id, self.peer)
        return True

    async def _reject(self, exc: ProtocolError) -> None:
        """Refuse an unauthenticated client: one error, then the connection closes."""
        log.warning("%s %s: refused before auth: %s", self.server.worker_id, self.peer, exc)
        self.server.metrics.error_sent(exc.code.value)
        with contextlib.suppress(websockets.ConnectionClosed):
            await self._send(self.protocol.error_for(exc))
            await self.websocket.close(1008, exc.code.value)

    async def _receive(self, data: str | bytes) -> None:
        try:
            if isinstance(data, str):
                message = self.protocol.receive_text(data)
                if message is not None:
                    await self._dispatch(message)
            else:
                frame = self.protocol.receive_binary(data)
                if frame is not None:
                    await self._feed(frame.job_id, frame)
        except ProtocolError as exc:
            await self._refuse(exc)

    async def _dispatch(self, message: Message) -> None:
        if isinstance(message, JobStart):
            self._start(message)
        elif isinstance(message, JobText):
            await self._feed(message.job_id, TextInput(message.text))
        elif isinstance(message, JobFlush):
            await self._feed(message.job_id, FlushInput())
        elif isinstance(message, JobEnd):
            await self._feed(message.job_id, None)
        elif isinstance(message, JobCancel):
            await self._cancel(message.job_id)
        elif isinstance(message, LoadRequest):
            await self._send(self.server.load_report(own_jobs=len(self.jobs)))
        elif isinstance(message, Error):
            log.warning("%s %s: client reported %s: %s", self.server.worker_id, self.peer, message.code.value, message.message)

    def _start(self, message: JobStart) -> None:
        job_id = message.job_id
        try:
            params = PARAMS_BY_KIND[self.server.kind].model_validate(message.params)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "params"
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"params.{where}: {first['msg']}", job_id) from None
        if not self.server.admit():
            raise ProtocolError(
                ErrorCode.BUSY,
                f"worker at capacity ({self.server.running} running, {self.server.queued} queued)",
                job_id,
            )
        first_output = self._first_output_timer()
        job = Job(
            job_id,
            params,
            self._result_sender(job_id, first_output),
            self._audio_sender(job_id, first_output),
            trace=message.trace,
            idle_input_s=self.server.idle_input_s,
        )
        # The job's task, and so every log line about it, carries the gateway's turn id.
        with logs.bound(turn=message.trace, job=f"{self.server.kind.value}/{job_id}"):
            task = asyncio.create_task(self._run_job(job), name=f"job-{self.server.kind.value}-{job_id}")
            # A task cancelled before it ever ran never enters run_job: give its place back here.
            task.add_done_callback(lambda _: self.server.unqueue(job))
            log.info("%s %s: job %d started", self.server.worker_id, self.peer, job_id)
        self.jobs[job_id] = (job, task)

    async def _run_job(self, job: Job) -> None:
        try:
            await self.server.run_job(job)
        except JobCancelled:
            return  # _cancel confirms it to the client
        except ProtocolError as exc:
            exc.job_id = job.job_id  # raised while running the job: it is this job's error
            await self._refuse(exc)
            return
        except Exception as exc:
            log.exception("%s %s: job %d failed", self.server.worker_id, self.peer, job.job_id)
            self.server.metrics.job_ended("failed")
            await self._finish(Error(code=ErrorCode.INTERNAL, message=f"{type(exc).__name__}: {exc}"[:1024], job_id=job.job_id))
            return
        finally:
            self.jobs.pop(job.job_id, None)
        job.stats.update(compute_s=round(job.compute_s, 4), work=round(job.work_units, 4))
        self.server.metrics.job_ended("complete")
        log.info("%s %s: job %d complete (%.1f ms compute) %s", self.server.worker_id, self.peer, job.job_id, job.compute_s * 1000, job.stats)
        await self._finish(JobDone(job_id=job.job_id, reason="complete", stats=job.stats))

    async def _feed(self, job_id: int, item: TextInput | FlushInput | MediaFrame | None) -> None:
        entry = self.jobs.get(job_id)
        if entry is None:
            return
        job = entry[0]
        if isinstance(item, TextInput):
            job.count_text(len(item.text), self.server.engine.max_text_chars)  # refused as it arrives, never queued first
        try:
            job.inputs.put_nowait(item)
        except asyncio.QueueFull:
            # Never wait here: this loop reads every job's messages, and one job
            # that does not keep up must not stop the others (or its own job.end).
            raise ProtocolError(ErrorCode.BUSY, f"the job fell {job.inputs.maxsize} inputs behind; the worker is not keeping up", job_id) from None

    async def _cancel(self, job_id: int) -> None:
        """Stop the job, wait for it to unwind (at its next await), then confirm."""
        entry = self.jobs.get(job_id)
        if entry is None:
            return  # finished meanwhile: its job.done is on the way
        job, task = entry
        job.cancel_event.set()  # model loops in threads stop at their next step
        task.cancel()
        await asyncio.wait([task])
        self.server.jobs_cancelled += 1
        self.server.metrics.job_ended("cancelled")
        await self._finish(JobDone(job_id=job_id, reason="cancelled", stats=job.stats))
        with logs.bound(turn=job.trace, job=f"{self.server.kind.value}/{job_id}"):
            log.info("%s %s: job %d cancelled", self.server.worker_id, self.peer, job_id)

    async def _refuse(self, exc: ProtocolError) -> None:
        """Answer a refused message; a refusal that names a running job ends it."""
        log.warning("%s %s: refused: %s", self.server.worker_id, self.peer, exc)
        self.server.metrics.error_sent(exc.code.value)
        entry = self.jobs.pop(exc.job_id, None) if exc.job_id is not None else None
        if entry is not None:
            self.server.metrics.job_ended("refused")
            if entry[1] is not asyncio.current_task():
                entry[0].cancel_event.set()
                entry[1].cancel()
        await self._finish(self.protocol.error_for(exc))

    async def _abandon_jobs(self) -> None:
        """The client is gone: stop its jobs and free their slots."""
        tasks = [task for _, task in self.jobs.values()]
        for job, task in self.jobs.values():
            job.cancel_event.set()
            task.cancel()
        self.jobs.clear()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
            log.info("%s %s: connection closed, %d job(s) abandoned", self.server.worker_id, self.peer, len(tasks))

    # -- sending -------------------------------------------------------------

    def _first_output_timer(self) -> Callable[[], None]:
        """Call on each output of a job: the first one observes the time since the job started."""
        started: float | None = time.perf_counter()

        def output() -> None:
            nonlocal started
            if started is not None:
                self.server.metrics.first_output_seconds.observe(time.perf_counter() - started)
                started = None

        return output

    def _result_sender(self, job_id: int, first_output: Callable[[], None]):
        seq = 0

        async def send_result(data: dict[str, Any]) -> None:
            nonlocal seq
            first_output()
            await self._send(JobResult(job_id=job_id, seq=seq, data=data))
            seq += 1

        return send_result

    def _audio_sender(self, job_id: int, first_output: Callable[[], None]):
        seq = 0

        async def send_audio(pcm: bytes, sample_rate: int) -> None:
            nonlocal seq
            first_output()
            frame = MediaFrame(job_id, seq, MediaFormat.PCM_S16LE, pcm, channels=1, sample_rate=sample_rate)
            await self._send_bytes(self.protocol.send_frame(frame))
            seq += 1

        return send_audio

    async def _finish(self, message: JobDone | Error) -> None:
        """Send a job's last message, unless the job already ended (refused meanwhile)."""
        if (message.job_id is not None and message.job_id in self.protocol.jobs) or isinstance(message, Error):
            with contextlib.suppress(websockets.ConnectionClosed):
                await self._send(message)

    async def _send(self, message: Message) -> None:
        await self.websocket.send(self.protocol.send(message))

    async def _send_bytes(self, data: bytes) -> None:
        await self.websocket.send(data)

    async def _report_load_periodically(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                await asyncio.sleep(self.server.report_interval_s)
                await self._send(self.server.load_report(own_jobs=len(self.jobs)))
