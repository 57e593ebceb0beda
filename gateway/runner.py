"""Runs one session's conversation: hands it what happens, carries out what it says.

:class:`~gateway.conversation.Conversation` decides everything and does no
I/O; this is the thin asyncio layer around it, as ``websockets``' asyncio
connection is around its sans-I/O protocol:

- events come in from the session's audio path (turn events), from the
  worker jobs' tasks, from the answer track and from the clock; each is
  handed over synchronously, so nothing here ever waits on a worker link;
- commands go out: a job command to its :class:`~gateway.worker_job.WorkerJob`
  (which has its own task and bounded outbox), audio to the answer track
  (resampled to 48 kHz), events to the data channel, counts to the metrics;
  a camera frame is encoded in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable

import av

from stream import logs
from stream.audio import Resampler
from stream.config import GatewaySettings
from stream.protocol import MediaFormat

from .conversation import Conversation
from .conversation import commands as cmd
from .conversation.inputs import CameraFrame, Input, JobRef, LineFull, Playing, PlayoutIdle, Tick, WorkerFreed
from .events import ErrorEvent, Event
from .metrics import GatewayMetrics
from .playout import SAMPLE_RATE as PLAYOUT_RATE
from .playout import AnswerTrack
from .worker_job import WorkerJob
from .worker_pool import WorkerPool

log = logging.getLogger("edgestream.gateway")

JPEG_QUALITY = 85


class ConversationRunner:
    def __init__(
        self,
        pool: WorkerPool,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        session_id: str,
        send: Callable[[Event], None],
        latest_frame: Callable[[], av.VideoFrame | None],
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.session_id = session_id
        self.send = send
        self.latest_frame = latest_frame
        self.conversation = Conversation(settings, session_id)
        self.answer_track = AnswerTrack(
            on_piece_started=lambda turn, piece, at: self.handle(Playing(turn, piece, at)),
            on_idle=lambda turn: self.handle(PlayoutIdle(turn)),
        )
        self.jobs: dict[JobRef, WorkerJob] = {}
        """Jobs open on workers (the tests count them)."""
        self._resampler: tuple[int, int, Resampler] | None = None
        """(turn, TTS rate, resampler to 48 kHz) of the answer playing."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._queue: list[Input] = []
        self._handling = False
        self._closed = False
        self._tickets: set[JobRef] = set()
        """This conversation's places in the pool's waiting lines."""
        self.handle(Tick())  # arms the conversation's own timers

    @property
    def task_count(self) -> int:
        return len(self._tasks) + len(self.jobs)

    def handle(self, event: Input) -> None:
        """Hand ``event`` to the conversation and carry out its commands (never waits)."""
        if self._closed:
            return
        self._queue.append(event)
        if self._handling:  # a command led straight back here: handled after the current one
            return
        self._handling = True
        try:
            while self._queue:
                current = self._queue.pop(0)
                try:
                    commands = self.conversation.handle(current, time.monotonic())
                except Exception:
                    log.exception("session %s: the conversation failed on %r", self.session_id, current)
                    self.send(ErrorEvent(code="internal", message="the gateway failed on this turn; the session goes on"))
                    continue
                for command in commands:
                    self._execute(command)
        finally:
            self._handling = False
        self._arm_timer()

    async def close(self) -> None:
        """Stop everything of this conversation and cancel its jobs on the workers."""
        for command in self.conversation.close():
            self._execute(command)
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for job in list(self.jobs.values()):
            job.cancel()
        tasks = [job.task for job in self.jobs.values()] + list(self._tasks)
        for task in self._tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.jobs.clear()
        self.answer_track.stop()

    # -- commands ------------------------------------------------------------------------

    def _execute(self, command: cmd.Command) -> None:
        if isinstance(command, cmd.StartJob):
            job = WorkerJob(command, self.pool, self.settings.job_deadline_s, self.handle)
            self.jobs[command.job] = job
            job.task.add_done_callback(lambda _, ref=command.job: self.jobs.pop(ref, None))
        elif isinstance(command, cmd.CancelJob):
            job = self.jobs.pop(command.job, None)
            if job is not None:
                job.cancel()
        elif isinstance(command, cmd.JobCommand):
            job = self.jobs.get(command.job)
            if job is not None:
                job.send(command)
        elif isinstance(command, cmd.WaitForWorker):
            line = self.pool.waiting[command.kind]
            if line.join(command.ticket, command.since, lambda ticket=command.ticket: self._wake(ticket)):
                self._tickets.add(command.ticket)
            else:
                self.handle(LineFull(command.ticket, len(line)))
        elif isinstance(command, cmd.StopWaiting):
            self.pool.waiting[command.kind].leave(command.ticket)
            self._tickets.discard(command.ticket)
        elif isinstance(command, cmd.Play):
            self.answer_track.write(command.turn, command.piece, self._to_playout(command))
        elif isinstance(command, cmd.Unplay):
            self.answer_track.retract(command.turn, command.piece)
        elif isinstance(command, cmd.StopPlayback):
            self.answer_track.stop()
            self._resampler = None
        elif isinstance(command, cmd.Emit):
            self.send(command.event)
        elif isinstance(command, cmd.LookAtCamera):
            frame = self.latest_frame()
            if frame is not None:
                self._spawn(self._encode_frame(frame, command))
        elif isinstance(command, cmd.CountTurn):
            self.metrics.turns.labels(command.outcome).inc()
        elif isinstance(command, cmd.CountFailover):
            self.metrics.failovers.labels(command.kind.value).inc()
        elif isinstance(command, cmd.ObserveStages):
            self.metrics.observe_stages(command.marks)

    def _wake(self, ticket: JobRef) -> bool:
        """The pool's line says a slot may be free for ``ticket``; ``False``: it no longer waits."""
        if self._closed or ticket not in self._tickets:
            return False
        self._tickets.discard(ticket)
        self.handle(WorkerFreed(ticket))
        return True

    def _to_playout(self, play: cmd.Play):
        """``play``'s samples at 48 kHz, through one resampler per answer (its filter state carries on)."""
        if self._resampler is None or self._resampler[:2] != (play.turn, play.sample_rate):
            self._resampler = (play.turn, play.sample_rate, Resampler(play.sample_rate, PLAYOUT_RATE))
        return self._resampler[2].push(play.samples)

    async def _encode_frame(self, frame: av.VideoFrame, look: cmd.LookAtCamera) -> None:
        data = await asyncio.to_thread(_jpeg, frame)
        self.handle(CameraFrame(look.turn, data, MediaFormat.JPEG, periodic=look.periodic))

    def _arm_timer(self) -> None:
        due = self.conversation.next_timer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if due is not None and not self._closed:
            self._timer = asyncio.get_running_loop().call_later(max(0.0, due - time.monotonic()), self.handle, Tick())

    def _spawn(self, coroutine) -> None:
        with logs.bound(session=self.session_id):
            task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("session %s: %s failed", self.session_id, task.get_name(), exc_info=task.exception())


def _jpeg(frame: av.VideoFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_image().save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
