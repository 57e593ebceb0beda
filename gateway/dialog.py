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

Every stage is timed from the end of speech and reported per turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import av
import numpy as np

from stream.audio import Resampler
from stream.clauses import ClauseChunker
from stream.config import GatewaySettings
from stream.protocol import JobResult, MediaFormat, MediaFrame, WorkerKind
from stream.protocol.jobs import ChatMessage, LlmParams, LlmResult, SttResult, TtsParams, VisionParams, VisionResult
from stream.worker_client import JobFailed, JobHandle

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
from .playout import SAMPLE_RATE as PLAYOUT_RATE
from .playout import AnswerTrack
from .turns import SpeechAudio, SpeechEnded, SpeechPaused, SpeechResumed, SpeechStarted, TurnEvent
from .worker_links import NoWorker, WorkerLinks

log = logging.getLogger("edgestream.gateway")


@dataclass
class Turn:
    number: int
    stt_job: JobHandle
    stt_results: asyncio.Task[str]
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
        links: WorkerLinks,
        settings: GatewaySettings,
        send: Callable[[Event], None],
        playout: AnswerTrack,
        latest_frame: Callable[[], av.VideoFrame | None],
    ) -> None:
        self.links = links
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
                if turn.finishing is None:
                    self._start_finishing(turn, event)
                turn.mark("end_of_turn")
                self._confirm(turn)

    async def _open_stt(self, number: int) -> tuple[JobHandle, asyncio.Task[str], str] | None:
        """A new STT job for turn ``number`` and the task reading its results; ``None`` (reported) if none can be had."""
        try:
            stt = self.links.pick(WorkerKind.STT)
            job = await stt.start_job({})
        except (NoWorker, JobFailed) as exc:
            self.send(ErrorEvent(code=_error_code(exc), message=str(exc), turn=number))
            return None
        self.open_jobs.add(job)
        return job, asyncio.create_task(self._stt_results(number, job)), stt.hello.worker_id

    def _start_finishing(self, turn: Turn, event: SpeechPaused | SpeechEnded) -> None:
        turn.speech_end = time.monotonic() - (event.stream_s - event.speech_end_s)
        turn.finishing = asyncio.create_task(self._finish_turn(turn))

    async def _speech_started(self, event: SpeechStarted) -> None:
        if self._answer is not None and not self._answer.done() or self.playout.playing:
            self._barge_in()
        self.turns += 1
        number = self.turns
        opened = await self._open_stt(number)
        if opened is None:
            return
        job, results, worker_id = opened
        turn = Turn(number, job, results)
        turn.workers["stt"] = worker_id
        if self.settings.vision_on_turn and self.latest_frame() is not None:
            turn.vision = asyncio.create_task(self._look(number, self.latest_frame(), turn.workers))
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
        turn.stt_results.cancel()
        turn.held.clear()
        turn.marks.clear()
        turn.finishing = None
        opened = await self._open_stt(turn.number)
        if opened is None:
            self.current = None
            return
        turn.stt_job, turn.stt_results, _ = opened
        await self._send_audio(turn, np.concatenate(turn.audio))  # replay: no sample is lost

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
        try:
            await turn.stt_job.send_audio(samples)
        except JobFailed:
            pass  # reported when the results are read

    async def _stt_results(self, number: int, job: JobHandle) -> str:
        final = ""
        try:
            async for event in job.events():
                if isinstance(event, JobResult):
                    result = SttResult.model_validate(event.data)
                    if result.final:
                        final = result.text
                    else:
                        self.send(TranscriptPartial(turn=number, text=result.text))
        finally:
            self.open_jobs.discard(job)
        return final

    async def _finish_turn(self, turn: Turn) -> None:
        try:
            await turn.stt_job.end()
            text = await asyncio.wait_for(turn.stt_results, 30)
        except (JobFailed, TimeoutError) as exc:
            self.send(ErrorEvent(code="stt_failed", message=str(exc) or "no final transcript", turn=turn.number))
            return
        turn.mark("stt_final")
        self._emit(turn, TranscriptFinal(turn=turn.number, text=text))
        if not text.strip():
            return
        if self._answer is not None and not self._answer.done():
            self._barge_in()
        self._answer_turn = turn
        self._answer = asyncio.create_task(self._respond(turn, text, turn.attempt))

    # -- vision ---------------------------------------------------------------------

    async def _look(self, number: int, frame: av.VideoFrame, workers: dict[str, str] | None = None) -> VisionResult | None:
        """OCR ``frame`` for turn ``number``; records the worker in ``workers``."""
        try:
            vision = self.links.pick(WorkerKind.VISION)
            if workers is not None:
                workers["vision"] = vision.hello.worker_id
            image = frame.to_image()
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
            result = await vision.analyze_image(buffer.getvalue(), MediaFormat.JPEG, **VisionParams(describe=True).model_dump())
        except (NoWorker, JobFailed) as exc:
            log.info("vision skipped for turn %d: %s", number, exc)
            return None
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
        try:
            llm = self.links.pick(WorkerKind.LLM)
            turn.workers["llm"] = llm.hello.worker_id
            self.last_prompt = self._messages(text, seen)
            job = await llm.start_job(LlmParams(messages=self.last_prompt, max_tokens=self.settings.max_answer_tokens))
            self.open_jobs.add(job)
            await job.end()
            chunker = ClauseChunker()
            async for event in job.events():
                if not isinstance(event, JobResult):
                    continue
                piece = LlmResult.model_validate(event.data).text
                turn.mark("first_token")
                answer += piece
                self._emit(turn, AnswerToken(turn=turn.number, text=piece))
                for clause in chunker.feed(piece):
                    turn.mark("first_clause")
                    clauses.put_nowait(clause)
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
            raise
        except (NoWorker, JobFailed) as exc:
            speaker.cancel()
            self.send(ErrorEvent(code=_error_code(exc), message=str(exc), turn=turn.number))
            return
        finally:
            if job is not None:
                self.open_jobs.discard(job)
        await turn.confirmed.wait()
        self._remember(self.last_prompt[-1], answer)
        self.send(AnswerDone(turn=turn.number, text=answer))
        self._spawn(self._report_latency(turn))

    async def _speak(self, turn: Turn, clauses: asyncio.Queue[str | None]) -> None:
        while (clause := await clauses.get()) is not None:
            tts = self.links.pick(WorkerKind.TTS)
            turn.workers.setdefault("tts", tts.hello.worker_id)
            job = await tts.start_job(TtsParams(text=clause))
            self.open_jobs.add(job)
            resampler: Resampler | None = None
            try:
                await job.end()
                async for event in job.events():
                    if isinstance(event, MediaFrame):
                        turn.mark("first_tts_audio")
                        await turn.confirmed.wait()  # a speculative answer stays silent until the turn ends
                        if resampler is None:
                            resampler = Resampler(event.sample_rate, PLAYOUT_RATE)
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
        self.send(Latency(turn=turn.number, workers=turn.workers, **{"end_of_turn": 0.0, "stt_final": 0.0, **turn.marks}))

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
            self.current.stt_results.cancel()
            if self.current.vision is not None:
                self.current.vision.cancel()
        for task in list(self._tasks):
            task.cancel()
        for job in list(self.open_jobs):
            with contextlib.suppress(JobFailed, Exception):
                await job.cancel()
        self.open_jobs.clear()


def _error_code(exc: NoWorker | JobFailed) -> str:
    return "no_worker" if isinstance(exc, NoWorker) else exc.code.value
