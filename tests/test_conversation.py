"""The conversation core with a fake clock and made-up job results: no sockets, no models, no tasks.

Each test plays what the person, the workers and the answer track would do,
and checks the commands the conversation gives. ``Talk`` stands in for the
runner: it hands the conversation events at chosen times and keeps every
command it got back.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import pytest

from gateway import failover
from gateway.conversation import Conversation
from gateway.conversation import commands as cmd
from gateway.conversation.inputs import (
    NO_WORKER,
    CameraFrame,
    InterruptAnswer,
    JobFailed,
    JobFinished,
    JobRef,
    JobStarted,
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
)
from gateway.events import AnswerDone, AnswerToken, BargeIn, ErrorEvent, Latency, TranscriptFinal, TranscriptPartial, VisionText
from stream.config import GatewaySettings
from stream.protocol import MediaFormat, WorkerKind
from stream.protocol.jobs import LlmParams, OcrLine, VisionResult

STT, LLM, TTS, VISION = WorkerKind.STT, WorkerKind.LLM, WorkerKind.TTS, WorkerKind.VISION
C = TypeVar("C")
MODEL = ("model", "0" * 64)


def pcm(samples: int = 512, value: int = 100) -> np.ndarray:
    return np.full(samples, value, np.int16)


class Talk:
    """A conversation, a fake clock, and every command it has given."""

    def __init__(self, **settings: object) -> None:
        defaults = {"vision_on_turn": False, "first_piece_words": 4}  # the pieces these tests expect
        self.conversation = Conversation(GatewaySettings(**{**defaults, **settings}), "s1")
        self.now = 100.0
        self.commands: list[cmd.Command] = []
        self.mark = 0
        self.stream_s = 0.0

    def __call__(self, event: object, after_s: float = 0.0) -> list[cmd.Command]:
        self.now += after_s
        out = self.conversation.handle(event, self.now)
        self.commands += out
        return out

    def wait(self, seconds: float) -> list[cmd.Command]:
        """Let ``seconds`` pass, ticking the conversation whenever it asked to be."""
        end, out = self.now + seconds, []
        while (due := self.conversation.next_timer()) is not None and due <= end:
            out += self(Tick(), after_s=max(0.0, due - self.now))
        self.now = end
        return out

    def new(self) -> list[cmd.Command]:
        """The commands since the last call."""
        out, self.mark = self.commands[self.mark :], len(self.commands)
        return out

    # -- what the person does ------------------------------------------------------------

    def speak(self, seconds: float = 1.0) -> None:
        self(SpeechStarted(pcm(4096, 7), self.stream_s))
        for _ in range(int(seconds / 0.032)):
            self.stream_s += 0.032
            self(SpeechAudio(pcm(512)), after_s=0.032)

    def pause(self) -> None:
        """128 ms of silence after speech: the turn is probably over."""
        self.stream_s += 0.128
        self(SpeechPaused(self.stream_s - 0.128, self.stream_s), after_s=0.128)

    def resume(self) -> None:
        self.stream_s += 0.032
        self(SpeechResumed(self.stream_s), after_s=0.032)
        self(SpeechAudio(pcm(512)))

    def end(self, after_s: float = 0.192) -> None:
        """The silence reaches ``end_silence_ms``: the end of the turn is confirmed."""
        self.stream_s += after_s
        self(SpeechEnded(self.stream_s - 0.32, self.stream_s), after_s=after_s)

    # -- what the workers do ---------------------------------------------------------------

    def job(self, kind: WorkerKind, nth: int = -1) -> JobRef:
        return [c.job for c in self.commands if isinstance(c, cmd.StartJob) and c.job.kind is kind][nth]

    def start(self, kind: WorkerKind, worker: str = "") -> JobRef:
        ref = self.job(kind)
        self(JobStarted(ref, worker or f"{kind.value}-a", MODEL))
        return ref

    def tokens(self, *pieces: str, after_s: float = 0.01) -> None:
        for piece in pieces:
            self(Token(self.job(LLM), piece), after_s=after_s)

    # -- what came out ---------------------------------------------------------------------

    def of(self, kind: type[C], commands: list[cmd.Command] | None = None) -> list[C]:
        return [c for c in (self.commands if commands is None else commands) if isinstance(c, kind)]

    def events(self, kind: type[C], commands: list[cmd.Command] | None = None) -> list[C]:
        return [c.event for c in self.of(cmd.Emit, commands) if isinstance(c.event, kind)]


def asked(talk: Talk, question: str, llm_worker: str = "llm-a") -> JobRef:
    """A turn up to its answer's LLM job: speech, a pause, its flushed transcript, the end confirmed."""
    talk.speak()
    talk.pause()
    talk(Transcript(talk.start(STT), question, flushed=True))
    llm = talk.start(LLM, llm_worker)
    talk.end()
    return llm


