"""Failover: the rules per kind (pure), then a worker dying mid-job under a live WebRTC session.

The in-process "crash" is a test double for a worker process dying: it stops
listening and drops every connection without a closing handshake, as a killed
process's kernel would. ``tests/test_multihost.py`` kills real processes.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import pytest_asyncio

from gateway import failover
from gateway.server import Gateway
from stream.config import GatewaySettings
from stream.protocol import ErrorCode, WorkerKind
from stream.protocol.jobs import ChatMessage, LlmParams
from stream.sdk import GatewaySession
from tests.conftest import wait_until, with_silence, word_error_rate
from workers.server import WorkerServer

# -- the rules -------------------------------------------------------------------------


@pytest.mark.parametrize("code", list(ErrorCode))
def test_only_worker_faults_fail_over(code):
    expected = code is ErrorCode.INTERNAL  # busy is no fault: the job asks again (below)
    assert failover.fails_over(code.value, workers_tried=1) is expected
    assert failover.fails_over(code.value, workers_tried=failover.MAX_WORKERS_PER_JOB) is False


def test_a_busy_worker_is_asked_again_sooner_then_later_until_the_wait_is_over():
    delays = [failover.busy_retry_in(n, waited_s=0.0) for n in range(6)]
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4]
    assert failover.busy_retry_in(3, waited_s=failover.BUSY_WAIT_S) is None


def test_stt_replays_the_whole_utterance_in_order():
    heard = [np.arange(0, 3, dtype=np.int16), np.arange(3, 10, dtype=np.int16)]
    assert failover.stt_replay(heard).tolist() == list(range(10))
    assert failover.stt_replay([]).size == 0


def test_llm_continues_after_the_text_already_sent():
    params = LlmParams(messages=[ChatMessage(role="user", content="Hi")], max_tokens=40)
    assert failover.llm_continuation(params, "", 0) is params  # nothing sent yet: the same request
    moved = failover.llm_continuation(params, "Hello there,", 3)
    assert moved.answer_prefix == "Hello there," and moved.max_tokens == 37 and moved.messages == params.messages
    again = failover.llm_continuation(moved, " friend", 1)
    assert again.answer_prefix == "Hello there, friend" and again.max_tokens == 36
    assert failover.llm_continuation(params, "x" * 10, 400).max_tokens == 1


# -- a worker dying mid-turn ------------------------------------------------------------


def crash(server: WorkerServer) -> None:
    """The worker process dies: no more connections, and the open ones drop without a goodbye."""
    assert server._server is not None
    server._server.close(close_connections=False)
    for session in list(server.sessions):
        session.websocket.transport.abort()


@pytest_asyncio.fixture(loop_scope="session")
async def two_of_each(start_worker):
    """Two in-process workers of each kind, and a gateway using all of them."""
    servers: dict[WorkerKind, list[WorkerServer]] = {}
    urls: dict[WorkerKind, list[str]] = {}
    for kind in WorkerKind:
        for _ in range(2):
            server, url = await start_worker(kind, capacity=2)
            servers.setdefault(kind, []).append(server)
            urls.setdefault(kind, []).append(url)
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5), urls)
    port = await gateway.start("127.0.0.1", 0)
    await gateway.pool.wait_ready(list(WorkerKind), timeout=10)
    await wait_until(lambda: all(m.estimate.healthy for m in gateway.pool.members.values()), timeout=10)
    gateway.url = f"ws://127.0.0.1:{port}/session"
    yield gateway, servers
    await gateway.close()


def serving(servers: list[WorkerServer]) -> WorkerServer | None:
    busy = [s for s in servers if s.running]
    return busy[0] if busy else None


async def test_stt_worker_dies_mid_utterance_and_the_turn_is_heard(two_of_each, speak):
    gateway, servers = two_of_each
    question = "The train to Boston leaves at seven and arrives at noon."
    session = await GatewaySession.connect(gateway.url, loopback_ice=True)
    try:
        spoken = session.microphone.queue(with_silence(speak(question), after_s=1.0), 16000)  # not awaited: still speaking
        await session.wait_event("transcript.partial", timeout=20)
        assert not spoken.done()
        victim = serving(servers[WorkerKind.STT])
        assert victim is not None
        crash(victim)
        final = await session.wait_event("transcript.final", timeout=30, turn=1)
        assert word_error_rate(question, final["text"]) <= 0.2, final
        latency = await session.wait_event("latency", timeout=30, turn=1)
        assert latency["workers"]["stt"] != victim.worker_id
        assert gateway.sessions[session.session_id].runner.conversation.failovers >= 1
        assert not any(e["type"] == "error" and e["code"] != "answer_truncated" for e in session.events)
    finally:
        await session.close()


async def test_llm_worker_dies_mid_answer_and_the_answer_continues(two_of_each, speak):
    gateway, servers = two_of_each
    session = await GatewaySession.connect(gateway.url, loopback_ice=True)
    try:
        await session.say(with_silence(speak("Tell me a long story about a dragon and a knight.")), 16000)
        await session.wait_event("answer.token", timeout=30, turn=1)
        victim = serving(servers[WorkerKind.LLM])
        assert victim is not None
        crash(victim)
        done = await session.wait_event("answer.done", timeout=30, turn=1)
        assert not done["interrupted"]
        tokens = "".join(e["text"] for e in session.events if e["type"] == "answer.token" and e["turn"] == 1)
        assert tokens == done["text"] and len(done["text"]) > 20  # nothing sent twice, nothing lost
        survivor = next(s for s in servers[WorkerKind.LLM] if s is not victim)
        assert survivor.jobs_completed >= 1  # the rest of the answer came from the other worker
        assert gateway.sessions[session.session_id].runner.conversation.failovers >= 1
        assert not any(e["type"] == "error" and e["code"] != "answer_truncated" for e in session.events)
    finally:
        await session.close()


async def test_tts_worker_dies_mid_answer_and_speech_goes_on(two_of_each, speak):
    gateway, servers = two_of_each
    session = await GatewaySession.connect(gateway.url, loopback_ice=True)
    try:
        speech_end = await session.say(with_silence(speak("Tell me a long story about a dragon and a knight."), after_s=0.0), 16000)
        await session.say(np.zeros(16000, np.int16), 16000)
        await session.wait_event("answer.token", timeout=30, turn=1)
        await wait_until(lambda: serving(servers[WorkerKind.TTS]) is not None, timeout=20)
        victim = serving(servers[WorkerKind.TTS])
        crash(victim)
        killed_at = asyncio.get_running_loop().time()
        done = await session.wait_event("answer.done", timeout=40, turn=1)
        assert not done["interrupted"]
        assert session.first_audible(after=speech_end) is not None
        # Speech still arrives after the crash: the rest of the answer is spoken by the other worker.
        await wait_until(lambda: session.first_audible(after=killed_at + 0.5) is not None, timeout=20)
        assert gateway.sessions[session.session_id].runner.conversation.failovers >= 1
        assert not any(e["type"] == "error" and e["code"] != "answer_truncated" for e in session.events)
    finally:
        await session.close()


# -- the deadline, on a fake clock -----------------------------------------------------------


def test_a_job_that_owes_nothing_has_no_deadline():
    watchdog = failover.Watchdog(deadline_s=5.0)
    assert watchdog.due() is None and not watchdog.overdue(1e9, can_move=True)


def test_a_job_that_owes_output_and_gives_none_is_stalled_at_the_deadline():
    watchdog = failover.Watchdog(deadline_s=5.0)
    watchdog.owe(10.0)
    assert watchdog.due() == 15.0
    assert not watchdog.overdue(14.9, can_move=True)
    assert watchdog.overdue(15.0, can_move=True)


def test_progress_pushes_the_deadline_and_settling_clears_it():
    watchdog = failover.Watchdog(deadline_s=5.0)
    watchdog.owe(10.0)
    watchdog.progress(13.0)  # a token, a frame of audio: the worker is alive
    assert watchdog.due() == 18.0 and watchdog.first_wait_s == 3.0
    watchdog.settled(14.0)
    assert watchdog.due() is None
    watchdog.owe(20.0)  # the next piece of text
    assert watchdog.due() == 25.0 and watchdog.first_wait_s == 3.0  # the first wait is the worker's latency


def test_output_that_is_not_the_answer_keeps_a_job_alive_but_is_not_its_latency():
    watchdog = failover.Watchdog(deadline_s=5.0)
    watchdog.owe(10.0)  # a flush: a transcript is owed
    watchdog.progress(10.01, answers=False)  # a partial that was already being decoded
    assert watchdog.due() == 15.01 and watchdog.first_wait_s is None
    watchdog.settled(10.2)  # the flushed transcript
    assert watchdog.first_wait_s == pytest.approx(0.2)


def test_a_slow_worker_is_waited_for_when_the_job_has_nowhere_to_move():
    watchdog = failover.Watchdog(deadline_s=5.0)
    watchdog.owe(0.0)
    for missed in range(1, failover.STALL_PATIENCE):
        assert not watchdog.overdue(5.0 * missed, can_move=False)
        assert watchdog.due() == 5.0 * (missed + 1)
    assert watchdog.overdue(5.0 * failover.STALL_PATIENCE, can_move=False)  # patience has an end


def test_a_slow_worker_that_makes_progress_gets_its_patience_back():
    watchdog = failover.Watchdog(deadline_s=5.0)
    watchdog.owe(0.0)
    assert not watchdog.overdue(5.0, can_move=False)
    watchdog.progress(7.0)
    assert watchdog.missed == 0 and watchdog.due() == 12.0
