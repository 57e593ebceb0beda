"""Sessions outlive a gateway restart (the Python SDK here; the JS SDK in test_browser.py)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.harness.figures import free_port
from gateway.server import Gateway
from stream.config import GatewaySettings
from stream.protocol import WorkerKind
from stream.sdk import Backoff, GatewayError, GatewaySession
from tests.conftest import with_silence, word_error_rate

FAST = Backoff(initial_s=0.2, max_s=1.0)


async def start_gateway(urls, port: int) -> Gateway:
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=port, ice_timeout_s=5), urls)
    await gateway.start("127.0.0.1", port)
    await gateway.pool.wait_ready([WorkerKind.STT, WorkerKind.LLM, WorkerKind.TTS], timeout=10)
    return gateway


def test_backoff_grows_to_its_cap_with_jitter():
    backoff = Backoff(initial_s=0.5, max_s=4.0, jitter=0.2)
    for attempt, base in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)):
        delays = [backoff.delay(attempt) for _ in range(50)]
        assert all(base * 0.8 <= d <= base * 1.2 for d in delays)
        assert len(set(delays)) > 1  # jitter: clients cut off together do not come back together


async def test_a_session_comes_back_after_the_gateway_restarts(workers, speak):
    _, urls = workers
    port = free_port()
    url = f"ws://127.0.0.1:{port}/session"
    gateway = await start_gateway(urls, port)
    session = await GatewaySession.connect(url, loopback_ice=True, reconnect=FAST)
    try:
        first_id = session.session_id
        await gateway.close()
        lost = await session.wait_event("connection.lost", timeout=10)
        assert lost["code"] == "shutting_down" and not session.connected and not session.closed.is_set()
        await asyncio.sleep(0.5)  # it retries into a closed port meanwhile
        gateway = await start_gateway(urls, port)
        restored = await session.wait_event("connection.restored", timeout=20)
        assert restored["session_id"] == session.session_id != first_id and session.reconnects == 1
        assert session.connected and session.session_id in gateway.sessions
        # The same session object, microphone and event list carry on: a whole turn.
        after = len(session.events)
        await session.say(with_silence(speak("What is the capital of Spain?")), 16000)
        final = await session.wait_event("transcript.final", timeout=20, after=after)
        assert word_error_rate("What is the capital of Spain?", final["text"]) <= 0.25
        done = await session.wait_event("answer.done", timeout=40, after=after)
        assert done["text"].strip() and done["turn"] == 1
    finally:
        await session.close()
        await gateway.close()


async def test_without_reconnect_the_session_ends_and_says_why(workers):
    _, urls = workers
    port = free_port()
    gateway = await start_gateway(urls, port)
    session = await GatewaySession.connect(f"ws://127.0.0.1:{port}/session", loopback_ice=True)
    await gateway.close()
    async with asyncio.timeout(10):
        await session.closed.wait()
    assert session.close_reason is not None and session.close_reason.code == "shutting_down"
    with pytest.raises(GatewayError):
        await session.wait_event("answer.done", timeout=1)
    await session.close()


async def test_reconnecting_gives_up_after_max_attempts(workers):
    _, urls = workers
    port = free_port()
    gateway = await start_gateway(urls, port)
    session = await GatewaySession.connect(f"ws://127.0.0.1:{port}/session", loopback_ice=True, reconnect=Backoff(initial_s=0.05, max_s=0.1, max_attempts=3))
    await gateway.close()  # and no gateway comes back
    async with asyncio.timeout(20):
        await session.closed.wait()
    assert [e["type"] for e in session.events if e["type"].startswith("connection.")] == ["connection.lost"]
    await session.close()