def answered_turn(talk: Talk, words: str = "The capital of France is Paris.") -> None:
    """A whole turn: speech, pause, flushed transcript, confirmed end, answer spoken and played."""
    talk.speak()
    talk.start(STT)
    talk.pause()
    talk(Transcript(talk.job(STT), "What is the capital of France?", flushed=True), after_s=0.03)
    talk.start(LLM)
    talk.tokens(*[" " + w for w in words.split()])
    talk.end()
    talk(JobFinished(talk.job(LLM)))  # the last piece is cut when the answer is complete
    talk.start(TTS)
    turn = talk.conversation.turns
    texts = [t for t in talk.of(cmd.SendText) if t.job == talk.job(TTS)]
    for i, text in enumerate(texts):
        talk(Speech(talk.job(TTS), pcm(2205), 22050), after_s=0.02)
        talk(PieceSpoken(talk.job(TTS), text.text))
        if i == 0:
            talk(Playing(turn, 0, talk.now))
    talk(JobFinished(talk.job(TTS)))
    talk(PlayoutIdle(turn))


# -- a turn, from speech to the played answer ---------------------------------------------


def test_speech_opens_one_stt_job_that_hears_the_preroll_and_every_chunk():
    talk = Talk()
    talk.speak(0.32)
    started = talk.of(cmd.StartJob)
    assert [s.job.kind for s in started] == [STT]
    audio = talk.of(cmd.SendAudio)
    assert all(a.job == started[0].job for a in audio)
    assert len(audio[0].samples) == 4096 and len(audio) == 1 + 10  # the pre-roll, then each chunk


def test_a_pause_flushes_the_stt_job_and_its_transcript_starts_a_held_answer():
    talk = Talk()
    talk.speak()
    talk.start(STT)
    talk.pause()
    assert talk.of(cmd.FlushInput) == [cmd.FlushInput(talk.job(STT))]
    talk.new()
    talk(Transcript(talk.job(STT), "What is the capital of France?", flushed=True), after_s=0.04)
    start = talk.of(cmd.StartJob, talk.new())
    assert [s.job.kind for s in start] == [LLM]
    params = start[0].params
    assert isinstance(params, LlmParams) and params.messages[-1].content == "What is the capital of France?"
    talk.start(LLM)
    talk.tokens(" The", " capital", " of", " France", " is")
    out = talk.new()
    # The first piece is cut after four words and goes to a TTS job at once...
    assert [c.job.kind for c in talk.of(cmd.StartJob, out)] == [TTS]
    assert [c.text for c in talk.of(cmd.SendText, out)] == ["The capital of France"]
    talk.start(TTS)
    talk(Speech(talk.job(TTS), pcm(2205), 22050), after_s=0.05)
    # ...but nothing of a speculative answer reaches the person.
    assert not talk.of(cmd.Emit, talk.new()) and not talk.of(cmd.Play)


def test_the_confirmed_end_releases_the_held_answer_in_order_and_frees_the_stt_job():
    talk = Talk()
    talk.speak()
    stt = talk.start(STT)
    talk.pause()
    talk(Transcript(stt, "Hello there", flushed=True), after_s=0.04)
    talk.start(LLM)
    talk.tokens(" Hi", "!", " How", " are")  # "Hi!" is a piece once the next word is complete
    talk.start(TTS)
    talk(Speech(talk.job(TTS), pcm(100), 22050))
    talk.tokens(" you")
    talk.new()
    talk.end()
    out = talk.new()
    assert cmd.CancelJob(stt) in out  # the flushed transcript was the final one: no second decode
    released = [c for c in out if isinstance(c, cmd.Emit | cmd.Play)]
    kinds = [type(c.event).__name__ if isinstance(c, cmd.Emit) else "Play" for c in released]
    assert kinds == ["TranscriptFinal", "AnswerToken", "AnswerToken", "AnswerToken", "AnswerToken", "Play", "AnswerToken"]
    assert talk.events(TranscriptFinal)[0].text == "Hello there"
    # Tokens after the confirmation go out at once.
    talk.tokens(" doing?")
    assert [e.text for e in talk.events(AnswerToken, talk.new())] == [" doing?"]


def test_the_answer_is_over_when_generated_spoken_and_played():
    talk = Talk()
    answered_turn(talk)
    done = talk.events(AnswerDone)
    assert len(done) == 1 and done[0].text == " The capital of France is Paris." and not done[0].interrupted
    assert cmd.CountTurn("answered") in talk.commands
    assert talk.conversation.history.messages[-1].content == done[0].text


def test_an_answer_cut_only_at_its_end_gives_its_tts_job_one_end():
    """The whole answer is one piece, cut when the LLM finishes: the TTS job starts then, and ends once."""
    talk = Talk()
    asked(talk, "Hi")
    talk.tokens(" Hello")
    assert not any(c.job.kind is TTS for c in talk.of(cmd.StartJob))
    talk(JobFinished(talk.job(LLM)))
    tts = talk.job(TTS)
    assert [c.text for c in talk.of(cmd.SendText) if c.job == tts] == ["Hello"]
    assert talk.of(cmd.EndInput).count(cmd.EndInput(tts)) == 1


def test_nothing_is_over_while_audio_is_still_queued():
    talk = Talk()
    talk.speak()
    talk.start(STT)
    talk.pause()
    talk(Transcript(talk.job(STT), "Hi", flushed=True))
    talk.start(LLM)
    talk.tokens(" Hello", ".")
    talk.end()
    talk(JobFinished(talk.job(LLM)))
    talk(Speech(talk.start(TTS), pcm(100), 22050))
    talk(JobFinished(talk.job(TTS)))
    assert not talk.events(AnswerDone)  # still playing
    talk(PlayoutIdle(1))
    assert len(talk.events(AnswerDone)) == 1


