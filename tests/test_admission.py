"""The waiting line for full workers (``gateway/admission.py``), and how a conversation stands in it."""

from __future__ import annotations

from gateway.admission import WaitingLine
from gateway.conversation import commands as cmd
from gateway.conversation.inputs import JobFailed, JobStarted, LineFull, Transcript, WorkerFreed
from gateway.events import ErrorEvent, Waiting
from stream.protocol import WorkerKind
from tests.test_conversation import MODEL, Talk

STT = WorkerKind.STT


def test_the_longest_waiting_is_woken_first_and_keeps_its_place_when_it_asks_again():
    line, woken = WaitingLine(max_waiting=3), []
    for ticket, since in (("b", 2.0), ("a", 1.0), ("c", 3.0)):
        assert line.join(ticket, since, lambda t=ticket: woken.append(t) or True)
    assert [line.position(t) for t in "abc"] == [0, 1, 2]
    assert not line.join("d", 0.5, lambda: True)  # full: refused, nothing displaced
    assert line.freed() == "a" and woken == ["a"] and len(line) == 2
    line.join("a", 1.0, lambda: woken.append("a") or True)  # found it full again: back at the front
    assert line.position("a") == 0
    line.leave("a")
    assert line.freed() == "b" and line.freed() == "c" and line.freed() is None


def test_a_job_that_no_longer_waits_passes_its_slot_to_the_next():
    line, woken = WaitingLine(max_waiting=8), []
    line.join("gone", 1.0, lambda: False)
    line.join("broken", 2.0, lambda: 1 / 0)
    line.join("here", 3.0, lambda: woken.append("here") or True)
    assert line.freed() == "here" and woken == ["here"] and len(line) == 0


def _busy(talk: Talk) -> cmd.WaitForWorker:
    talk.speak(0.32)
    talk.new()
    talk(JobFailed(talk.job(STT), "busy", "worker at capacity", "stt-a"))
    (wait,) = talk.of(cmd.WaitForWorker, talk.new())
    return wait


def test_a_busy_job_stands_in_line_the_client_hears_waiting_and_a_freed_slot_starts_it_at_once():
    talk = Talk()
    wait = _busy(talk)
    assert wait.kind is STT and wait.ticket == talk.job(STT)
    (told,) = talk.events(Waiting)
    assert told.kind == "stt" and told.turn == 1 and told.wait_s == talk.conversation.settings.busy_wait_s
    out = talk(WorkerFreed(wait.ticket), after_s=0.001)  # well before its own timer
    (again,) = talk.of(cmd.StartJob, out)
    assert not talk.of(cmd.StopWaiting, out)  # the line let it go itself
    talk(JobFailed(again.job, "busy", "worker at capacity", "stt-a"))  # someone took the slot first
    (rejoined,) = talk.of(cmd.WaitForWorker, talk.new())
    assert rejoined.since == wait.since  # its place is kept
    assert len(talk.events(Waiting)) == 1  # told once per wait
    assert talk(WorkerFreed(wait.ticket)) == []  # an old ticket: nothing


def test_a_job_that_asks_again_on_its_timer_leaves_the_line():
    talk = Talk()
    wait = _busy(talk)
    out = talk.wait(0.05)
    assert talk.of(cmd.StartJob, out) and [s.ticket for s in talk.of(cmd.StopWaiting, out)] == [wait.ticket]


def test_a_full_line_fails_the_turn_with_busy_and_closing_leaves_the_line():
    talk = Talk()
    wait = _busy(talk)
    talk(LineFull(wait.ticket, 64))
    (error,) = talk.events(ErrorEvent)
    assert error.code == "stt_failed" and "64 stt jobs are waiting" in error.message
    assert talk.conversation.next_timer() is None
    talk2 = Talk()
    wait2 = _busy(talk2)
    assert [c.ticket for c in talk2.conversation.close() if isinstance(c, cmd.StopWaiting)] == [wait2.ticket]


def test_refusals_right_after_the_lease_add_up_and_the_turn_gives_up_at_the_deadline():
    """``JobStarted`` is only the lease (the worker may still say busy): it does not start a new wait."""
    talk = Talk()
    wait = _busy(talk)
    while not talk.events(ErrorEvent):
        (again,) = talk.of(cmd.StartJob, talk.wait(0.5)) or talk.of(cmd.StartJob, talk(WorkerFreed(wait.ticket)))
        talk(JobStarted(again.job, "stt-a", MODEL))
        talk(JobFailed(again.job, "busy", "worker at capacity", "stt-a"))
        assert talk.now - wait.since < 2 * talk.conversation.settings.busy_wait_s
    assert talk.now - wait.since >= talk.conversation.settings.busy_wait_s


def test_a_job_that_ran_and_moved_waits_afresh_when_it_is_refused_later():
    talk = Talk()
    wait = _busy(talk)
    started = talk.of(cmd.StartJob, talk(WorkerFreed(wait.ticket), after_s=8.0))
    talk.start(STT)
    talk(Transcript(started[0].job, "hello", final=False))  # it ran there
    talk(JobFailed(started[0].job, "internal", "link lost", "stt-a"), after_s=5.0)  # and moves
    moved = talk.of(cmd.StartJob, talk.new())[-1]
    talk(JobFailed(moved.job, "busy", "worker at capacity", "stt-b"))
    (again,) = talk.of(cmd.WaitForWorker, talk.new())
    assert again.since == talk.now  # a new wait, not 13 s into the old one
    assert not talk.events(ErrorEvent)
