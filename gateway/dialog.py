"""One conversation: turns in, answers out (orchestration policy, no media I/O).

Per turn:

1. speech starts -> an STT job opens and receives the utterance as it arrives
   (pre-roll included); the camera's latest frame goes to a vision job now, so
   its text is ready by the end of the turn; a playing answer is cut off
   (barge-in) and its LLM and TTS jobs are cancelled on the workers.
2. speech ends -> ``job.end``; the final transcript comes back in tens of ms.
3. the transcript (with the vision text as context, and the history) goes to
   an LLM job; tokens stream to the client and into the clause chunker; each
   complete clause becomes a TTS job at once; its PCM is converted to 48 kHz
   and queued on the answer track.

Every stage is timed from the end of speech and reported per turn (to the
client, and to the metrics' histograms). Every job
gets its worker from the pool (``gateway/worker_pool.py``); a job whose worker
dies or stalls moves to another one as ``gateway/failover.py`` says, and the
session keeps one model per kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import av
import numpy as np

from stream import logs
from stream.audio import Resampler
from stream.clauses import ClauseChunker
from stream.config import GatewaySettings
from stream.protocol import ErrorCode, JobResult, MediaFormat, MediaFrame, WorkerKind
from stream.protocol.jobs import ChatMessage, LlmParams, LlmResult, SttResult, TtsParams, VisionParams, VisionResult
from stream.worker_client import JobFailed, JobHandle

from . import failover

from .events import (
    AnswerDone,
    AnswerToken,
    BargeIn,
    ErrorEvent,
    Event,
    Latency,
    TranscriptFinal,
    TranscriptPartial,
    VisionText,
)
from .metrics import GatewayMetrics
from .playout import SAMPLE_RATE as PLAYOUT_RATE
from .playout import AnswerTrack
from .turns import SpeechAudio, SpeechEnded, SpeechPaused, SpeechResumed, SpeechStarted, TurnEvent
from .selection import Job, job_size
from .worker_pool import Lease, ModelPin, NoWorker, WorkerPool

log = logging.getLogger("edgestream.gateway")


@dataclass
class Turn:
    number: int
    id: str
    """``<session>.<number>``: in every log line about the turn, on the gateway and (as the job's trace) on its workers."""
    stt_job: JobHandle | None = None
    stt_lease: Lease | None = None
    stt_results: asyncio.Task[str] | None = None
    stt_tried: set[str] = field(default_factory=set)
    """Workers this turn's recognition has been on (a failover goes to another)."""
    stt_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while audio goes out, so a failover's replay keeps the audio in order."""
    input_ended: float | None = None
    """Monotonic time the STT job was told the utterance is complete."""
    vision: asyncio.Task[VisionResult | None] | None = None
    speech_end: float | None = None
    """Monotonic time of the end of speech in the received audio."""
    marks: dict[str, float] = field(default_factory=dict)
    workers: dict[str, str] = field(default_factory=dict)
    audio: list[np.ndarray] = field(default_factory=list)
    """Everything heard in this turn, kept to replay into a new STT job if a pause was not the end."""
    confirmed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the turn has really ended; until then a speculative answer is held back."""
    held: list[Event] = field(default_factory=list)
    finishing: asyncio.Task[None] | None = None
    attempt: int = 0
    """Bumped when a speculative answer is dropped, so its task knows it was not a barge-in."""

    def mark(self, stage: str) -> None:
        if stage not in self.marks and self.speech_end is not None:
            self.marks[stage] = round((time.monotonic() - self.speech_end) * 1000, 1)


class Dialog:
    def __init__(
        self,
        pool: WorkerPool,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        session_id: str,
        send: Callable[[Event], None],
        playout: AnswerTrack,
        latest_frame: Callable[[], av.VideoFrame | None],
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.session_id = session_id
        self.models: dict[WorkerKind, ModelPin] = {}
        """The model (id, sha256) this conversation uses per kind, fixed by its first job."""
        self.llm_worker: str | None = None
        """The LLM worker that answered last: it holds this conversation's prompt in its cache."""
        self.failovers = 0
        self.settings = settings
        self.send = send
        self.playout = playout
        self.latest_frame = latest_frame
        self.history: list[ChatMessage] = []
        self.turns = 0
        self.current: Turn | None = None
        self._answer: asyncio.Task[None] | None = None
        self._answer_turn: Turn | None = None
        self._tasks: set[asyncio.Task] = set()
        self._first_audio: dict[int, asyncio.Future[float]] = {}
        self.last_prompt: list[ChatMessage] = []
        self.speculations_dropped = 0
        self.open_jobs: set[JobHandle] = set()
        """Jobs this dialog has open on workers (the tests count them)."""

    # -- turn events from the audio path ----------------------------------------

    async def handle(self, event: TurnEvent) -> None:
        if isinstance(event, SpeechStarted):
            await self._speech_started(event)
        elif isinstance(event, SpeechAudio):
            if self.current is not None:
                self.current.audio.append(event.samples)
                if self.current.finishing is None:
                    await self._send_audio(self.current, event.samples)
        elif isinstance(event, SpeechPaused):
            turn = self.current
            if turn is not None and turn.finishing is None:
                # Probably the end: answer now, play only once the end is confirmed.
                self._start_finishing(turn, event)
        elif isinstance(event, SpeechResumed):
            if self.current is not None and self.current.finishing is not None:
                await self._resume(self.current)
        elif isinstance(event, SpeechEnded):
            turn, self.current = self.current, None
            if turn is not None:
                if event.cut:
                    limit = self.settings.max_utterance_s
                    log.info("turn %s: cut at %g s (max_utterance_s)", turn.id, limit)
                    self.send(ErrorEvent(
                        code="utterance_too_long",
                        message=f"you spoke for {limit:g} s without a pause; this turn ends there and is answered, and what follows starts the next",
                        turn=turn.number,
                    ))
                if turn.finishing is None:
                    self._start_finishing(turn, event)
                turn.mark("end_of_turn")
                self._confirm(turn)

    def _lease(self, job: Job, tried: set[str]) -> Lease:
        """A worker for ``job`` that serves this conversation's model and was not tried for it yet."""
        lease = self.pool.acquire(job, model=self.models.get(job.kind), exclude=frozenset(tried))
        tried.add(lease.worker_id)
        self.models.setdefault(job.kind, lease.model)
        return lease

    async def _open_stt(self, turn: Turn) -> None:
        """Open ``turn``'s STT job on the best worker not tried yet; raises :class:`NoWorker` or :class:`JobFailed`."""
        while True:
            lease = self._lease(Job(WorkerKind.STT), turn.stt_tried)
            try:
                job = await lease.client.start_job({}, trace=turn.id)
            except JobFailed as exc:
                lease.fail(str(exc))
                if failover.fails_over(exc.code, len(turn.stt_tried)):
                    continue
                raise
            turn.stt_lease, turn.stt_job = lease, job
            turn.workers["stt"] = lease.worker_id
            self.open_jobs.add(job)
            return

    async def _start_stt(self, turn: Turn) -> bool:
        """Open recognition for ``turn`` and start reading it; ``False`` (reported to the client) if no worker can."""
        try:
            await self._open_stt(turn)
        except (NoWorker, JobFailed) as exc:
            self._turn_failed(turn, _error_code(exc), str(exc))
            return False
        log.info("turn %s: recognition on %s", turn.id, turn.stt_lease.worker_id)
        turn.stt_results = _turn_task(turn, self._stt_results(turn))
        return True

    def _start_finishing(self, turn: Turn, event: SpeechPaused | SpeechEnded) -> None:
        turn.speech_end = time.monotonic() - (event.stream_s - event.speech_end_s)
        turn.finishing = _turn_task(turn, self._finish_turn(turn))

    def _turn_failed(self, turn: Turn, code: str, message: str) -> None:
        log.warning("turn %s failed: %s: %s", turn.id, code, message)
        self.metrics.turns.labels("failed").inc()
        self.send(ErrorEvent(code=code, message=message, turn=turn.number))

    async def _speech_started(self, event: SpeechStarted) -> None:
        if self._answer is not None and not self._answer.done() or self.playout.playing:
            self._barge_in()
        self.turns += 1
        number = self.turns
        turn = Turn(number, logs.turn_label(self.session_id, number))
        if not await self._start_stt(turn):
            return
        if self.settings.vision_on_turn and self.latest_frame() is not None:
            turn.vision = _turn_task(turn, self._look(number, self.latest_frame(), turn.workers))
        self.current = turn
        turn.audio.append(event.preroll)
        await self._send_audio(turn, event.preroll)

    async def _resume(self, turn: Turn) -> None:
        """The pause was not the end: drop the speculative answer, reopen recognition."""
        turn.attempt += 1
        self.speculations_dropped += 1
        if turn.finishing is not None:
            turn.finishing.cancel()
        if self._answer is not None and self._answer_turn is turn:
            self._answer.cancel()
        if turn.stt_results is not None:
            turn.stt_results.cancel()
        turn.held.clear()
        turn.marks.clear()
        turn.finishing = None
        turn.input_ended = None
        turn.stt_tried.clear()
        if not await self._start_stt(turn):
            self.current = None
            return
        await self._send_audio(turn, failover.stt_replay(turn.audio))  # replay: no sample is lost

    def _confirm(self, turn: Turn) -> None:
        turn.confirmed.set()
        held, turn.held = turn.held, []
        for event in held:
            self.send(event)

    def _emit(self, turn: Turn, event: Event) -> None:
        """Send an answer event, or hold it while the answer is still speculative."""
        if turn.confirmed.is_set():
            self.send(event)
        else:
            turn.held.append(event)

    async def _send_audio(self, turn: Turn, samples: np.ndarray) -> None:
        async with turn.stt_lock:
            with contextlib.suppress(JobFailed):  # a lost worker shows in the results, which fail over
                await turn.stt_job.send_audio(samples)

    async def _stt_results(self, turn: Turn) -> str:
        """The turn's final transcript (partials go to the client); a job whose worker is lost moves to another."""
        while True:
            job, lease = turn.stt_job, turn.stt_lease
            final = ""
            try:
                async for event in job.events():
                    if isinstance(event, JobResult):
                        result = SttResult.model_validate(event.data)
                        if result.final:
                            final = result.text
                        else:
                            self.send(TranscriptPartial(turn=turn.number, text=result.text))
                if turn.input_ended is not None:
                    lease.observe(time.monotonic() - turn.input_ended)
                return final
            except JobFailed as exc:
                lease.fail(str(exc))
                if not failover.fails_over(exc.code, len(turn.stt_tried)):
                    raise
                await self._move_stt(turn, exc)
            finally:
                lease.release()
                self.open_jobs.discard(job)

    async def _move_stt(self, turn: Turn, exc: JobFailed) -> None:
        """Failover: the utterance so far, replayed into a job on another worker."""
        self.failovers += 1
        self.metrics.failovers.labels(WorkerKind.STT.value).inc()
        log.warning("turn %s: speech-to-text on %s failed (%s); moving it", turn.id, turn.stt_lease.worker_id, exc)
        async with turn.stt_lock:
            await self._open_stt(turn)
            with contextlib.suppress(JobFailed):  # if this one fails too, its results say so
                await turn.stt_job.send_audio(failover.stt_replay(turn.audio))
                if turn.input_ended is not None:
                    turn.input_ended = time.monotonic()
                    await turn.stt_job.end()

    async def _final_transcript(self, turn: Turn) -> str:
        """Wait for the final transcript; a worker that misses the deadline is treated as stalled
        (if there is another worker to move to; else it is waited for, as in :func:`_first_within`)."""
        deadline = self.settings.job_deadline_s
        can_move = self._can_move(WorkerKind.STT, turn.stt_tried)
        for _ in range(failover.MAX_WORKERS_PER_JOB + STALL_PATIENCE):
            try:
                return await asyncio.wait_for(asyncio.shield(turn.stt_results), deadline)
            except TimeoutError:
                if can_move():
                    turn.stt_lease.fail(f"no final transcript within {deadline:g} s", stalled=True)
                else:
                    log.warning("turn %s: no final transcript within %g s, and no other worker: waiting", turn.id, deadline)
        return await asyncio.wait_for(asyncio.shield(turn.stt_results), deadline)

    async def _finish_turn(self, turn: Turn) -> None:
        async with turn.stt_lock:
            turn.input_ended = time.monotonic()
            with contextlib.suppress(JobFailed):
                await turn.stt_job.end()
        try:
            text = await self._final_transcript(turn)
        except (JobFailed, NoWorker, TimeoutError) as exc:
            self._turn_failed(turn, "stt_failed", str(exc) or "no final transcript")
            return
        turn.mark("stt_final")
        self._emit(turn, TranscriptFinal(turn=turn.number, text=text))
        if not text.strip():
            await turn.confirmed.wait()  # a speculation that speech resumes is cancelled here, not counted
            log.info("turn %s: nothing recognised", turn.id)
            self.metrics.turns.labels("empty").inc()
            return
        if self._answer is not None and not self._answer.done():
            self._barge_in()
        self._answer_turn = turn
        self._answer = asyncio.create_task(self._respond(turn, text, turn.attempt))

    # -- vision ---------------------------------------------------------------------

    async def _look(self, number: int, frame: av.VideoFrame, workers: dict[str, str] | None = None) -> VisionResult | None:
        """OCR ``frame`` for turn ``number`` (sent again to another worker if one fails); records the worker in ``workers``."""
        buffer = io.BytesIO()
        frame.to_image().save(buffer, format="JPEG", quality=85)
        tried: set[str] = set()
        trace = logs.turn_label(self.session_id, number)
        while True:
            try:
                lease = self._lease(Job(WorkerKind.VISION), tried)
            except NoWorker as exc:
                log.info("vision skipped for turn %s: %s", trace, exc)
                return None
            started = time.monotonic()
            try:
                result = await lease.client.analyze_image(
                    buffer.getvalue(), MediaFormat.JPEG, trace=trace, **VisionParams(describe=True).model_dump()
                )
            except JobFailed as exc:
                lease.fail(str(exc))
                if failover.fails_over(exc.code, len(tried)):
                    continue
                log.info("vision skipped for turn %s: %s", trace, exc)
                return None
            lease.observe(time.monotonic() - started)
            lease.release()
            break
        if workers is not None:
            workers["vision"] = lease.worker_id
        self.send(VisionText(turn=number, text=result.text, description=result.description))
        return result

    async def watch_camera(self, interval_s: float) -> None:
        """OCR the latest frame every ``interval_s`` (one at a time: a slow worker skips ticks, nothing queues)."""
        while True:
            await asyncio.sleep(interval_s)
            frame = self.latest_frame()
            if frame is not None:
                await self._look(self.turns, frame)

    # -- the answer -------------------------------------------------------------------

    def _messages(self, text: str, seen: VisionResult | None) -> list[ChatMessage]:
        """System prompt, recent history, and the question with what the camera shows.

        The camera context goes in the user message, not the system prompt: the
        prompt then only grows turn by turn, and the LLM worker re-evaluates just
        the new turn instead of the whole history.
        """
        if seen is not None and (seen.text or seen.description):
            context = f"(The camera shows: {seen.description}) " if seen.description else ""
            context += f'(Text visible in the camera: "{seen.text}") ' if seen.text else ""
            text = context + text
        return [ChatMessage(role="system", content=self.settings.system_prompt), *self.history, ChatMessage(role="user", content=text)]

    def _remember(self, question: ChatMessage, answer: str) -> None:
        """Add a turn to the history, trimming it in blocks, not one turn at a time.

        A window that slides by one turn changes the prompt right after the
        system message on every turn, so the LLM worker would re-evaluate the
        whole history each time (seconds at ~300 tokens/s). Halving it when
        full keeps the prompt a growing prefix for many turns in a row.
        """
        self.history += [question, ChatMessage(role="assistant", content=answer)]
        limit = self.settings.max_history_turns
        if len(self.history) > 2 * limit:
            self.history = self.history[-2 * (limit // 2) :] if limit // 2 else []

    async def _respond(self, turn: Turn, text: str, attempt: int) -> None:
        seen = None
        if turn.vision is not None:
            with contextlib.suppress(TimeoutError):
                seen = await asyncio.wait_for(asyncio.shield(turn.vision), 3.0)
        answer = ""
        clauses: asyncio.Queue[str | None] = asyncio.Queue()
        speaker = asyncio.create_task(self._speak(turn, clauses))
        job: JobHandle | None = None
        self.last_prompt = self._messages(text, seen)
        params = LlmParams(messages=self.last_prompt, max_tokens=self.settings.max_answer_tokens)
        chunker = ClauseChunker()
        tokens = 0
        tried: set[str] = set()
        try:
            while True:  # one pass per worker: a lost one's answer continues on the next
                lease = self._lease(self._llm_job(), tried)
                turn.workers["llm"] = lease.worker_id
                try:
                    job = await lease.client.start_job(failover.llm_continuation(params, answer, tokens), trace=turn.id)
                    self.open_jobs.add(job)
                    await job.end()
                    started = time.monotonic()
                    async for piece in self._llm_pieces(job, tried):
                        if tokens == 0:
                            lease.observe(time.monotonic() - started)
                        tokens += 1
                        turn.mark("first_token")
                        answer += piece
                        self._emit(turn, AnswerToken(turn=turn.number, text=piece))
                        for clause in chunker.feed(piece):
                            turn.mark("first_clause")
                            clauses.put_nowait(clause)
                    self.llm_worker = lease.worker_id
                    break
                except JobFailed as exc:
                    self._failed_over(turn, lease, exc, tried, "the answer continues elsewhere")
                finally:
                    lease.release()
                    if job is not None:
                        self.open_jobs.discard(job)
            for clause in chunker.flush():
                turn.mark("first_clause")
                clauses.put_nowait(clause)
            clauses.put_nowait(None)
            await speaker
        except asyncio.CancelledError:
            speaker.cancel()
            if job is not None:
                self._spawn(self._cancel_job(job))
            if attempt == turn.attempt:  # a barge-in, not a speculation proved wrong
                self._remember(self.last_prompt[-1], answer + "...")
                self.send(AnswerDone(turn=turn.number, text=answer, interrupted=True))
                log.info("turn %s: answer interrupted after %d tokens", turn.id, tokens)
                self.metrics.turns.labels("interrupted").inc()
            raise
        except (NoWorker, JobFailed) as exc:
            speaker.cancel()
            self._turn_failed(turn, _error_code(exc), str(exc))
            return
        await turn.confirmed.wait()
        self._remember(self.last_prompt[-1], answer)
        truncated = job is not None and job.done is not None and bool(job.done.stats.get("truncated"))
        self.send(AnswerDone(turn=turn.number, text=answer, truncated=truncated))
        if truncated:
            self.send(ErrorEvent(
                code="answer_truncated",
                message=f"the answer reached max_answer_tokens ({params.max_tokens}) and was cut there",
                turn=turn.number,
            ))
        self.metrics.turns.labels("answered").inc()
        self._spawn(self._report_latency(turn))

    def _llm_job(self) -> Job:
        """The answer's size on each LLM worker: the whole prompt, or only its new part where it is cached."""
        total = sum(len(m.content) for m in self.last_prompt)
        new = len(self.last_prompt[-1].content) + (len(self.history[-1].content) if self.history else 0)
        return Job(
            WorkerKind.LLM,
            size=job_size(WorkerKind.LLM, prompt_chars=total),
            warm_worker=self.llm_worker,
            warm_size=job_size(WorkerKind.LLM, prompt_chars=new),
        )

    async def _llm_pieces(self, job: JobHandle, tried: set[str]) -> AsyncIterator[str]:
        """The job's text pieces; the first must come within the deadline, or the worker counts as stalled."""
        can_move = self._can_move(WorkerKind.LLM, tried)
        async for event in _first_within(job.events(), self.settings.job_deadline_s, JobResult, "first token", can_move):
            if isinstance(event, JobResult):
                yield LlmResult.model_validate(event.data).text

    async def _speak(self, turn: Turn, clauses: asyncio.Queue[str | None]) -> None:
        """Synthesize clause by clause; a clause whose worker fails is synthesized again elsewhere."""
        while (clause := await clauses.get()) is not None:
            tried: set[str] = set()
            while True:
                lease = self._lease(Job(WorkerKind.TTS, size=job_size(WorkerKind.TTS, text=clause)), tried)
                turn.workers.setdefault("tts", lease.worker_id)
                try:
                    await self._speak_clause(turn, clause, lease, tried)
                    break
                except JobFailed as exc:
                    self._failed_over(turn, lease, exc, tried, "the clause starts again elsewhere")
                finally:
                    lease.release()

    def _failed_over(self, turn: Turn, lease: Lease, exc: JobFailed, tried: set[str], next_step: str) -> None:
        """A job failed on ``lease``'s worker: out of rotation if stalled; re-raise unless it may move on."""
        lease.fail(str(exc), stalled=isinstance(exc, _Stalled))
        if not failover.fails_over(exc.code, len(tried)):
            raise exc
        self.failovers += 1
        self.metrics.failovers.labels(lease.member.kind.value).inc()
        log.warning("turn %s: %s job on %s failed (%s); %s", turn.id, lease.member.kind.value, lease.worker_id, exc, next_step)

    def _can_move(self, kind: WorkerKind, tried: set[str]) -> Callable[[], bool]:
        """Whether a job of ``kind`` could move now to a worker it has not been on."""
        return lambda: self.pool.has_worker(kind, model=self.models.get(kind), exclude=frozenset(tried))

    async def _speak_clause(self, turn: Turn, clause: str, lease: Lease, tried: set[str]) -> None:
        job = await lease.client.start_job(TtsParams(text=clause), trace=turn.id)
        self.open_jobs.add(job)
        resampler: Resampler | None = None
        started = time.monotonic()
        try:
            await job.end()
            can_move = self._can_move(WorkerKind.TTS, tried)
            async for event in _first_within(job.events(), self.settings.job_deadline_s, MediaFrame, "audio", can_move):
                if isinstance(event, MediaFrame):
                    if resampler is None:
                        lease.observe(time.monotonic() - started)
                        resampler = Resampler(event.sample_rate, PLAYOUT_RATE)
                    turn.mark("first_tts_audio")
                    await turn.confirmed.wait()  # a speculative answer stays silent until the turn ends
                    await self.playout.write(turn.number, resampler.push(np.frombuffer(event.payload, "<i2")))
            if resampler is not None:
                await self.playout.write(turn.number, resampler.flush())
        except asyncio.CancelledError:
            self._spawn(self._cancel_job(job))
            raise
        finally:
            self.open_jobs.discard(job)

    def audio_started(self, number: int, at: float) -> None:
        """Called by the answer track when the first frame of ``number``'s answer is sent."""
        turn = self._answer_turn
        if turn is not None and turn.number == number and turn.speech_end is not None:
            turn.marks.setdefault("first_audio_sent", round((at - turn.speech_end) * 1000, 1))
            waiter = self._first_audio.get(number)
            if waiter is not None and not waiter.done():
                waiter.set_result(at)

    async def _report_latency(self, turn: Turn) -> None:
        if "first_audio_sent" not in turn.marks:
            waiter = self._first_audio.setdefault(turn.number, asyncio.get_running_loop().create_future())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, 5.0)
            self._first_audio.pop(turn.number, None)
        marks = {"end_of_turn": 0.0, "stt_final": 0.0, **turn.marks}
        self.metrics.observe_stages(marks)
        log.info("turn %s answered: voice-to-voice %s ms, workers %s", turn.id, marks.get("first_audio_sent"), turn.workers)
        self.send(Latency(turn=turn.number, workers=turn.workers, **marks))

    def _barge_in(self) -> None:
        self.playout.stop()
        if self._answer is not None and not self._answer.done():
            self._answer.cancel()
        if self._answer_turn is not None:
            self.send(BargeIn(turn=self._answer_turn.number))

    async def _cancel_job(self, job: JobHandle) -> None:
        with contextlib.suppress(JobFailed):
            await job.cancel()
            async for _ in job.events():
                pass
        self.open_jobs.discard(job)

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop everything of this conversation and cancel its jobs on the workers."""
        if self._answer is not None:
            self._answer.cancel()
        if self.current is not None:
            for task in (self.current.stt_results, self.current.vision, self.current.finishing):
                if task is not None:
                    task.cancel()
        for task in list(self._tasks):
            task.cancel()
        for job in list(self.open_jobs):
            with contextlib.suppress(JobFailed, Exception):
                await job.cancel()
        self.open_jobs.clear()


class _Stalled(JobFailed):
    """A worker that missed a job's deadline."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INTERNAL, message)


STALL_PATIENCE = 4
"""Deadlines a job waits on a slow worker when there is no other worker to move it to."""


async def _first_within(
    events: AsyncIterator[JobResult | MediaFrame], deadline_s: float, first: type, what: str, can_move: Callable[[], bool]
) -> AsyncIterator[JobResult | MediaFrame]:
    """``events``, where the first of type ``first`` must come within ``deadline_s`` or the worker counts as stalled.

    A worker is only given up on if the job can move (``can_move()``): a slow
    worker that is the only one left (the others dead or restarting) is waited
    for, up to ``STALL_PATIENCE`` deadlines, rather than losing the turn.
    """
    waiting = True
    missed = 0
    while True:
        if waiting:
            # Wait without cancelling: a cancelled anext() would end the events' generator.
            pending = asyncio.ensure_future(anext(events))
            try:
                while not (await asyncio.wait({pending}, timeout=deadline_s))[0]:
                    missed += 1
                    if missed >= STALL_PATIENCE or can_move():
                        raise _Stalled(f"no {what} within {deadline_s * missed:g} s")
                    log.warning("no %s within %g s, and no other worker to move to: waiting", what, deadline_s * missed)
            except BaseException:  # stalled, or the turn was cancelled (barge-in) meanwhile
                pending.cancel()
                raise
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
        else:
            try:
                event = await anext(events)
            except StopAsyncIteration:
                return
        waiting = waiting and not isinstance(event, first)
        yield event


def _turn_task(turn: Turn, coroutine) -> asyncio.Task:
    """A task working for ``turn``: its log lines (and those of the tasks it starts) carry the turn id."""
    with logs.bound(turn=turn.id):
        return asyncio.create_task(coroutine)


def _error_code(exc: NoWorker | JobFailed) -> str:
    return "no_worker" if isinstance(exc, NoWorker) else exc.code.value