def test_latency_marks_are_reported_when_the_first_audio_is_sent():
    talk = Talk()
    answered_turn(talk)
    (latency,) = talk.events(Latency)
    marks = [latency.end_of_turn, latency.stt_final, latency.first_token, latency.first_clause, latency.first_tts_audio]
    assert latency.stt_final < latency.end_of_turn  # speculation: the transcript was there before the end
    assert latency.stt_final <= latency.first_token <= latency.first_clause
    assert latency.end_of_turn <= latency.first_audio_sent
    assert all(m is not None and m >= 0 for m in marks)
    assert latency.workers == {"stt": "stt-a", "llm": "llm-a", "tts": "tts-a"}
    assert talk.of(cmd.ObserveStages)[0].marks["first_audio_sent"] == latency.first_audio_sent


def test_partials_are_shown_while_the_person_speaks():
    talk = Talk()
    talk.speak()
    stt = talk.start(STT)
    talk(Transcript(stt, "What is"))
    assert [e.text for e in talk.events(TranscriptPartial)] == ["What is"]


def test_the_question_is_prefilled_from_partials_one_prefill_at_a_time():
    talk = Talk()
    talk.speak()
    stt = talk.start(STT)
    talk(Transcript(stt, "What should I"))
    (prefill,) = [c for c in talk.of(cmd.StartJob) if c.job.kind is LLM]
    assert prefill.params.prefill and prefill.params.messages[-1].content == "What should I"
    talk(Transcript(stt, "What should I pack"))  # the first is still being evaluated: skipped
    assert len([c for c in talk.of(cmd.StartJob) if c.job.kind is LLM]) == 1
    talk(JobFinished(talk.start(LLM, "llm-a")))
    talk(Transcript(stt, "What should I pack for a"))
    second = [c for c in talk.of(cmd.StartJob) if c.job.kind is LLM][-1]
    assert second.params.messages[-1].content == "What should I pack for a"
    assert second.placement.warm_worker == "llm-a"  # where the first one went: its cache has the start
    talk(JobFailed(second.job, "busy", "full", "llm-a"))  # a head start only: not retried
    assert not talk.conversation.next_timer()


def test_no_prefill_while_speaking_when_turned_off():
    talk = Talk(prefill_while_speaking=False)
    talk.speak()
    talk(Transcript(talk.start(STT), "What should I"))
    assert not any(c.job.kind is LLM for c in talk.of(cmd.StartJob))


# -- speculation --------------------------------------------------------------------------


def test_speech_resuming_drops_the_speculative_answer_and_the_same_stt_job_goes_on():
    talk = Talk()
    talk.speak()
    stt = talk.start(STT)
    talk.pause()
    talk(Transcript(stt, "Turn on the kitchen lights", flushed=True))
    llm = talk.start(LLM)
    talk.tokens(" Sure", ",", " I")
    talk.new()
    talk.resume()
    out = talk.new()
    assert cmd.CancelJob(llm) in out and cmd.CancelJob(talk.job(TTS)) in out
    assert not talk.of(cmd.Emit, out)  # nothing of the dropped answer was ever sent
    assert [c.job for c in talk.of(cmd.SendAudio, out)] == [stt]  # no replay: the job goes on
    assert talk.conversation.speculations_dropped == 1
    talk.pause()
    assert talk.of(cmd.FlushInput, talk.new()) == [cmd.FlushInput(stt)]
    talk(Transcript(stt, "Turn on the kitchen lights and close the door", flushed=True))
    talk.end()
    assert talk.events(TranscriptFinal)[0].text == "Turn on the kitchen lights and close the door"
    assert len(talk.of(cmd.StartJob)) == 4  # stt, llm, tts, and one llm for the real end


def test_a_flushed_transcript_from_before_speech_resumed_is_ignored():
    talk = Talk()
    talk.speak()
    stt = talk.start(STT)
    talk.pause()
    talk.resume()
    talk(Transcript(stt, "Turn on the", flushed=True))  # answers the first flush, too late
    assert not any(c.job.kind is LLM for c in talk.of(cmd.StartJob))
    talk.pause()
    talk(Transcript(stt, "Turn on the lights", flushed=True))
    (llm,) = [c for c in talk.of(cmd.StartJob) if c.job.kind is LLM]
    assert llm.params.messages[-1].content == "Turn on the lights"


def test_an_end_confirmed_before_the_flushed_transcript_waits_for_it():
    """On a slow box the transcript comes after the end is confirmed: the answer starts then, unheld."""
    talk = Talk()
    talk.speak()
    stt = talk.start(STT)
    talk.pause()
    talk.end()
    assert not talk.of(cmd.EndInput)  # the flush's transcript will be the final one
    talk(Transcript(stt, "What time is it?", flushed=True), after_s=0.1)
    assert cmd.CancelJob(stt) in talk.commands
    assert talk.events(TranscriptFinal)[0].text == "What time is it?"
    talk.start(LLM)
    talk.tokens(" It")
    assert [e.text for e in talk.events(AnswerToken)] == [" It"]


