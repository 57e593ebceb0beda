"""One conversation as a state machine: events in, commands out, no I/O.

:meth:`Conversation.handle` takes one event (``inputs.py``) and the time, and
returns the commands it leads to (``commands.py``); :meth:`next_timer` says
when to call it with :class:`~.inputs.Tick`. Nothing here touches a socket,
a task or the clock, so every rule below is tested with a fake clock and
made-up job results (``tests/test_conversation.py``); ``gateway/runner.py``
carries the commands out.

A turn:

1. Speech starts: an STT job opens and gets the pre-roll, then the audio as
   it arrives; the camera's latest frame goes to a vision job. An answer
   still playing is cut off (barge-in): playback stops, its jobs are
   cancelled, and the history keeps what was heard of it.
2. The person pauses (``speculate_after_ms``): the STT job is *flushed*, and
   its transcript starts the answer at once, *speculatively*: its events and
   audio are held back. If speech resumes, the answer is dropped and the same
   STT job goes on (nothing is replayed); the next pause flushes again.
3. The pause is confirmed as the end of the turn (``end_silence_ms``): the
   held answer plays, and the STT job, whose flushed transcript is the final
   one, is cancelled (its worker need not decode the same audio again).
4. The answer: the LLM's tokens stream to the client and into the
   :class:`~gateway.clauses.SpeechChunker`; its pieces stream into one TTS job
   per answer, whose audio is queued piece by piece on the answer track.
   The answer is over when its last audio has played; the history keeps it.

A typed question (``ask`` on the events channel) is a turn with no audio:
its text is the transcript, and its answer goes as a spoken turn's does
(step 4); it barges in on an answer still playing. ``interrupt`` stops the
answer as speaking over it would, except that it is always an interruption.

A job that fails moves to another worker by the rules of
``gateway/failover.py`` (one log line and one metric per move); a kind that
has no worker is told to the client as an error, and the session goes on.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from pydantic import BaseModel

from gateway.clauses import SpeechChunker
from stream import logs
from stream.config import GatewaySettings
from stream.protocol import WorkerKind
from stream.protocol.jobs import ChatMessage, LlmParams, SttParams, TtsParams, VisionParams, VisionResult

from .. import failover
from ..events import (
    AnswerDone,
    AnswerToken,
    BargeIn,
    ErrorEvent,
    Event,
    Latency,
    TranscriptFinal,
    TranscriptPartial,
    VisionText,
    Waiting,
)
from ..selection import Job as Placement
from ..selection import job_size
from . import commands as cmd
from .commands import Command
from .history import History, with_camera_context
from .inputs import (
    NO_WORKER,
    CameraFrame,
    Input,
    InterruptAnswer,
    JobFailed,
    JobFinished,
    JobRef,
    JobStarted,
    LineFull,
    ModelPin,
    PieceSpoken,
    Playing,
    PlayoutIdle,
    Seen,
    Speech,
    SpeechAudio,
    SpeechEnded,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    Tick,
    Token,
    Transcript,
    TypedQuestion,
    WorkerFreed,
)

log = logging.getLogger("edgestream.gateway")

STAGES = ("end_of_turn", "stt_final", "first_token", "first_clause", "first_tts_audio", "first_audio_sent")
"""The latency marks of a turn, in order (ms from the end of speech)."""


PINNED_KINDS = (WorkerKind.LLM, WorkerKind.TTS, WorkerKind.VISION)
"""Kinds whose model a conversation keeps once its first job chose one (the LLM's answers
and cache, the voice). STT is not pinned: a transcript is a transcript, and an utterance
may move between any two recognisers (an edgestream worker and a Wyoming server, say)."""

VISION_WAIT_S = 3.0
"""How long an answer waits for the camera's text before it starts without it."""


@dataclass(eq=False)
class _Glance:
    """A periodic look at the camera: its text is shown to the client, not asked about."""

    image: CameraFrame


@dataclass(eq=False)
class _Work:
    """One job of the conversation, across the workers it is moved to (each attempt has its own ref)."""

    kind: WorkerKind
    params: BaseModel
    placement: Placement
    owner: _Turn | _Answer | _Glance | None
    """What the job is for; ``None``: a prefill."""
    trace: str
    ref: JobRef | None = None
    """The attempt running now; ``None`` while it waits to ask again (busy)."""
    worker: str | None = None
    tried: set[str] = field(default_factory=set)
    attempts: int = 0
    busy_retries: int = 0
    busy_since: float | None = None
    """When a worker first refused this job as full (reset once one takes it)."""
    retry_at: float | None = None
    ticket: JobRef | None = None
    """Its place in the pool's waiting line while it waits (the refused attempt's ref)."""


