"""Each limit a client can hit gives it a clear error, and nothing else is affected.

(Worker-side limits, ``busy`` and ``too_large``, are in ``test_worker_server.py``;
sessions in total and per client in ``test_gateway.py`` and ``test_security.py``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import numpy as np
import pytest
import pytest_asyncio
import websockets

from gateway.harness.attack import UnpluggedMicrophone
from gateway.limits import ClientRates, PendingConnections, TokenBucket
from gateway.server import Gateway
from gateway.session import CLIENT_MESSAGE_BURST
from gateway.turns import SpeechAudio, SpeechEnded, SpeechStarted, TurnDetector, TurnSettings
from stream.config import GatewaySettings
from stream.protocol import WorkerKind
from stream.sdk import GatewaySession
from tests.conftest import wait_until, with_silence, word_error_rate

LONG = "The quick brown fox jumps over the lazy dog, and then it runs far away into the deep green forest."


def test_token_bucket_allows_a_burst_then_the_rate():
    now = [0.0]
    bucket = TokenBucket(rate=10, burst=5, clock=lambda: now[0])
    assert [bucket.allow() for _ in range(7)] == [True] * 5 + [False] * 2
    assert bucket.refusing and bucket.refused == 2
    now[0] += 0.25  # 2.5 tokens back
    assert [bucket.allow() for _ in range(3)] == [True, True, False]
    now[0] += 100
    assert sum(bucket.allow() for _ in range(10)) == 5 and not bucket.allow()


def test_a_flood_lasts_until_the_client_has_been_quiet_for_a_while():
    """Tokens refilled during a flood let a message through now and then; the flood goes on."""
    now = [0.0]
    bucket = TokenBucket(rate=10, burst=2, clock=lambda: now[0], quiet_s=2.0)
    assert not bucket.refusing
    for _ in range(50):  # a message every 20 ms for a second
        bucket.allow()
        now[0] += 0.02
    assert bucket.refused > 30 and bucket.refusing
    now[0] += 1.9
    assert bucket.refusing
    now[0] += 0.2
    assert not bucket.refusing and bucket.allow()


def test_a_turn_that_goes_on_too_long_is_cut_and_no_audio_is_lost(speak):
    speech = speak(LONG)
    assert len(speech) / 16000 > 4.5
    detector = TurnDetector(TurnSettings(max_turn_ms=2000))
    events = []
    for start in range(0, len(speech), 320):
        events.extend(detector.push(speech[start : start + 320]))
    events.extend(detector.push(np.zeros(16000, np.int16)))
    ends = [e for e in events if isinstance(e, SpeechEnded)]
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    assert ends[0].cut and len(starts) >= 2 and not ends[-1].cut
    # Every sample from the first turn's start to the last turn's end went to some turn.
    heard = sum(len(e.preroll) for e in starts) + sum(len(e.samples) for e in events if isinstance(e, SpeechAudio))
    voiced = np.nonzero(np.abs(speech) > 300)[0]
    assert heard >= voiced[-1] - voiced[0]


@pytest_asyncio.fixture(loop_scope="session")
async def limited_gateway(workers):
    _, urls = workers
    settings = GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5, max_utterance_s=2, max_answer_tokens=4, max_video_pixels=160 * 120)
    gateway = Gateway(settings, urls)
    port = await gateway.start("127.0.0.1", 0)
    await gateway.pool.wait_ready(list(WorkerKind), timeout=10)
    gateway.url = f"ws://127.0.0.1:{port}/session"
    yield gateway
    await gateway.close()


async def test_a_long_utterance_is_answered_in_turns_with_a_clear_error(limited_gateway, speak):
    session = await GatewaySession.connect(limited_gateway.url, loopback_ice=True)

    def finals() -> list[str]:
        return [e["text"].strip() for e in session.events if e["type"] == "transcript.final"]

    try:
        await session.say(with_silence(speak(LONG), after_s=1.0), 16000)
        error = await session.wait_event("error", code="utterance_too_long", timeout=20)
        assert error["turn"] == 1 and "2 s" in error["message"]
        await session.wait_event("transcript.final", turn=2, timeout=20)
        # Every word is in some turn. (A turn can be a fragment, "-azy dog", that Whisper
        # hears as nothing; the words are what must not be lost.)
        with contextlib.suppress(AssertionError):
            await wait_until(lambda: word_error_rate(LONG, " ".join(finals())) <= 0.4, timeout=20)
        assert word_error_rate(LONG, " ".join(finals())) <= 0.4, finals()
        assert len([text for text in finals() if text]) >= 2, finals()
        assert session.connected
    finally:
        await session.close()


async def test_a_microphone_that_goes_dead_mid_turn_ends_the_turn_and_frees_its_stt_job(limited_gateway, workers, speak):
    servers, _ = workers
    microphone = UnpluggedMicrophone()
    session = await GatewaySession.connect(limited_gateway.url, loopback_ice=True, microphone=microphone)
    try:
        question = speak("What is the capital of France?")
        assert len(question) / 16000 < 1.9  # under this gateway's 2 s utterance limit
        microphone.unplugged.set()
        await microphone.queue(question, 16000)  # the last sample is sent, then nothing
        final = await session.wait_event("transcript.final", timeout=20)
        assert word_error_rate("What is the capital of France?", final["text"]) <= 0.4, final
        await session.wait_event("answer.done", turn=final["turn"], timeout=40)
        await wait_until(lambda: servers[WorkerKind.STT].running == 0, timeout=10)
        assert session.connected
    finally:
        await session.close()


async def test_camera_frames_above_the_pixel_limit_are_dropped_and_reported_once(limited_gateway, speak):
    camera = np.full((240, 320, 3), 200, np.uint8)  # 76,800 pixels; this gateway takes 19,200
    session = await GatewaySession.connect(limited_gateway.url, loopback_ice=True, camera=camera)
    try:
        (gateway_session,) = limited_gateway.sessions.values()
        error = await session.wait_event("error", code="video_too_large", timeout=20)
        assert "320x240" in error["message"] and "19200" in error["message"]
        await wait_until(lambda: gateway_session.video_frames_dropped >= 5, timeout=20)  # the camera sends 10 a second
        assert gateway_session.latest_frame is None and gateway_session.video_frames == 0
        assert sum(e["type"] == "error" for e in session.events) == 1
        await session.say(with_silence(speak("Tell me a story.")), 16000)  # and the session goes on
        await session.wait_event("answer.done", timeout=40)
    finally:
        await session.close()


async def test_an_answer_at_the_token_limit_is_cut_with_a_clear_error(limited_gateway, speak):
    session = await GatewaySession.connect(limited_gateway.url, loopback_ice=True)
    try:
        # Short enough to stay under this gateway's 2 s utterance limit (a cut would start a second turn).
        question = speak("Tell me a story.")
        assert len(question) / 16000 < 1.6
        await session.say(with_silence(question), 16000)
        done = await session.wait_event("answer.done", timeout=40)
        assert done["truncated"] and done["text"].strip()
        error = await session.wait_event("error", code="answer_truncated", timeout=5)
        assert error["turn"] == done["turn"] and "max_answer_tokens (4)" in error["message"]
        tokens = [e for e in session.events if e["type"] == "answer.token" and e["turn"] == done["turn"]]
        assert len(tokens) == 4
    finally:
        await session.close()


async def test_a_flood_on_the_events_channel_is_answered_once_and_the_session_goes_on(limited_gateway, speak):
    session = await GatewaySession.connect(limited_gateway.url, loopback_ice=True)
    try:
        await session.wait_event("session.ready", timeout=10)
        for i in range(500):
            session.channel.send(json.dumps({"type": "spam", "n": i}))
        limited = await session.wait_event("error", code="rate_limited", timeout=10)
        assert "messages/s" in limited["message"]
        await wait_until(lambda: limited_gateway.metrics.client_messages_dropped._value.get() >= 400, timeout=10)
        answered = [e for e in session.events if e.get("code") == "unknown_message"]
        assert CLIENT_MESSAGE_BURST <= len(answered) < 100
        assert sum(e.get("code") == "rate_limited" for e in session.events) == 1
        await session.say(with_silence(speak("Good evening.")), 16000)
        final = await session.wait_event("transcript.final", timeout=20)
        assert word_error_rate("Good evening.", final["text"]) <= 0.5
    finally:
        await session.close()


async def test_an_oversized_signaling_message_closes_only_that_socket(limited_gateway):
    async with websockets.connect(limited_gateway.url, max_size=None) as websocket:
        await websocket.send(json.dumps({"type": "offer", "sdp": "v=0\r\n" + "a" * 100_000}))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(websocket.recv(), 10)
        assert websocket.close_code == 1009
    session = await GatewaySession.connect(limited_gateway.url, loopback_ice=True)
    assert session.connected
    await session.close()


def test_pending_connections_are_capped_per_address_and_in_all():
    pending = PendingConnections(total=4, per_address=2)
    assert pending.admit("a1", "10.0.0.1") is None and pending.admit("a2", "10.0.0.1") is None
    assert "per address" in pending.admit("a3", "10.0.0.1")
    assert pending.admit("b1", "10.0.0.2") is None and pending.admit("b2", "10.0.0.2") is None
    assert "in all" in pending.admit("c1", "10.0.0.3")
    assert len(pending) == 4  # refusals count nothing
    pending.done("a1")
    pending.done("a1")  # twice: nothing more
    assert len(pending) == 3 and pending.admit("c1", "10.0.0.3") is None
    assert "in all" in pending.admit("d1", "10.0.0.4")
    pending.done("b1")
    assert pending.admit("a3", "10.0.0.1") is None and "per address" in pending.admit("a4", "10.0.0.1")


def test_when_every_place_is_taken_the_biggest_holder_gives_up_its_oldest():
    pending = PendingConnections(total=4, per_address=3)
    for key in ("a1", "a2", "a3", "b1"):
        pending.admit(key, "10.0.0.1" if key[0] == "a" else "10.0.0.2")
    assert pending.evict_for("10.0.0.3") == "a1"  # the oldest of the one holding most
    pending.done("a1"), pending.admit("c1", "10.0.0.3")
    assert pending.evict_for("10.0.0.3") == "a2"
    pending.done("a2"), pending.admit("c2", "10.0.0.3")
    assert pending.evict_for("10.0.0.3") is None  # no one holds more than 10.0.0.3 does now
    assert pending.evict_for("10.0.0.2") == "c1"  # 10.0.0.3 holds 2, 10.0.0.2 only 1


def test_offer_rates_are_per_client_and_memory_is_bounded():
    now = [0.0]
    rates = ClientRates(per_minute=3, max_clients=2, clock=lambda: now[0])
    assert [rates.allow("x") for _ in range(4)] == [True, True, True, False]
    assert rates.exhausted("x") and not rates.exhausted("y") and not rates.exhausted("never-seen")
    assert rates.allow("y")  # another client is not affected
    now[0] += 20  # a third of a minute: one offer back
    assert rates.allow("x") and not rates.allow("x")
    for n in range(100):
        rates.allow(f"spoofed-{n}")
    assert len(rates._buckets) == 2


def _from(address: str) -> dict:
    """``websockets.connect`` options for a connection from ``address`` (any of 127.0.0.0/8 on loopback)."""
    return {"local_addr": (address, 0), "open_timeout": 5}


async def test_idle_signaling_connections_are_capped_and_a_real_client_gets_in(workers):
    _, urls = workers
    settings = GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5, max_pending_signaling=5, max_pending_signaling_per_address=3)
    gateway = Gateway(settings, urls)
    port = await gateway.start("127.0.0.1", 0)
    url = f"ws://127.0.0.1:{port}/session"

    async def refused_from(address: str) -> bytes:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(url, **_from(address))
        assert refused.value.response.status_code == 503
        return refused.value.response.body

    async with contextlib.AsyncExitStack() as stack:

        async def idle_from(address: str):
            return await stack.enter_async_context(websockets.connect(url, **_from(address)))

        hog = [await idle_from("127.0.0.2") for _ in range(3)]
        assert b"too_many_pending" in await refused_from("127.0.0.2") and b"per address" in await refused_from("127.0.0.2")
        session = await GatewaySession.connect(url, loopback_ice=True)  # another address still gets in
        try:
            assert session.connected and len(gateway.pending) == 3  # an offer made is not pending
            other = [await idle_from("127.0.0.3") for _ in range(2)]  # all 5 places taken
            newcomer = [await idle_from("127.0.0.4")]  # gets in: the biggest holder's oldest place is ended
            await asyncio.wait_for(hog[0].wait_closed(), 5)
            assert hog[0].close_code == 1013 and hog[0].close_reason == "too_many_pending"
            newcomer.append(await idle_from("127.0.0.4"))  # .2 held 3: it gives up another place
            await asyncio.wait_for(hog[1].wait_closed(), 5)
            assert b"in all" in await refused_from("127.0.0.4")  # now no one holds more than .4 does
            await other[0].close()  # a closed connection frees its place
            await wait_until(lambda: len(gateway.pending) == 4, timeout=5)
            newcomer.append(await idle_from("127.0.0.4"))
            assert session.connected and not hog[2].close_code
        finally:
            await session.close()
    await wait_until(lambda: len(gateway.pending) == 0, timeout=5)
    await gateway.close()


async def test_offers_over_the_rate_are_refused_before_parsing_and_other_clients_go_on(workers):
    _, urls = workers
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5, offers_per_minute=3), urls)
    port = await gateway.start("127.0.0.1", 0)
    url = f"ws://127.0.0.1:{port}/session"
    codes = []
    for _ in range(4):
        try:
            async with websockets.connect(url, **_from("127.0.0.2")) as websocket:
                await websocket.send(json.dumps({"type": "offer", "sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"}))
                codes.append(json.loads(await asyncio.wait_for(websocket.recv(), 10))["code"])
        except websockets.InvalidStatus as refused:  # the client is its address: refused before anything is read
            assert b"rate_limited" in refused.response.body
            codes.append(refused.response.status_code)
    assert codes == ["bad_offer"] * 3 + [429]
    with pytest.raises((OSError, websockets.InvalidHandshake)):  # told once: now aborted at accept, unread
        await websockets.connect(url, **_from("127.0.0.2"))
    session = await GatewaySession.connect(url, loopback_ice=True)
    assert session.connected
    await session.close()
    await gateway.close()