def test_without_a_pause_the_end_of_speech_ends_the_stt_job():
    talk = Talk()
    talk.speak()
    stt = talk.start(STT)
    talk.end(after_s=0.32)
    assert talk.of(cmd.EndInput) == [cmd.EndInput(stt)]
    talk(Transcript(stt, "Hello", final=True))
    assert any(c.job.kind is LLM for c in talk.of(cmd.StartJob))
    assert cmd.CancelJob(stt) not in talk.commands  # a final ends the job by itself


def test_an_empty_transcript_is_no_question():
    talk = Talk()
    talk.speak()
    talk.pause()
    talk(Transcript(talk.start(STT), "", flushed=True))
    talk.end()
    assert not any(c.job.kind is LLM for c in talk.of(cmd.StartJob))
    assert cmd.CountTurn("empty") in talk.commands


def test_a_cut_utterance_is_ended_and_reported():
    talk = Talk()
    talk.speak()
    stt = talk.start(STT)
    talk.stream_s += 0.032
    talk(SpeechEnded(talk.stream_s, talk.stream_s, cut=True), after_s=0.032)
    assert cmd.EndInput(stt) in talk.commands
    (error,) = talk.events(ErrorEvent)
    assert error.code == "utterance_too_long" and error.turn == 1


# -- barge-in ---------------------------------------------------------------------------------


def test_audio_that_runs_out_before_the_answer_ends_is_counted_as_a_gap_with_its_silence():
    talk = Talk()
    asked(talk, "Tell me a story")
    talk.tokens(" Once", " upon", " a", " time,", " there", " was", " a", " dragon.")
    tts = talk.start(TTS)
    talk(Speech(tts, pcm(100), 22050))
    talk(Playing(1, 0, talk.now))
    talk(PieceSpoken(tts, talk.conversation.answer.pieces[0]))
    talk(PlayoutIdle(1), after_s=0.2)  # piece 0 played out; piece 1 is not synthesized yet
    assert not talk.events(AnswerDone)
    talk(Speech(tts, pcm(100), 22050), after_s=0.15)
    talk(Playing(1, 1, talk.now))  # 150 ms of silence mid-answer
    talk(JobFinished(talk.job(LLM)))
    talk(PieceSpoken(tts, talk.conversation.answer.pieces[1]))
    talk(JobFinished(tts))
    talk(PlayoutIdle(1), after_s=0.3)  # the end: no gap
    done = talk.events(AnswerDone)
    assert len(done) == 1 and done[0].gaps == 1 and done[0].gap_ms == pytest.approx(150, abs=0.5)


def test_an_answer_whose_audio_never_ran_out_has_no_gap():
    talk = Talk()
    answered_turn(talk)
    done = talk.events(AnswerDone)
    assert len(done) == 1 and done[0].gaps == 0 and done[0].gap_ms == 0


def playing_answer(talk: Talk, pieces_heard: int) -> None:
    talk.speak()
    talk.start(STT)
    talk.pause()
    talk(Transcript(talk.job(STT), "Tell me a story", flushed=True))
    talk.start(LLM)
    talk.end()
    talk.tokens(*" Once upon a time, there was a dragon, who lived in a cave, far away.".replace(" ", "| ").split("|")[1:])
    talk(JobFinished(talk.job(LLM)))
    tts = talk.start(TTS)
    for piece in range(pieces_heard):
        talk(Speech(tts, pcm(100), 22050))
        talk(Playing(1, piece, talk.now))
        talk(PieceSpoken(tts, talk.conversation.answer.pieces[piece]))
    talk.new()


@pytest.mark.parametrize("heard", [1, 3])
def test_barge_in_stops_playback_cancels_the_answer_and_remembers_what_was_heard(heard):
    talk = Talk()
    playing_answer(talk, pieces_heard=heard)
    pieces = talk.conversation.answer.pieces
    talk(SpeechStarted(pcm(), talk.stream_s), after_s=0.2)
    out = talk.new()
    assert out[0] == cmd.StopPlayback()  # first: playback stops within a frame
    assert cmd.CancelJob(talk.job(TTS)) in out
    assert [e.turn for e in talk.events(BargeIn, out)] == [1]
    (done,) = talk.events(AnswerDone, out)
    assert done.interrupted and done.turn == 1
    assert talk.conversation.history.messages[-1].content == " ".join(pieces[:heard]) + " ..."
    assert cmd.CountTurn("interrupted") in out
    # The new turn is heard at once.
    assert [c.job.kind for c in talk.of(cmd.StartJob, out)] == [STT]


def test_barge_in_while_the_answer_is_still_generated_cancels_the_llm_job_too():
    talk = Talk()
    llm = asked(talk, "Tell me a story")
    talk.tokens(" Once", " upon", " a", " time", " there")
    tts = talk.start(TTS)
    talk(Speech(tts, pcm(100), 22050))
    talk(Playing(1, 0, talk.now))  # the first piece plays; tokens still come
    talk.new()
    talk(SpeechStarted(pcm(), talk.stream_s), after_s=0.1)
    out = talk.new()
    assert out[0] == cmd.StopPlayback()
    assert cmd.CancelJob(llm) in out and cmd.CancelJob(tts) in out
    (done,) = talk.events(AnswerDone, out)
    assert done.interrupted and done.text == " Once upon a time there"
    assert talk.conversation.history.messages[-1].content == "Once upon a time ..."
    talk(Token(llm, " lived"))  # a token already on the wire when the job was cancelled
    assert not talk.events(AnswerToken, talk.new())