@dataclass(eq=False)
class _Turn:
    number: int
    id: str
    """``<session>.<number>``: in every log line about the turn, here and on its workers."""
    audio: list[np.ndarray] = field(default_factory=list)
    """Everything heard in the turn: replayed into a new STT job if its worker is lost."""
    stt: _Work | None = None
    flushes_sent: int = 0
    flushes_answered: int = 0
    """Of the current STT attempt; a flushed transcript is current when they are equal."""
    flush_pending: bool = False
    """A flush was sent for the pause now going on, and not answered yet."""
    transcript: str | None = None
    """What the person said, as far as the pause now going on (or the end) is concerned."""
    vision: _Work | None = None
    image: CameraFrame | None = None
    seen: VisionResult | None = None
    speech_end: float | None = None
    """When speech ended, in the received audio (the clock of ``handle``)."""
    paused: bool = False
    ended: bool = False
    failed: bool = False
    superseded_by: _Turn | None = None
    """A turn that began before this one's transcript came: this one is asked as part of it."""
    earlier: str = ""
    """What the person said in turns superseded by this one."""
    marks: dict[str, float] = field(default_factory=dict)
    workers: dict[str, str] = field(default_factory=dict)
    answer: _Answer | None = None

    def mark(self, stage: str, now: float) -> None:
        if stage not in self.marks and self.speech_end is not None:
            self.marks[stage] = round((now - self.speech_end) * 1000, 1)


@dataclass(eq=False)
class _Answer:
    turn: _Turn
    chunker: SpeechChunker
    question: str = ""
    """The user message as the LLM got it (and the history keeps it)."""
    params: LlmParams | None = None
    llm: _Work | None = None
    tts: _Work | None = None
    confirmed: bool = False
    held: list[Command] = field(default_factory=list)
    """Events and audio of a speculative answer, released when the turn's end is confirmed."""
    text: str = ""
    tokens: int = 0
    pieces: list[str] = field(default_factory=list)
    tts_base: int = 0
    """Index of the first piece the current TTS attempt was given."""
    spoken_in_attempt: int = 0
    pieces_started: int = 0
    """Pieces whose audio has started playing."""
    waiting_for_vision_until: float | None = None
    generated: bool = False
    truncated: bool = False
    speech_done: bool = False
    speechless: bool = False
    """No TTS worker: the answer is text only."""
    audio_queued: bool = False
    """Audio was queued on the answer track since it last reported idle."""
    gap_since: float | None = None
    """When the answer track ran out of audio before the answer's end (the next piece was late)."""
    gaps: int = 0
    gap_s: float = 0.0
    """Times the answer's audio ran out before its end, and the silence that made in all."""
    latency_sent: bool = False
    over: bool = False

    @property
    def all_audio_made(self) -> bool:
        """Every word of the answer is generated and spoken by TTS (or it has no speech): no more audio is coming."""
        return self.generated and (self.speech_done or self.speechless)

    @property
    def pieces_spoken(self) -> int:
        return self.tts_base + self.spoken_in_attempt


