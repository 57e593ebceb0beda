"""One job of a conversation on one worker: the lease, the inputs out, the events back, the deadline.

The runner (``gateway/runner.py``) makes a :class:`WorkerJob` for each
``StartJob`` the conversation gives; it is the one place where a job meets
the network, and it is the same for every kind:

- The worker is a :class:`~gateway.worker_pool.Lease` held in ``async
  with``: given back when the job completes, fails or is cancelled (by the
  conversation, or because the session closes).
- Inputs are queued in an outbox and sent in order by the job's own task, so
  the media loop that produced them never waits on a worker's link. The
  outbox is bounded (``OUTBOX_ITEMS``); a link that falls that far behind
  fails the job, which the conversation then moves (STT replays the audio it
  kept, so nothing is lost).
- Results come back as the conversation's inputs (``Transcript``, ``Token``,
  ``Speech``, ``PieceSpoken``, ``Seen``), then ``JobFinished``, or one
  ``JobFailed`` for any way the job can end badly: no worker to lease, the
  worker's error, a lost link, a stall.
- The deadline is :class:`gateway.failover.Watchdog`, fed here with what the
  job owes (:func:`owes_after`) and what it gives (:func:`settles`): a job
  overdue while another worker could take it is given up as stalled, which
  also drops that worker's link (its other jobs move too).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

import numpy as np
from pydantic import ValidationError

from stream import logs
from stream.protocol import ErrorCode, JobResult, MediaFrame, WorkerKind
from stream.protocol.jobs import STT_SAMPLE_RATE, LlmResult, SttResult, TtsResult, VisionResult
from stream.worker_client import JobFailed as JobError
from stream.worker_client import JobHandle

from .conversation import commands as cmd
from .conversation.inputs import (
    NO_WORKER,
    JobEvent,
    JobFailed,
    JobFinished,
    JobStarted,
    PieceSpoken,
    Seen,
    Speech,
    Token,
    Transcript,
)
from .failover import Watchdog
from .worker_pool import Lease, NoWorker, Stalled, WorkerPool

log = logging.getLogger("edgestream.gateway")

OUTBOX_ITEMS = 1024
"""Inputs queued for one job. Worst case: 1024 chunks of 32 ms of audio, 33 s and 1 MB
(more than a whole utterance: ``max_utterance_s`` is 30 s)."""
REPLAY_FRAME_SAMPLES = STT_SAMPLE_RATE
"""An STT replay goes out in frames of 1 s, not as one frame of the whole utterance."""
CANCEL_TIMEOUT_S = 1.0
"""How long a cancelled job may take to tell its worker (a stalled link is not waited for)."""


def owes_after(kind: WorkerKind, command: cmd.JobCommand) -> bool:
    """Whether a job of ``kind`` owes output once ``command`` has been sent."""
    if kind is WorkerKind.STT:
        return isinstance(command, cmd.FlushInput | cmd.EndInput)
    if kind is WorkerKind.TTS:
        return isinstance(command, cmd.SendText)
    return isinstance(command, cmd.EndInput)  # LLM, vision: the job has all it needs


def settles(event: JobEvent, texts_sent: int, texts_spoken: int) -> bool:
    """Whether ``event`` pays what the job owed (otherwise it is progress)."""
    if isinstance(event, Transcript):
        return event.final or event.flushed
    if isinstance(event, PieceSpoken):
        return texts_spoken >= texts_sent
    return isinstance(event, Seen)


class WorkerJob:
    """Runs one ``StartJob`` to its end; ``report`` gets everything that happens to it."""

    def __init__(self, start: cmd.StartJob, pool: WorkerPool, deadline_s: float, report: Callable[[JobEvent], None]) -> None:
        self.start = start
        self.ref = start.job
        self.pool = pool
        self.report = report
        self.watchdog = Watchdog(deadline_s)
        self.worker: str | None = None
        self._outbox: collections.deque[cmd.JobCommand] = collections.deque()
        self._queued = asyncio.Event()
        self._overflowed = False
        self._cancelled = False
        self._timeout: asyncio.Timeout | None = None
        self._texts_sent = 0
        self._texts_spoken = 0
        self._loop = asyncio.get_running_loop()
        with logs.bound(turn=start.trace or None, job=str(self.ref)):
            self.task = asyncio.create_task(self._run(), name=f"job {self.ref}")

    # -- from the runner ---------------------------------------------------------------

    def send(self, command: cmd.JobCommand) -> None:
        """Queue an input for the job (never waits)."""
        if self._cancelled:
            return
        if len(self._outbox) >= OUTBOX_ITEMS:
            self._overflowed = True
            if self._timeout is not None:  # wake the job's task: it fails now
                self._timeout.reschedule(self._loop.time())
        else:
            self._outbox.append(command)
        self._queued.set()

    def cancel(self) -> None:
        """The conversation no longer needs the job: stop it on its worker, report nothing more."""
        self._cancelled = True
        self._outbox.clear()
        self.task.cancel()

    # -- the job's task -------------------------------------------------------------------

    async def _run(self) -> None:
        start = self.start
        try:
            async with self.pool.lease(start.placement, model=start.model, exclude=start.exclude) as lease:
                self.worker = lease.worker_id
                if getattr(start.params, "prefill", False) and lease.jobs_on_worker > lease.capacity - 1:
                    # A prefill is a head start, not worth the worker's last free slot
                    # (and not the worker's failure: the lease ends as skipped).
                    lease.release("skipped", frees_slot=False)
                    raise JobError(ErrorCode.BUSY, f"{lease.worker_id} has no slot to spare for a prefill")
                try:
                    await self._exchange(lease)
                except asyncio.CancelledError:
                    if self._cancelled and self._delivered():
                        lease.release()  # it gave all it owed (an STT job after its flushed transcript): a success
                    raise
        except NoWorker as exc:
            self._report(JobFailed(self.ref, NO_WORKER, str(exc)))
        except JobError as exc:
            self._report(JobFailed(self.ref, exc.code.value, exc.message, self.worker))
        except Exception as exc:  # a bug here: the conversation must still hear that the job is gone
            log.exception("%s: the job failed in the gateway", self.ref)
            self._report(JobFailed(self.ref, ErrorCode.INTERNAL.value, f"gateway error: {type(exc).__name__}: {exc}", self.worker))

    async def _exchange(self, lease: Lease) -> None:
        handle = await lease.client.start_job(self.start.params, trace=self.start.trace or None)
        sender: asyncio.Task[None] | None = None
        try:
            self._report(JobStarted(self.ref, lease.worker_id, lease.model))
            await self._send_queued(handle)  # what came with the start goes at once, not a task switch later
            sender = asyncio.create_task(self._send_inputs(handle))
            while (event := await self._next(handle, lease)) is not None:
                self._deliver(event, lease)
            self._report(JobFinished(self.ref, dict(handle.done.stats) if handle.done else {}))
        finally:
            if sender is not None:
                sender.cancel()
            if handle.open:
                await self._stop_on_worker(handle)

    async def _next(self, handle: JobHandle, lease: Lease) -> JobResult | MediaFrame | None:
        """The job's next event, within the deadline while it owes output."""
        while True:
            if self._overflowed:
                raise JobError(ErrorCode.INTERNAL, f"the link to {lease.worker_id} fell {OUTBOX_ITEMS} inputs behind")
            try:
                async with asyncio.timeout_at(self._due()) as self._timeout:
                    return await handle.next_event()
            except TimeoutError:
                if self._overflowed:
                    continue
                can_move = self.pool.has_worker(self.ref.kind, model=self.start.model, exclude=self.start.exclude | {lease.worker_id})
                if self.watchdog.overdue(self._loop.time(), can_move):
                    waited = self._loop.time() - (self.watchdog.owed_since or self._loop.time())
                    raise Stalled(f"no output from {lease.worker_id} within {waited:.3g} s") from None
                if self.watchdog.due() is not None and not can_move:
                    log.warning("%s: no output within %g s, and no other worker to move to: waiting", self.ref, self.watchdog.deadline_s)
            finally:
                self._timeout = None

    def _delivered(self) -> bool:
        """Whether the job gave output and owes nothing more."""
        return self.watchdog.first_wait_s is not None and self.watchdog.owed_since is None

    def _due(self) -> float | None:
        due = self.watchdog.due()
        if self._overflowed:
            return self._loop.time()
        return due

    async def _send_inputs(self, handle: JobHandle) -> None:
        """Send the outbox in order as inputs come; a lost link shows in the job's events, not here."""
        try:
            while True:
                while not self._outbox:
                    self._queued.clear()
                    await self._queued.wait()
                await self._send_queued(handle)
        except JobError:
            pass

    async def _send_queued(self, handle: JobHandle) -> None:
        while self._outbox:
            command = self._outbox.popleft()
            await self._send(handle, command)
            if owes_after(self.ref.kind, command):
                self._owe()

    async def _send(self, handle: JobHandle, command: cmd.JobCommand) -> None:
        if isinstance(command, cmd.SendAudio):
            samples = command.samples
            for start in range(0, max(len(samples), 1), REPLAY_FRAME_SAMPLES):
                await handle.send_audio(samples[start : start + REPLAY_FRAME_SAMPLES])
        elif isinstance(command, cmd.SendText):
            self._texts_sent += 1
            await handle.send_text(command.text)
        elif isinstance(command, cmd.SendImage):
            await handle.send_image(command.data, command.format)
        elif isinstance(command, cmd.FlushInput):
            await handle.flush()
        elif isinstance(command, cmd.EndInput):
            await handle.end()

    def _owe(self) -> None:
        self.watchdog.owe(self._loop.time())
        if self._timeout is not None:
            self._timeout.reschedule(self.watchdog.due())

    def _deliver(self, event: JobResult | MediaFrame, lease: Lease) -> None:
        try:
            converted = self._convert(event)
        except (ValidationError, ValueError) as exc:
            raise JobError(ErrorCode.INTERNAL, f"unreadable result from {lease.worker_id}: {exc}") from None
        if converted is None:
            return
        if isinstance(converted, PieceSpoken):
            self._texts_spoken += 1
        now = self._loop.time()
        waited_before = self.watchdog.first_wait_s
        if settles(converted, self._texts_sent, self._texts_spoken):
            self.watchdog.settled(now)
        else:
            self.watchdog.progress(now, answers=not isinstance(converted, Transcript))
        if waited_before is None and self.watchdog.first_wait_s is not None:
            lease.observe(self.watchdog.first_wait_s)  # the worker's latency, for selection
        self._report(converted)

    def _convert(self, event: JobResult | MediaFrame) -> JobEvent | None:
        kind = self.ref.kind
        if isinstance(event, MediaFrame):
            if kind is not WorkerKind.TTS:
                return None
            return Speech(self.ref, np.frombuffer(event.payload, "<i2"), event.sample_rate)
        if kind is WorkerKind.STT:
            result = SttResult.model_validate(event.data)
            return Transcript(self.ref, result.text, final=result.final, flushed=result.flushed)
        if kind is WorkerKind.LLM:
            return Token(self.ref, LlmResult.model_validate(event.data).text)
        if kind is WorkerKind.TTS:
            return PieceSpoken(self.ref, TtsResult.model_validate(event.data).clause)
        return Seen(self.ref, VisionResult.model_validate(event.data))

    async def _stop_on_worker(self, handle: JobHandle) -> None:
        """Tell the worker to stop the job (its late events are dropped), without waiting on a stalled link."""
        handle.forget()
        try:
            async with asyncio.timeout(CANCEL_TIMEOUT_S):
                await handle.cancel()
        except (TimeoutError, JobError):
            pass

    def _report(self, event: JobEvent) -> None:
        if not self._cancelled:
            self.report(event)