def test_speech_before_any_of_the_answer_was_heard_goes_on_the_same_question():
    """A pause just past the end of the turn, then more words: no interruption, one question."""
    talk = Talk()
    llm = asked(talk, "What should I pack")
    talk.tokens(" You")
    talk.new()
    talk(SpeechStarted(pcm(), talk.stream_s), after_s=0.1)
    out = talk.new()
    assert cmd.CancelJob(llm) in out and not talk.events(BargeIn, out)
    assert talk.events(AnswerDone, out)[0].interrupted and cmd.CountTurn("merged") in out
    assert talk.conversation.history.messages == []  # nothing of it was said
    talk.pause()
    talk(Transcript(talk.start(STT), "for a weekend camping trip?", flushed=True))
    question = [c for c in talk.of(cmd.StartJob) if c.job.kind is LLM][-1].params.messages[-1].content
    assert question == "What should I pack for a weekend camping trip?"


def test_an_answer_that_played_out_is_not_interrupted_by_the_next_turn():
    talk = Talk()
    answered_turn(talk)
    talk.new()
    talk(SpeechStarted(pcm(), talk.stream_s), after_s=1.0)
    assert not talk.of(cmd.StopPlayback, talk.new()) and not talk.events(BargeIn)


# -- a worker lost mid-turn, per kind ----------------------------------------------------------------


def test_a_speculative_answer_that_fails_is_told_after_its_transcript_and_only_if_the_turn_ends():
    talk = Talk()
    talk.speak()
    talk.pause()
    talk(Transcript(talk.start(STT), "What time is it", flushed=True))
    talk(JobFailed(talk.job(LLM), NO_WORKER, "no llm worker is available"))
    assert not talk.events(ErrorEvent, talk.new())  # held: the turn may not be over
    talk.resume()  # it was not: the failed speculation is dropped unsaid
    assert not talk.events(ErrorEvent, talk.new())
    talk.pause()
    talk(Transcript(talk.job(STT), "What time is it in Paris", flushed=True))
    talk(JobFailed(talk.job(LLM), NO_WORKER, "no llm worker is available"))
    talk.end()
    out = talk.new()
    emitted = [c.event for c in talk.of(cmd.Emit, out)]
    assert [type(e) for e in emitted] == [TranscriptFinal, ErrorEvent] and emitted[1].code == NO_WORKER
    assert cmd.CountTurn("failed") in out


def test_a_speculative_answer_whose_tts_failed_is_still_told_in_text_once_the_turn_ends():
    talk = Talk()
    talk.speak()
    talk.pause()
    talk(Transcript(talk.start(STT), "What time is it", flushed=True))
    talk.start(LLM)
    talk.tokens(" It", " is", " noon", " now.")
    talk(JobFinished(talk.job(LLM)))  # the last piece is cut: its TTS job opens
    talk(JobFailed(talk.job(TTS), NO_WORKER, "no tts worker is available"))
    assert not talk.events(ErrorEvent, talk.new())  # all of it held: the turn may not be over
    talk.end()
    out = talk.new()
    assert [type(e) for e in talk.events(TranscriptFinal, out)] == [TranscriptFinal]
    assert [e.code for e in talk.events(ErrorEvent, out)] == [NO_WORKER]
    assert [e.text for e in talk.events(AnswerDone, out)] == [" It is noon now."]  # the answer, as text
    assert cmd.CancelJob(talk.job(STT)) in out  # and the turn's STT job is let go


# -- typed questions and interrupt --------------------------------------------------------


def test_a_typed_question_is_a_turn_answered_in_text_and_speech():
    talk = Talk()
    talk(TypedQuestion("What is the capital of France?"))
    out = talk.new()
    assert [e.text for e in talk.events(TranscriptFinal, out)] == ["What is the capital of France?"]
    assert [c.job.kind for c in talk.of(cmd.StartJob, out)] == [LLM]  # no STT job: there is no audio
    assert talk.of(cmd.StartJob, out)[0].params.messages[-1].content == "What is the capital of France?"
    talk.start(LLM)
    talk.tokens(" Paris", " is", " the", " capital.")
    talk(JobFinished(talk.job(LLM)))
    tts = talk.start(TTS)
    talk(Speech(tts, pcm(2205), 22050), after_s=0.2)
    talk(Playing(1, 0, talk.now))
    talk(JobFinished(tts))
    talk(PlayoutIdle(1))
    out = talk.new()
    assert talk.of(cmd.Play, out) and [e.text for e in talk.events(AnswerDone, out)] == [" Paris is the capital."]
    (latency,) = talk.events(Latency, out)
    assert latency.end_of_turn == 0 and latency.stt_final == 0 and latency.first_audio_sent == pytest.approx(240, abs=1)
    assert talk.conversation.history.messages[-2].content == "What is the capital of France?"


def test_a_typed_question_barges_in_on_the_answer_playing():
    talk = Talk()
    playing_answer(talk, pieces_heard=1)
    talk(TypedQuestion("And Germany?"))
    out = talk.new()
    assert out[0] == cmd.StopPlayback() and cmd.CancelJob(talk.job(TTS)) in out
    assert [(e.turn, e.interrupted) for e in talk.events(AnswerDone, out)] == [(1, True)]
    assert [e.turn for e in talk.events(TranscriptFinal, out)] == [2]
    assert talk.of(cmd.StartJob, out)[-1].params.messages[-1].content == "And Germany?"