class Conversation:
    """The policy of one session's conversation (see the module docstring)."""

    def __init__(self, settings: GatewaySettings, session_id: str) -> None:
        self.settings = settings
        self.session_id = session_id
        self.history = History(settings.system_prompt, settings.max_history_turns)
        self.models: dict[WorkerKind, ModelPin] = {}
        """The model (id, sha256) this conversation uses per kind, fixed by its first job."""
        self.warm_llm: str | None = None
        """The LLM worker that answered last: it holds this conversation's prompt in its cache."""
        self.turns = 0
        self.current: _Turn | None = None
        """The turn the person is speaking (until its end is confirmed)."""
        self.answer: _Answer | None = None
        """The latest answer, until it is over."""
        self.last_prompt: list = []
        self.failovers = 0
        self.speculations_dropped = 0
        self._unresolved: _Turn | None = None
        """The last turn that ended before its transcript came."""
        self._last_turn: _Turn | None = None
        self._live: dict[JobRef, _Work] = {}
        self._waiting: list[_Work] = []
        """Jobs refused as busy, waiting to ask again."""
        self._look: _Work | None = None
        """The periodic look at the camera in flight."""
        self._trimmed_prefilled: list[ChatMessage] | None = None
        """The trimmed context last prefilled ahead (so it is not prefilled again once heard)."""
        self._prefilling: _Work | None = None
        """The prefill in flight (``LlmParams.prefill``): of the question being spoken, or of a trimmed history."""
        self._camera_at: float | None = None
        self._serials = itertools.count(1)
        self._out: list[Command] = []
        self._now = 0.0

    # -- the interface ------------------------------------------------------------------

    def handle(self, event: Input, now: float) -> list[Command]:
        """Take ``event`` at time ``now``; return the commands it leads to, in order."""
        self._now = now
        handler = self._handlers.get(type(event))
        if handler is None:
            raise TypeError(f"not a conversation input: {event!r}")
        if isinstance(event, _OUTPUTS) and (work := self._live.get(event.job)) is not None:
            work.busy_since, work.busy_retries = None, 0  # a worker took it: a later refusal is a new wait
        with logs.bound(session=self.session_id, turn=self._turn_label(event)):
            handler(self, event)
            self._timers_due()
        out, self._out = self._out, []
        return out

    def _turn_label(self, event: Input) -> str | None:
        """The id of the turn ``event`` is about, for the log records it leads to."""
        job = getattr(event, "job", None)
        if job is not None:
            work = self._live.get(job)
            return work.trace if work is not None else None
        number = getattr(event, "turn", None)
        if number is None and isinstance(event, SpeechStarted):
            number = self.turns + 1
        elif number is None and self.current is not None:
            number = self.current.number
        return logs.turn_label(self.session_id, number) if number is not None else None

    def next_timer(self) -> float | None:
        """When :class:`~.inputs.Tick` is next due (``None``: no timer)."""
        times = [w.retry_at for w in self._waiting if w.retry_at is not None]
        if self.answer is not None and self.answer.waiting_for_vision_until is not None:
            times.append(self.answer.waiting_for_vision_until)
        if self._camera_at is not None:
            times.append(self._camera_at)
        return min(times, default=None)

    @property
    def live_jobs(self) -> list[JobRef]:
        """Jobs open on workers now."""
        return list(self._live)

    def close(self) -> list[Command]:
        """The session ends: cancel every job."""
        out: list[Command] = [cmd.CancelJob(ref) for ref in self._live]
        self._live.clear()
        for work in self._waiting:
            if work.ticket is not None:
                out.append(cmd.StopWaiting(work.ticket, work.kind))
        self._waiting.clear()
        return out

    # -- the person -------------------------------------------------------------------

    def _speech_started(self, event: SpeechStarted) -> None:
        carried = ""
        if (answer := self._answer_under_way()) is not None:
            carried = self._barge_in(answer)
        self.turns += 1
        turn = _Turn(self.turns, logs.turn_label(self.session_id, self.turns), earlier=carried)
        if self._unresolved is not None:
            self._unresolved.superseded_by = turn
        self.current = self._last_turn = turn
        turn.audio.append(event.preroll)
        turn.stt = self._work(WorkerKind.STT, SttParams(), Placement(WorkerKind.STT), turn)
        self._start(turn.stt)
        if self.settings.vision_on_turn:
            self._out.append(cmd.LookAtCamera(turn.number))

    def _speech_audio(self, event: SpeechAudio) -> None:
        turn = self.current
        if turn is None:
            return
        turn.audio.append(event.samples)
        if turn.stt is not None and turn.stt.ref is not None:
            self._out.append(cmd.SendAudio(turn.stt.ref, event.samples))

    def _speech_paused(self, event: SpeechPaused) -> None:
        turn = self.current
        if turn is None:
            return
        turn.paused = True
        turn.speech_end = self._now - (event.stream_s - event.speech_end_s)
        turn.marks.clear()
        if turn.stt is not None:
            turn.flush_pending = True
            if turn.stt.ref is not None:
                turn.flushes_sent += 1
                self._out.append(cmd.FlushInput(turn.stt.ref))

    def _speech_resumed(self, event: SpeechResumed) -> None:
        turn = self.current
        if turn is None:
            return
        turn.paused = False
        turn.flush_pending = False
        turn.transcript = None
        turn.marks.clear()
        if turn.answer is not None:
            self._drop(turn.answer)

    def _speech_ended(self, event: SpeechEnded) -> None:
        turn, self.current = self.current, None
        if turn is None:
            return
        if event.cut:
            limit = self.settings.max_utterance_s
            log.info("turn %s: cut at %g s (max_utterance_s)", turn.id, limit)
            self._out.append(
                cmd.Emit(
                    ErrorEvent(
                        code="utterance_too_long",
                        message=f"you spoke for {limit:g} s without a pause; this turn ends there and is answered, and what follows starts the next",
                        turn=turn.number,
                    )
                )
            )
            if turn.answer is not None:
                self._drop(turn.answer)
            turn.paused = turn.flush_pending = False
            turn.transcript = None
        if not turn.paused:
            turn.speech_end = self._now - (event.stream_s - event.speech_end_s)
            turn.marks.clear()
        turn.ended = True
        turn.mark("end_of_turn", self._now)
        if turn.failed and turn.answer is None:  # nothing was heard (its STT failed): nothing to answer
            return
        if turn.transcript is not None:
            self._stt_done(turn)
        elif not turn.flush_pending:
            self._unresolved = turn
            if turn.stt is not None and turn.stt.ref is not None:
                self._out.append(cmd.EndInput(turn.stt.ref))
        else:
            self._unresolved = turn  # the pending flush's transcript is the final one
        if turn.answer is not None:
            self._confirm(turn.answer)

    def _typed_question(self, event: TypedQuestion) -> None:
        if self.current is not None or self._unresolved is not None:
            # Its answer would race the spoken turn's; that one is heard first.
            message = "a spoken question is still being heard; send the typed one once it is answered"
            self._out.append(cmd.Emit(ErrorEvent(code="still_listening", message=message)))
            return
        if (answer := self._answer_under_way()) is not None:
            self._barge_in(answer, explicit=True)
        self.turns += 1
        turn = _Turn(self.turns, logs.turn_label(self.session_id, self.turns), transcript=event.text, speech_end=self._now, ended=True)
        turn.mark("end_of_turn", self._now)
        turn.mark("stt_final", self._now)
        self._last_turn = turn
        log.info("turn %s: a typed question (%d characters)", turn.id, len(event.text))
        self._transcribed(turn)

    def _interrupt(self, event: InterruptAnswer) -> None:
        if (answer := self._answer_under_way()) is None:
            log.info("interrupt: no answer is playing")
            return
        self._barge_in(answer, explicit=True)

    def _answer_under_way(self) -> _Answer | None:
        """The answer being generated or played for the person (not a speculative one), if any."""
        answer = self.answer
        return answer if answer is not None and answer.confirmed and not answer.over else None

    def _camera_frame(self, event: CameraFrame) -> None:
        params = VisionParams(describe=True)
        if event.periodic:
            if self._look is None:  # its text is shown, not asked about
                self._look = self._work(WorkerKind.VISION, params, Placement(WorkerKind.VISION), _Glance(event))
                self._start(self._look)
            return
        turn = self._last_turn
        if turn is not None and turn.number == event.turn and turn.image is None and turn.answer is None:
            turn.image = event
            turn.vision = self._work(WorkerKind.VISION, params, Placement(WorkerKind.VISION), turn)
            self._start(turn.vision)

    # -- job events ---------------------------------------------------------------------

    def _job_started(self, event: JobStarted) -> None:
        work = self._live.get(event.job)
        if work is None:
            return
        work.worker = event.worker
        self.models.setdefault(work.kind, event.model)
        turn = self._turn_of(work)
        if turn is not None:
            turn.workers[work.kind.value] = event.worker

    def _transcript(self, event: Transcript) -> None:
        work = self._live.get(event.job)
        if work is None or not isinstance(work.owner, _Turn):
            return
        turn = work.owner
        if not (event.final or event.flushed):
            if not turn.ended and turn.transcript is None:
                self._out.append(cmd.Emit(TranscriptPartial(turn=turn.number, text=event.text)))
                self._prefill_question(turn, event.text)
            return
        if event.flushed:
            turn.flushes_answered += 1
            if not turn.flush_pending or turn.flushes_answered != turn.flushes_sent:
                return  # speech resumed since that flush: a later one will come
            turn.flush_pending = False
        else:  # the job ends with its final result
            self._live.pop(event.job, None)
            turn.stt = None
        turn.transcript = event.text
        turn.mark("stt_final", self._now)
        if turn.ended:
            self._stt_done(turn)
        self._transcribed(turn)

    def _token(self, event: Token) -> None:
        work = self._live.get(event.job)
        if work is None or not isinstance(work.owner, _Answer):
            return
        answer = work.owner
        answer.text += event.text
        answer.tokens += 1
        answer.turn.mark("first_token", self._now)
        self._answer_event(answer, AnswerToken(turn=answer.turn.number, text=event.text))
        for piece in answer.chunker.feed(event.text):
            self._say(answer, piece)

    def _speech(self, event: Speech) -> None:
        work = self._live.get(event.job)
        if work is None or not isinstance(work.owner, _Answer):
            return
        answer = work.owner
        answer.turn.mark("first_tts_audio", self._now)
        play = cmd.Play(answer.turn.number, answer.pieces_spoken, event.samples, event.sample_rate)
        if answer.confirmed:
            self._out.append(play)
            answer.audio_queued = True
        else:
            answer.held.append(play)

    def _piece_spoken(self, event: PieceSpoken) -> None:
        work = self._live.get(event.job)
        if work is not None and isinstance(work.owner, _Answer):
            work.owner.spoken_in_attempt += 1

    def _seen(self, event: Seen) -> None:
        work = self._live.get(event.job)
        if work is None:
            return
        if isinstance(work.owner, _Glance):
            glance = work.owner.image.turn
            self._out.append(cmd.Emit(VisionText(turn=glance, text=event.result.text, description=event.result.description)))
            return
        turn = self._turn_of(work)
        if turn is None:
            return
        turn.seen = event.result
        self._out.append(cmd.Emit(VisionText(turn=turn.number, text=event.result.text, description=event.result.description)))

    def _job_finished(self, event: JobFinished) -> None:
        work = self._live.pop(event.job, None)
        if work is None:
            return
        if work.kind is WorkerKind.LLM:
            self.warm_llm = work.worker
        if work is self._look:
            self._look = None
        if work is self._prefilling:
            self._prefilling = None
        if isinstance(work.owner, _Turn) and work.kind is WorkerKind.VISION:
            self._vision_done(work.owner)
        elif isinstance(work.owner, _Answer):
            answer = work.owner
            if work.kind is WorkerKind.LLM:
                if event.stats.get("message_cut_tokens"):
                    log.warning(
                        "turn %s: the question was too long for the LLM's context; its first %d tokens were cut", work.trace, event.stats["message_cut_tokens"]
                    )
                self._generated(answer, truncated=bool(event.stats.get("truncated")))
            else:
                answer.speech_done = True
                self._maybe_over(answer)

    def _job_failed(self, event: JobFailed) -> None:
        work = self._live.pop(event.job, None)
        if work is None:
            return
        work.ref = None
        if event.worker is not None and event.code != failover.BUSY:  # a full worker is asked again
            work.tried.add(event.worker)
        if work is self._prefilling:  # only a head start: not worth waiting or moving for
            self._prefilling = None
            log.info("prefill for turn %s dropped: %s: %s", work.trace, event.code, event.message)
            return
        if event.code == failover.BUSY:
            if work.busy_since is None:
                work.busy_since = self._now
            wait_s = self.settings.busy_wait_s
            delay = failover.busy_retry_in(work.busy_retries, self._now - work.busy_since, wait_s)
            if delay is not None:
                if work.busy_retries == 0 and work.owner is not None and not isinstance(work.owner, _Glance):
                    message = f"every {work.kind.value} worker is busy; this turn waits for one (up to {wait_s:g} s)"
                    self._out.append(cmd.Emit(Waiting(kind=work.kind.value, turn=self._turn_of(work).number, wait_s=wait_s, message=message)))
                work.busy_retries += 1
                work.retry_at = self._now + delay
                work.ticket = event.job
                self._waiting.append(work)
                self._out.append(cmd.WaitForWorker(event.job, work.kind, work.busy_since))
                log.info("%s job of turn %s: %s is full; waiting (asking again in %.0f ms at most)", work.kind.value, work.trace, event.worker, delay * 1000)
                return
        elif work.owner is not None and failover.fails_over(event.code, len(work.tried)):
            work.busy_since, work.busy_retries = None, 0  # another worker: a refusal there is a new wait
            self.failovers += 1
            self._out.append(cmd.CountFailover(work.kind))
            log.warning(
                "%s job of turn %s failed on %s (%s: %s); %s",
                work.kind.value,
                work.trace,
                event.worker,
                event.code,
                event.message,
                _NEXT_STEP[work.kind],
            )
            self._start(work)
            return
        self._gave_up(work, event)

    # -- the answer track ----------------------------------------------------------------

    def _playing(self, event: Playing) -> None:
        answer = self.answer
        if answer is None or answer.turn.number != event.turn:
            return
        answer.pieces_started = max(answer.pieces_started, event.piece + 1)
        if answer.gap_since is not None:
            answer.gaps += 1
            answer.gap_s += max(0.0, self._now - answer.gap_since)
            answer.gap_since = None
        turn = answer.turn
        if "first_audio_sent" not in turn.marks and turn.speech_end is not None:
            turn.marks["first_audio_sent"] = round((event.at - turn.speech_end) * 1000, 1)
            self._report_latency(answer)

    def _playout_idle(self, event: PlayoutIdle) -> None:
        answer = self.answer
        if answer is not None and answer.turn.number == event.turn:
            answer.audio_queued = False
            if not answer.all_audio_made:
                answer.gap_since = self._now  # more is coming: silence until it does
            self._maybe_over(answer)

    def _tick(self, event: Tick) -> None:
        if self.settings.vision_interval_s > 0 and self._camera_at is None:
            self._camera_at = self._now + self.settings.vision_interval_s

    def _worker_freed(self, event: WorkerFreed) -> None:
        work = self._let_go(event.ticket)
        if work is not None:
            self._start(work)

    def _line_full(self, event: LineFull) -> None:
        work = self._let_go(event.ticket)
        if work is not None:
            message = f"{event.waiting} {work.kind.value} jobs are waiting for a worker already (the most)"
            self._gave_up(work, JobFailed(event.ticket, failover.BUSY, message))

    def _let_go(self, ticket: JobRef) -> _Work | None:
        """The job the line let go of (it woke it, or had no place for it), out of waiting; ``None``: gone."""
        work = next((w for w in self._waiting if w.ticket == ticket), None)
        if work is not None:
            work.ticket = None  # the line no longer holds it: nothing to leave
            self._stop_waiting(work)
        return work

    def _stop_waiting(self, work: _Work) -> None:
        self._waiting.remove(work)
        work.retry_at = None
        if work.ticket is not None:
            self._out.append(cmd.StopWaiting(work.ticket, work.kind))
            work.ticket = None

    def _timers_due(self) -> None:
        now = self._now
        for work in [w for w in self._waiting if w.retry_at is not None and w.retry_at <= now]:
            self._stop_waiting(work)
            self._start(work)
        answer = self.answer
        if answer is not None and answer.waiting_for_vision_until is not None and answer.waiting_for_vision_until <= now:
            log.info("turn %s: no camera text within %g s; answering without it", answer.turn.id, VISION_WAIT_S)
            self._ask(answer)
        if self._camera_at is not None and self._camera_at <= now:
            self._camera_at = now + self.settings.vision_interval_s
            if self._look is None:
                self._out.append(cmd.LookAtCamera(self.turns, periodic=True))

    # -- jobs ---------------------------------------------------------------------------

    def _work(self, kind: WorkerKind, params: BaseModel, placement: Placement, owner: _Turn | _Answer | _Glance | None) -> _Work:
        turn = owner if isinstance(owner, _Turn) else owner.turn if isinstance(owner, _Answer) else None
        trace = turn.id if turn is not None else logs.turn_label(self.session_id, self.turns)
        return _Work(kind, params, placement, owner, trace)

    def _start(self, work: _Work) -> None:
        """Open ``work`` on a worker it was not tried on, and give it everything it needs so far."""
        if work.kind is WorkerKind.LLM and isinstance(work.owner, _Answer):
            answer = work.owner
            assert answer.params is not None
            work.params = failover.llm_continuation(answer.params, answer.text, answer.tokens)
        work.ref = JobRef(work.kind, next(self._serials))
        work.attempts += 1
        self._live[work.ref] = work
        pin = self.models.get(work.kind) if work.kind in PINNED_KINDS else None
        self._out.append(cmd.StartJob(work.ref, work.params, work.placement, pin, frozenset(work.tried), work.trace))
        ref, owner = work.ref, work.owner
        if work.kind is WorkerKind.STT and isinstance(owner, _Turn):
            self._out.append(cmd.SendAudio(ref, failover.stt_replay(owner.audio)))
            owner.flushes_sent = owner.flushes_answered = 0
            if owner.flush_pending:
                owner.flushes_sent = 1
                self._out.append(cmd.FlushInput(ref))
            elif owner.ended:
                self._out.append(cmd.EndInput(ref))
        elif work.kind is WorkerKind.VISION and isinstance(owner, _Turn | _Glance):
            assert owner.image is not None
            self._out += [cmd.SendImage(ref, owner.image.data, owner.image.format), cmd.EndInput(ref)]
        elif work.kind is WorkerKind.TTS and isinstance(owner, _Answer):
            owner.tts_base = owner.pieces_spoken  # the first piece not completely spoken is synthesized again
            owner.spoken_in_attempt = 0
            if work.attempts > 1:  # what was queued of the piece being spoken will be spoken again
                self._out.append(cmd.Unplay(owner.turn.number, owner.tts_base))
            self._out += [cmd.SendText(ref, piece) for piece in owner.pieces[owner.tts_base :]]
            if owner.generated:
                self._out.append(cmd.EndInput(ref))
        elif work.kind is WorkerKind.LLM:
            self._out.append(cmd.EndInput(ref))

    def _cancel(self, work: _Work | None) -> None:
        if work is None:
            return
        if work in self._waiting:
            self._stop_waiting(work)
        if work.ref is not None and self._live.pop(work.ref, None) is not None:
            self._out.append(cmd.CancelJob(work.ref))
        work.ref = None

    def _gave_up(self, work: _Work, event: JobFailed) -> None:
        """``work`` can go nowhere: what that means depends on what it was for."""
        owner = work.owner
        reason = f"{event.code}: {event.message}" if event.code != NO_WORKER else event.message
        if owner is None or isinstance(owner, _Glance):
            log.info("%s job (%s) dropped: %s", work.kind.value, "prefill" if owner is None else "camera", reason)
            if work is self._look:
                self._look = None
            return
        if work.kind is WorkerKind.VISION:
            log.info("vision skipped for turn %s: %s", work.trace, reason)
            assert isinstance(owner, _Turn)
            self._vision_done(owner)
            return
        code = NO_WORKER if event.code == NO_WORKER else f"{work.kind.value}_failed"
        log.warning("turn %s failed: %s job: %s", work.trace, work.kind.value, reason)
        if work.kind is WorkerKind.STT:
            assert isinstance(owner, _Turn)
            owner.failed = True
            owner.stt = None
            if owner is self._unresolved:
                self._unresolved = None
        failure = [cmd.Emit(ErrorEvent(code=code, message=event.message, turn=self._turn_of(work).number)), cmd.CountTurn("failed")]
        if isinstance(owner, _Answer) and not owner.confirmed:
            owner.held += failure  # told once the turn is confirmed, after its transcript; never if speech resumes
        else:
            self._out += failure
        if isinstance(owner, _Answer):
            if work.kind is WorkerKind.TTS:  # the answer goes on as text
                owner.speechless = True
                owner.tts = None
                owner.turn.failed = True
                self._maybe_over(owner)
            else:
                owner.over = True
                self._cancel(owner.tts)
                if self.answer is owner:
                    self.answer = None

    @staticmethod
    def _turn_of(work: _Work) -> _Turn | None:
        """The turn a job is for (``None`` for a prefill or a periodic look)."""
        owner = work.owner
        return owner if isinstance(owner, _Turn) else owner.turn if isinstance(owner, _Answer) else None

    # -- turn and answer ----------------------------------------------------------------

    def _stt_done(self, turn: _Turn) -> None:
        """The turn's transcript is final: its STT job is no longer needed."""
        if turn.stt is not None:
            self._cancel(turn.stt)
            turn.stt = None
        if self._unresolved is turn:
            self._unresolved = None

    def _transcribed(self, turn: _Turn) -> None:
        """The turn has a transcript (final, or as of the pause now going on): start its answer."""
        text = (turn.earlier + " " + (turn.transcript or "")).strip()
        later = turn.superseded_by
        if later is not None:
            self._out.append(cmd.Emit(TranscriptFinal(turn=turn.number, text=turn.transcript or "")))
            if later.answer is None and text:
                later.earlier = (later.earlier + " " + text).strip()
                log.info("turn %s: the person went on before it was answered; it is asked with turn %d", turn.id, later.number)
            self._out.append(cmd.CountTurn("merged"))
            return
        answer = _Answer(turn, SpeechChunker(self.settings.first_piece_words))
        answer.confirmed = turn.ended
        turn.answer = answer
        self._answer_event(answer, TranscriptFinal(turn=turn.number, text=turn.transcript or ""))
        if not text.strip():
            answer.generated = answer.speech_done = True
            if answer.confirmed:
                self._empty(answer)
            return
        self.answer = answer
        answer.question = text
        if turn.vision is not None:  # its text is on the way
            answer.waiting_for_vision_until = self._now + VISION_WAIT_S
            return
        self._ask(answer)

    def _vision_done(self, turn: _Turn) -> None:
        turn.vision = None
        answer = turn.answer
        if answer is not None and answer.waiting_for_vision_until is not None:
            self._ask(answer)

    def _ask(self, answer: _Answer) -> None:
        answer.waiting_for_vision_until = None
        answer.question = with_camera_context(answer.question, answer.turn.seen)
        self.last_prompt = self.history.prompt(answer.question)
        answer.params = LlmParams(messages=self.last_prompt, max_tokens=self.settings.max_answer_tokens)
        total = sum(len(m.content) for m in self.last_prompt)
        new = len(answer.question) + self.history.new_chars()
        placement = Placement(
            WorkerKind.LLM,
            size=job_size(WorkerKind.LLM, prompt_chars=total),
            warm_worker=self.warm_llm,
            warm_size=job_size(WorkerKind.LLM, prompt_chars=new),
        )
        answer.llm = self._work(WorkerKind.LLM, answer.params, placement, answer)
        self._start(answer.llm)

    def _say(self, answer: _Answer, piece: str) -> None:
        """A piece of the answer is cut: speak it."""
        answer.turn.mark("first_clause", self._now)
        answer.pieces.append(piece)
        if answer.speechless:
            return
        if answer.tts is None:
            placement = Placement(WorkerKind.TTS, size=job_size(WorkerKind.TTS, text=piece))
            answer.tts = self._work(WorkerKind.TTS, TtsParams(), placement, answer)
            self._start(answer.tts)
        elif answer.tts.ref is not None:
            self._out.append(cmd.SendText(answer.tts.ref, piece))

    def _generated(self, answer: _Answer, truncated: bool) -> None:
        answer.truncated = truncated
        answer.llm = None
        for piece in answer.chunker.flush():
            self._say(answer, piece)
        answer.generated = True  # after the last pieces: a TTS job they start gets its end below, once
        self._prefill_trimmed(answer)
        if answer.tts is None:
            answer.speech_done = True
        elif answer.tts.ref is not None:
            self._out.append(cmd.EndInput(answer.tts.ref))
        self._maybe_over(answer)

    def _answer_event(self, answer: _Answer, event: Event) -> None:
        """Send an answer's event, or hold it while the answer is speculative."""
        if answer.confirmed:
            self._out.append(cmd.Emit(event))
        else:
            answer.held.append(cmd.Emit(event))

    def _confirm(self, answer: _Answer) -> None:
        """The turn really ended: the held answer plays."""
        answer.confirmed = True
        self._prefill_trimmed(answer)
        held, answer.held = answer.held, []
        self._out += held
        if any(isinstance(c, cmd.Play) for c in held):
            answer.audio_queued = True
        if not answer.question:
            self._empty(answer)
        else:
            self._maybe_over(answer)

    def _empty(self, answer: _Answer) -> None:
        answer.over = True
        log.info("turn %s: nothing recognised", answer.turn.id)
        self._out.append(cmd.CountTurn("empty"))

    def _drop(self, answer: _Answer) -> None:
        """Speech resumed: the speculative answer was wrong. Nothing of it was sent."""
        self.speculations_dropped += 1
        self._cancel(answer.llm)
        self._cancel(answer.tts)
        answer.over = True
        answer.held.clear()
        answer.turn.answer = None
        if self.answer is answer:
            self.answer = None

    def _barge_in(self, answer: _Answer, explicit: bool = False) -> str:
        """The person spoke over the answer (or, ``explicit``, asked it to stop): stop it,
        and remember what they heard of it.

        If they spoke before hearing anything of it (a pause just past the end
        of the turn, then more words), they were not interrupting but going
        on: the answer is dropped, and what they said is asked again with what
        follows. Returns that, or ``""``.
        """
        self._out.append(cmd.StopPlayback())
        self._cancel(answer.llm)
        self._cancel(answer.tts)
        answer.over = True
        self.answer = None
        number = answer.turn.number
        if not explicit and not answer.speechless and answer.pieces_started == 0:
            log.info("turn %s: the person went on before its answer was heard; it is asked with the next turn", answer.turn.id)
            self._out += [cmd.Emit(AnswerDone(turn=number, text=answer.text, interrupted=True)), cmd.CountTurn("merged")]
            return (answer.turn.earlier + " " + (answer.turn.transcript or "")).strip()
        if answer.speechless:
            heard = answer.text
        else:
            heard = " ".join(answer.pieces[: answer.pieces_started])
        log.info("turn %s: answer interrupted after %d tokens, %d pieces heard", answer.turn.id, answer.tokens, answer.pieces_started)
        self._remember(answer.question, (heard + " ...") if heard else "...")
        self._out += [
            cmd.Emit(BargeIn(turn=number)),
            cmd.Emit(AnswerDone(turn=number, text=answer.text, interrupted=True)),
            cmd.CountTurn("interrupted"),
        ]
        return ""

    def _maybe_over(self, answer: _Answer) -> None:
        """The answer is over once it is confirmed, generated, spoken and played."""
        if answer.over or not answer.confirmed or not answer.all_audio_made or answer.audio_queued:
            return
        answer.over = True
        if self.answer is answer:
            self.answer = None
        number = answer.turn.number
        self._remember(answer.question, answer.text)
        done = AnswerDone(turn=number, text=answer.text, truncated=answer.truncated, gaps=answer.gaps, gap_ms=round(answer.gap_s * 1000, 1))
        self._out.append(cmd.Emit(done))
        if answer.truncated:
            self._out.append(
                cmd.Emit(
                    ErrorEvent(
                        code="answer_truncated",
                        message=f"the answer reached max_answer_tokens ({self.settings.max_answer_tokens}) and was cut there",
                        turn=number,
                    )
                )
            )
        if not answer.turn.failed:
            self._out.append(cmd.CountTurn("answered"))
        self._report_latency(answer)

    def _report_latency(self, answer: _Answer) -> None:
        if answer.latency_sent:
            return
        answer.latency_sent = True
        turn = answer.turn
        marks = {"end_of_turn": 0.0, "stt_final": 0.0, **turn.marks}
        log.info("turn %s answered: voice-to-voice %s ms, workers %s", turn.id, marks.get("first_audio_sent"), turn.workers)
        self._out += [
            cmd.ObserveStages(marks),
            cmd.Emit(Latency(turn=turn.number, workers=dict(turn.workers), **marks)),
        ]

    def _remember(self, question: str, answer: str) -> None:
        if self.history.remember(question, answer) and (context := self.history.context()) != self._trimmed_prefilled:
            # The prompt's prefix changed, and not as prefilled when the answer was complete
            # (it was interrupted): have it evaluated now, not when the next question waits for it.
            self._prefill(context)

    def _prefill_trimmed(self, answer: _Answer) -> None:
        """A confirmed answer, complete, that will trim the history: evaluate the trimmed
        context now, while the answer plays (seconds of prompt on a small box)."""
        if not (answer.confirmed and answer.generated and answer.question):
            return
        context = self.history.context_if_trimmed(answer.question, answer.text)
        if context is not None and self._prefill(context):
            self._trimmed_prefilled = context

    def _prefill_question(self, turn: _Turn, partial: str) -> None:
        """Have the LLM worker evaluate the question as heard so far, while the person still speaks.

        The answer's prompt will extend it (the camera's text comes after the
        question), so its first token waits only for the last few words.
        """
        question = (turn.earlier + " " + partial).strip()
        if self.settings.prefill_while_speaking and question:
            self._prefill(self.history.prompt(question), new_chars=len(question) + self.history.new_chars())

    def _prefill(self, messages: list[ChatMessage], new_chars: int | None = None) -> bool:
        """One prefill at a time per conversation; one asked for while another runs is skipped
        (returns whether this one was sent). ``new_chars``: what the warm worker has not seen
        (``None``: all of it, a changed prefix)."""
        if self._prefilling is not None:
            return False
        total = sum(len(m.content) for m in messages)
        new_chars = total if new_chars is None else new_chars
        placement = Placement(
            WorkerKind.LLM,
            size=job_size(WorkerKind.LLM, prompt_chars=total),
            warm_worker=self.warm_llm,
            warm_size=job_size(WorkerKind.LLM, prompt_chars=new_chars),
        )
        self._prefilling = self._work(WorkerKind.LLM, LlmParams(messages=messages, max_tokens=1, prefill=True), placement, None)
        self._start(self._prefilling)
        return True

    _handlers: ClassVar[dict[type, Callable[[Conversation, object], None]]] = {
        SpeechStarted: _speech_started,
        SpeechAudio: _speech_audio,
        SpeechPaused: _speech_paused,
        SpeechResumed: _speech_resumed,
        SpeechEnded: _speech_ended,
        CameraFrame: _camera_frame,
        TypedQuestion: _typed_question,
        InterruptAnswer: _interrupt,
        JobStarted: _job_started,
        Transcript: _transcript,
        Token: _token,
        Speech: _speech,
        PieceSpoken: _piece_spoken,
        Seen: _seen,
        JobFinished: _job_finished,
        JobFailed: _job_failed,
        Playing: _playing,
        PlayoutIdle: _playout_idle,
        WorkerFreed: _worker_freed,
        LineFull: _line_full,
        Tick: _tick,
    }


_OUTPUTS = (Transcript, Token, Speech, PieceSpoken, Seen, JobFinished)
"""What a job gives once a worker has taken it (``JobStarted`` is only the lease: the worker may still refuse)."""

_NEXT_STEP = {
    WorkerKind.STT: "the utterance is replayed to another worker",
    WorkerKind.LLM: "the answer continues on another worker",
    WorkerKind.TTS: "speech resumes on another worker at the first piece not spoken",
    WorkerKind.VISION: "the frame goes to another worker",
}