def test_a_typed_question_while_a_spoken_one_is_heard_is_refused_and_changes_nothing():
    talk = Talk()
    talk.speak()
    talk.new()
    talk(TypedQuestion("Hello?"))
    out = talk.new()
    assert [e.code for e in talk.events(ErrorEvent, out)] == ["still_listening"] and len(out) == 1
    talk.pause()
    talk(Transcript(talk.start(STT), "What time is it?", flushed=True))
    talk.end()
    assert talk.of(cmd.StartJob)[-1].params.messages[-1].content == "What time is it?"


def test_interrupt_stops_the_answer_even_before_a_word_of_it_was_heard():
    talk = Talk()
    llm = asked(talk, "Tell me a story")
    talk.tokens(" Once")
    talk.new()
    talk(InterruptAnswer())
    out = talk.new()
    assert out[0] == cmd.StopPlayback() and cmd.CancelJob(llm) in out
    assert talk.events(BargeIn, out) and talk.events(AnswerDone, out)[0].interrupted
    assert cmd.CountTurn("interrupted") in out
    assert talk.conversation.history.messages[-1].content == "..."  # asked, and nothing of the answer heard
    talk.new()
    assert talk(InterruptAnswer()) == []  # nothing is playing now: nothing happens


def test_stt_worker_lost_mid_utterance_replays_everything_heard_elsewhere():
    talk = Talk()
    talk.speak(0.64)
    stt = talk.start(STT, "stt-a")
    heard = np.concatenate([a.samples for a in talk.of(cmd.SendAudio)])
    talk.pause()
    talk.new()
    talk(JobFailed(stt, "internal", "connection to the worker was lost", "stt-a"))
    out = talk.new()
    (moved,) = talk.of(cmd.StartJob, out)
    assert moved.job.kind is STT and moved.job != stt and moved.exclude == frozenset({"stt-a"})
    (replay,) = talk.of(cmd.SendAudio, out)
    assert np.array_equal(replay.samples, heard)  # pre-roll included, in order, nothing lost
    assert talk.of(cmd.FlushInput, out) == [cmd.FlushInput(moved.job)]  # the person had paused
    assert cmd.CountFailover(STT) in out and talk.conversation.failovers == 1
    talk(Transcript(moved.job, "Hello", flushed=True))
    assert any(c.job.kind is LLM for c in talk.of(cmd.StartJob))


def test_llm_worker_lost_mid_answer_continues_after_the_text_already_sent():
    talk = Talk()
    llm = asked(talk, "Tell me a story", "llm-a")
    talk.tokens(" Once", " upon", " a")
    talk.new()
    talk(JobFailed(llm, "internal", "connection to the worker was lost", "llm-a"))
    (moved,) = talk.of(cmd.StartJob, talk.new())
    assert moved.job.kind is LLM and moved.exclude == frozenset({"llm-a"})
    assert moved.params.answer_prefix == " Once upon a" and moved.params.max_tokens == 96 - 3
    talk(Token(moved.job, " time"))
    assert "".join(e.text for e in talk.events(AnswerToken)) == " Once upon a time"


def test_tts_worker_lost_mid_piece_resumes_at_that_piece_and_drops_its_queued_part():
    talk = Talk()
    asked(talk, "Tell me a story")
    talk.tokens(" Once", " upon", " a", " time,", " there", " was", " a", " dragon", " who", " lived", " in", " a", " cave.")
    talk(JobFinished(talk.job(LLM)))
    tts = talk.start(TTS, "tts-a")
    pieces = talk.conversation.answer.pieces
    assert len(pieces) >= 3
    talk(Speech(tts, pcm(100), 22050))
    talk(PieceSpoken(tts, pieces[0]))
    talk(Speech(tts, pcm(100), 22050))  # half of the second piece
    assert [p.piece for p in talk.of(cmd.Play)] == [0, 1]
    talk.new()
    talk(JobFailed(tts, "internal", "stalled", "tts-a"))
    out = talk.new()
    assert cmd.Unplay(1, 1) in out
    (moved,) = talk.of(cmd.StartJob, out)
    assert moved.exclude == frozenset({"tts-a"})
    assert [t.text for t in talk.of(cmd.SendText, out)] == pieces[1:]
    assert talk.of(cmd.EndInput, out) == [cmd.EndInput(moved.job)]  # the answer was complete
    talk(Speech(moved.job, pcm(100), 22050))
    assert talk.of(cmd.Play)[-1].piece == 1


def test_vision_worker_lost_sends_the_frame_again():
    talk = Talk(vision_on_turn=True)
    talk.speak()
    (look,) = talk.of(cmd.LookAtCamera)
    talk(CameraFrame(look.turn, b"jpeg", MediaFormat.JPEG))
    vision = talk.start(VISION, "vision-a")
    talk.new()
    talk(JobFailed(vision, "internal", "lost", "vision-a"))
    out = talk.new()
    (moved,) = talk.of(cmd.StartJob, out)
    assert moved.job.kind is VISION and moved.exclude == frozenset({"vision-a"})
    assert talk.of(cmd.SendImage, out) == [cmd.SendImage(moved.job, b"jpeg", MediaFormat.JPEG)]


def test_a_job_moves_at_most_to_three_workers_then_the_turn_fails_and_the_next_is_heard():
    talk = Talk()
    talk.speak()
    for n in range(failover.MAX_WORKERS_PER_JOB):
        talk(JobFailed(talk.start(STT, f"stt-{n}"), "internal", "lost", f"stt-{n}"))
    (error,) = talk.events(ErrorEvent)
    assert error.code == "stt_failed" and error.turn == 1
    assert cmd.CountTurn("failed") in talk.commands
    talk.end(after_s=0.32)
    talk.new()
    talk.speak()  # not deaf: the next turn gets a new job
    assert [c.job.kind for c in talk.of(cmd.StartJob, talk.new())] == [STT]


def test_a_job_refused_by_a_worker_as_invalid_does_not_move():
    talk = Talk()
    talk.speak()
    talk(JobFailed(talk.start(STT), "bad_params", "this model is English-only", "stt-a"))
    assert [c.job.kind for c in talk.of(cmd.StartJob)] == [STT]
    assert talk.events(ErrorEvent)[0].code == "stt_failed"


def test_no_worker_of_a_kind_is_reported_and_the_session_goes_on():
    talk = Talk()
    talk.speak()
    talk.pause()
    talk(Transcript(talk.start(STT), "Hello", flushed=True))
    talk.end()
    talk(JobFailed(talk.job(LLM), NO_WORKER, "no llm worker is available"))
    (error,) = talk.events(ErrorEvent)
    assert error.code == "no_worker" and "llm" in error.message and error.turn == 1
    talk.speak()
    assert talk.conversation.turns == 2 and talk.job(STT).serial > talk.job(LLM).serial


def test_a_full_worker_is_asked_again_and_the_audio_that_waited_is_replayed():
    talk = Talk()
    talk.speak(0.32)
    talk.new()
    talk(JobFailed(talk.job(STT), "busy", "worker at capacity", "stt-a"))
    assert not talk.of(cmd.StartJob, talk.new())
    talk(SpeechAudio(pcm(512, 9)), after_s=0.01)  # the person goes on meanwhile
    assert not talk.of(cmd.SendAudio, talk.new())
    assert talk.conversation.next_timer() == pytest.approx(talk.now - 0.01 + 0.05)
    out = talk.wait(0.05)
    (again,) = talk.of(cmd.StartJob, out)
    assert again.exclude == frozenset()  # a full worker is no failed one: it may be asked again
    (replay,) = talk.of(cmd.SendAudio, out)
    assert len(replay.samples) == 4096 + 10 * 512 + 512


def test_a_worker_that_stays_full_fails_the_turn_after_a_while():
    talk = Talk()
    talk.speak(0.1)
    waited = 0.0
    while not talk.events(ErrorEvent):
        talk(JobFailed(talk.job(STT), "busy", "worker at capacity", "stt-a"))
        talk.wait(0.5)
        waited += 0.5
        assert waited < 2 * failover.BUSY_WAIT_S
    assert waited >= failover.BUSY_WAIT_S
    assert talk.events(ErrorEvent)[0].code == "stt_failed"


# -- history ----------------------------------------------------------------------------------


def test_history_is_trimmed_in_blocks_and_the_trimmed_prompt_is_prefilled_while_the_answer_plays():
    talk = Talk(max_history_turns=2)
    answered_turn(talk, "One.")
    answered_turn(talk, "Two.")
    assert not [c for c in talk.of(cmd.StartJob) if getattr(c.params, "prefill", False)]
    talk.new()
    answered_turn(talk, "Three.")
    history = talk.conversation.history.messages
    assert [m.content for m in history] == ["What is the capital of France?", " Three."]
    (prefill,) = [c for c in talk.of(cmd.StartJob, talk.new()) if getattr(c.params, "prefill", False)]
    assert prefill.params.messages == talk.conversation.history.context()
    # Sent once the answer's text was complete, not once it had been heard (seconds later).
    done = next(c for c in talk.of(cmd.Emit) if isinstance(c.event, AnswerDone) and c.event.turn == 3)
    first_audio = next(c for c in talk.of(cmd.Play) if c.turn == 3)
    assert talk.commands.index(prefill) < talk.commands.index(first_audio) < talk.commands.index(done)
    # The next question's prompt extends exactly what was prefilled.
    talk.speak()
    talk.pause()
    talk(Transcript(talk.start(STT), "And four?", flushed=True))
    prompt = [c for c in talk.of(cmd.StartJob) if c.job.kind is LLM][-1].params.messages
    assert prompt[: len(prefill.params.messages)] == prefill.params.messages


def test_the_worker_that_answered_last_is_the_warm_one_for_the_next_question():
    talk = Talk()
    answered_turn(talk)
    talk.speak()
    talk.pause()
    talk(Transcript(talk.start(STT), "And Spain?", flushed=True))
    placement = [c for c in talk.of(cmd.StartJob) if c.job.kind is LLM][-1].placement
    assert placement.warm_worker == "llm-a" and placement.warm_size < placement.size


# -- the camera, merged turns, limits ---------------------------------------------------------------------


def test_the_camera_text_is_waited_for_and_goes_into_the_question():
    talk = Talk(vision_on_turn=True)
    talk.speak()
    talk(CameraFrame(1, b"jpeg"))
    vision = talk.start(VISION)
    talk.pause()
    talk(Transcript(talk.start(STT), "What does the sign say?", flushed=True))
    assert not any(c.job.kind is LLM for c in talk.of(cmd.StartJob))  # waiting for the camera
    seen = VisionResult(lines=[OcrLine(text="EXIT GATE 7", score=0.9, box=[(0, 0)] * 4)])
    talk(Seen(vision, seen))
    talk(JobFinished(vision))
    assert [e.text for e in talk.events(VisionText)] == ["EXIT GATE 7"]
    (llm,) = [c for c in talk.of(cmd.StartJob) if c.job.kind is LLM]
    question = llm.params.messages[-1].content
    assert question.startswith("What does the sign say?") and "EXIT GATE 7" in question  # the question first: its prefix was prefilled


def test_a_slow_camera_is_not_waited_for_beyond_vision_wait_s():
    talk = Talk(vision_on_turn=True)  # vision_wait_s: 3 s
    talk.speak()
    talk(CameraFrame(1, b"jpeg"))
    talk.start(VISION)
    talk.pause()
    talk(Transcript(talk.start(STT), "What is this?", flushed=True))
    talk.wait(2.9)
    assert not any(c.job.kind is LLM for c in talk.of(cmd.StartJob))
    talk.wait(0.2)
    (llm,) = [c for c in talk.of(cmd.StartJob) if c.job.kind is LLM]
    assert llm.params.messages[-1].content == "What is this?"


def test_the_camera_is_sampled_on_an_interval_one_look_at_a_time():
    talk = Talk(vision_interval_s=0.5)
    talk(Tick())
    looks = talk.of(cmd.LookAtCamera, talk.wait(0.5))
    assert looks == [cmd.LookAtCamera(0, periodic=True)]
    talk(CameraFrame(0, b"jpeg", periodic=True))
    vision = talk.start(VISION)
    assert not talk.of(cmd.LookAtCamera, talk.wait(1.0))  # one in flight: the ticks are skipped
    talk(Seen(vision, VisionResult(lines=[])))
    talk(JobFinished(vision))
    assert talk.of(cmd.LookAtCamera, talk.wait(0.5))


def test_a_turn_the_person_continued_before_it_was_answered_is_asked_with_the_next():
    talk = Talk()
    talk.speak()
    first = talk.start(STT)
    talk.end(after_s=0.32)
    talk.speak()  # goes on before the first turn's transcript came
    talk(Transcript(first, "Turn on the lights", final=True))
    assert not any(c.job.kind is LLM for c in talk.of(cmd.StartJob))
    assert cmd.CountTurn("merged") in talk.commands
    talk.pause()
    talk(Transcript(talk.start(STT), "in the kitchen", flushed=True))
    (llm,) = [c for c in talk.of(cmd.StartJob) if c.job.kind is LLM]
    assert llm.params.messages[-1].content == "Turn on the lights in the kitchen"


def test_a_truncated_answer_is_said_so():
    talk = Talk()
    asked(talk, "Tell me everything")
    talk.tokens(" Well")
    talk(JobFinished(talk.job(LLM), {"truncated": 1.0}))
    talk(JobFinished(talk.start(TTS)))
    (done,) = talk.events(AnswerDone)
    assert done.truncated
    assert [e.code for e in talk.events(ErrorEvent)] == ["answer_truncated"]


def test_without_a_tts_worker_the_answer_is_text_and_the_client_is_told():
    talk = Talk()
    asked(talk, "Hello")
    talk.tokens(" Hi", " there,", " friend.")
    talk(JobFailed(talk.job(TTS), NO_WORKER, "no tts worker is available"))
    talk(JobFinished(talk.job(LLM)))
    assert [e.code for e in talk.events(ErrorEvent)] == ["no_worker"]
    (done,) = talk.events(AnswerDone)
    assert done.text == " Hi there, friend."


def test_closing_cancels_every_open_job():
    talk = Talk()
    talk.speak()
    talk.pause()
    talk(Transcript(talk.start(STT), "Hello", flushed=True))
    opened = talk.conversation.live_jobs
    assert {r.kind for r in opened} == {STT, LLM}
    assert talk.conversation.close() == [cmd.CancelJob(r) for r in opened]
    assert not talk.conversation.live_jobs


def test_every_input_type_is_handled_and_anything_else_is_refused():
    talk = Talk()
    with pytest.raises(TypeError):
        talk("not an event")


def test_stt_is_not_pinned_to_a_model_but_the_llm_and_tts_are():
    talk = Talk()
    answered_turn(talk)
    talk.speak()
    starts = {c.job.kind: c for c in talk.of(cmd.StartJob)[-1:]}
    assert starts[STT].model is None  # any recogniser may hear the next utterance
    talk.pause()
    talk(Transcript(talk.start(STT, "stt-b"), "And tomorrow?", flushed=True))
    assert talk.of(cmd.StartJob)[-1].job.kind is LLM and talk.of(cmd.StartJob)[-1].model == MODEL
