"""The gateway over real WebRTC (the SDK as client, aiortc on both ends) with the real models."""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest
import websockets
from aiortc import RTCConfiguration, RTCPeerConnection

from gateway.server import Gateway
from stream.audio import rms_dbfs
from stream.config import GatewaySettings
from stream.protocol import WorkerKind
from stream.sdk import GatewayError, GatewaySession
from tests.conftest import with_silence, word_error_rate

QUESTION = "What is the capital of France?"


def trimmed(samples: np.ndarray, threshold: int = 300) -> np.ndarray:
    """The speech without the silence piper puts around it."""
    loud = np.nonzero(np.abs(samples) > threshold)[0]
    return samples[loud[0] : loud[-1] + 1]


async def test_a_spoken_question_gets_a_spoken_answer(gateway, speak):
    session = await GatewaySession.connect(gateway.url, loopback_ice=True)
    try:
        spoken = speak(QUESTION)
        speech_end = await session.say(with_silence(spoken, after_s=0.0), 16000)
        await session.say(np.zeros(16000, np.int16), 16000)
        partial = await session.wait_event("transcript.partial", timeout=20)
        final = await session.wait_event("transcript.final", timeout=20)
        assert word_error_rate(QUESTION, final["text"]) <= 0.2, final
        assert partial["turn"] == final["turn"] == 1
        token = await session.wait_event("answer.token", timeout=20)
        done = await session.wait_event("answer.done", timeout=30)
        assert token["text"] and done["text"].strip()
        latency = await session.wait_event("latency", timeout=30)
        for stage in ("end_of_turn", "stt_final", "first_token", "first_clause", "first_tts_audio", "first_audio_sent"):
            assert latency[stage] is not None and latency[stage] >= 0, latency
        assert latency["stt_final"] <= latency["first_token"] <= latency["first_clause"] <= latency["first_audio_sent"]
        # Speculation may prepare the answer early, but nothing plays before the turn has ended.
        assert latency["end_of_turn"] <= latency["first_audio_sent"]
        heard = session.first_audible(after=speech_end)
        assert heard is not None
        # Wait until the answer has played out, then check what was heard.
        async with asyncio.timeout(30):
            while len(session.answer_audio(after=heard)) < 48000 * 0.5 or session.received[-1][0] - heard < 0.6:
                await asyncio.sleep(0.1)
        answer_audio = session.answer_audio(after=heard)
        assert len(answer_audio) / 48000 >= 0.5 and rms_dbfs(answer_audio) > -40
    finally:
        await session.close()


async def test_barge_in_stops_playout_and_cancels_the_answer(gateway, workers, speak):
    servers, _ = workers
    cancelled_before = servers[WorkerKind.LLM].jobs_cancelled + servers[WorkerKind.TTS].jobs_cancelled
    session = await GatewaySession.connect(gateway.url, loopback_ice=True)
    try:
        # A question whose answer is long enough to interrupt.
        await session.say(with_silence(speak("Tell me a long story about a dragon and a knight."), after_s=0.6), 16000)
        await session.wait_event("answer.token", timeout=30, turn=1)
        heard = None
        async with asyncio.timeout(20):
            while heard is None:
                heard = session.first_audible(after=0)
                await asyncio.sleep(0.05)
        # The person talks over the answer.
        await session.say(with_silence(speak("Stop. What is two plus two?"), before_s=0.0, after_s=0.6), 16000)
        barge = await session.wait_event("barge_in", timeout=20)
        assert barge["turn"] == 1
        interrupted = await session.wait_event("answer.done", turn=1, timeout=20)
        assert interrupted["interrupted"] is True
        # Earlier jobs were cancelled on the workers, and the new turn is answered.
        async with asyncio.timeout(10):
            while servers[WorkerKind.LLM].jobs_cancelled + servers[WorkerKind.TTS].jobs_cancelled <= cancelled_before:
                await asyncio.sleep(0.05)
        final = await session.wait_event("transcript.final", turn=2, timeout=20)
        assert "two" in final["text"].lower() or "2" in final["text"]
        second = await session.wait_event("answer.done", turn=2, timeout=30)
        assert second["text"].strip() and not second["interrupted"]
    finally:
        await session.close()


async def test_camera_text_reaches_the_answer_context(gateway, workers, speak):
    from tests.test_worker_vision import sign

    _servers, _ = workers
    image = np.asarray(sign("EXIT GATE 7"))
    session = await GatewaySession.connect(gateway.url, camera=image, loopback_ice=True)
    try:
        async with asyncio.timeout(10):
            while not any(s.video_frames for s in gateway.sessions.values()):
                await asyncio.sleep(0.05)
        await session.say(with_silence(speak("What does the sign say?")), 16000)
        vision = await session.wait_event("vision", timeout=30, turn=1)
        assert "EXITGATE7" in vision["text"].replace(" ", "").upper()
        await session.wait_event("answer.done", timeout=30, turn=1)
        gateway_session = next(iter(gateway.sessions.values()))
        assert any("EXIT GATE 7" in m.content.upper() for m in gateway_session.runner.conversation.last_prompt)
    finally:
        await session.close()


# -- bad input: each gets a clear error; the gateway and other sessions keep going --------


async def signaling_reply(url: str, message: str) -> dict:
    async with websockets.connect(url) as websocket:
        await websocket.send(message)
        reply = json.loads(await asyncio.wait_for(websocket.recv(), 10))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(websocket.recv(), 10)
    return reply


async def assert_gateway_still_answers(gateway, speak) -> None:
    session = await GatewaySession.connect(gateway.url, loopback_ice=True)
    try:
        await session.say(with_silence(speak("My favorite color is green.")), 16000)
        final = await session.wait_event("transcript.final", timeout=20)
        assert "green" in final["text"].lower()
    finally:
        await session.close()


async def wait_cleaned_up(gateway, workers) -> None:
    servers, _ = workers
    async with asyncio.timeout(15):
        while gateway.sessions or any(s.running for s in servers.values()):
            await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("not json", "malformed"),
        ('{"type": "answer", "sdp": "v=0"}', "malformed"),
        ('{"type": "offer", "sdp": "this is not SDP"}', "bad_offer"),
        ('{"type": "offer", "sdp": "v=0\\r\\no=- 1 1 IN IP4 0.0.0.0\\r\\ns=-\\r\\nt=0 0\\r\\n"}', "bad_offer"),
    ],
    ids=["not-json", "not-an-offer", "garbage-sdp", "offer-without-media"],
)
async def test_malformed_offer_is_refused_clearly(gateway, workers, speak, message, code):
    reply = await signaling_reply(gateway.url, message)
    assert reply["type"] == "error" and reply["code"] == code and reply["message"]
    await wait_cleaned_up(gateway, workers)
    await assert_gateway_still_answers(gateway, speak)


async def test_offer_with_hundreds_of_media_sections_or_no_fingerprint_is_refused_before_aiortc_parses_it(gateway, workers, speak):
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    compact = "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:111 opus/48000/2\r\n"  # ~70 bytes a section
    threads = threading.active_count()
    reply = await signaling_reply(gateway.url, json.dumps({"type": "offer", "sdp": sdp + compact * 200}))
    assert reply["code"] == "bad_offer" and "201 media sections" in reply["message"]
    assert threading.active_count() <= threads + 2  # no decoder thread per section
    unsigned = "".join(line for line in sdp.splitlines(keepends=True) if not line.startswith("a=fingerprint"))
    reply = await signaling_reply(gateway.url, json.dumps({"type": "offer", "sdp": unsigned}))
    assert reply["code"] == "bad_offer" and "fingerprint" in reply["message"]
    reply = await signaling_reply(gateway.url, "[" * 5000)
    assert reply["code"] == "malformed" and "deep" in reply["message"]
    await wait_cleaned_up(gateway, workers)
    await assert_gateway_still_answers(gateway, speak)


async def test_offer_without_opus_is_refused_clearly(gateway, workers, speak):
    from aiortc.rtcrtpsender import RTCRtpSender

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    transceiver = pc.addTransceiver("audio")
    transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType == "audio/PCMU"])
    await pc.setLocalDescription(await pc.createOffer())
    try:
        reply = await signaling_reply(gateway.url, json.dumps({"type": "offer", "sdp": pc.localDescription.sdp}))
    finally:
        await pc.close()
    assert reply["code"] == "bad_offer" and "Opus" in reply["message"]
    await wait_cleaned_up(gateway, workers)
    await assert_gateway_still_answers(gateway, speak)


async def test_client_that_never_completes_ice_is_timed_out(gateway, workers, speak):
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no public STUN server
    pc.addTransceiver("audio")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()  # gone before ICE can answer a single check
    async with websockets.connect(gateway.url) as websocket:
        await websocket.send(json.dumps({"type": "offer", "sdp": sdp}))
        assert json.loads(await websocket.recv())["type"] == "answer"
        assert len(gateway.sessions) == 1
        error = json.loads(await asyncio.wait_for(websocket.recv(), gateway.settings.ice_timeout_s + 10))
    assert error["code"] == "ice_timeout"
    await wait_cleaned_up(gateway, workers)
    await assert_gateway_still_answers(gateway, speak)


async def test_client_leaving_mid_turn_is_cleaned_up(gateway, workers, speak):
    servers, _ = workers
    other = await GatewaySession.connect(gateway.url, loopback_ice=True)  # must not notice anything
    session = await GatewaySession.connect(gateway.url, loopback_ice=True)
    gateway_session = gateway.sessions[session.session_id]
    await session.say(speak("The train to Boston leaves at seven and arrives at noon."), 16000)
    await session.wait_event("transcript.partial", timeout=20)
    assert gateway_session.runner.jobs  # an STT job is open for the turn
    await session.close()  # mid-utterance: no end of speech, no goodbye
    async with asyncio.timeout(15):
        while session.session_id in gateway.sessions or servers[WorkerKind.STT].running:
            await asyncio.sleep(0.05)
    assert gateway_session.task_count == 0 and not gateway_session.runner.jobs
    await other.say(with_silence(speak("Please turn on the kitchen lights.")), 16000)
    final = await other.wait_event("transcript.final", timeout=20)
    assert "kitchen" in final["text"].lower()
    await other.close()
    await wait_cleaned_up(gateway, workers)


async def test_missing_worker_kind_is_reported_and_the_session_survives(workers, speak):
    _, urls = workers
    unreachable = {**urls, WorkerKind.LLM: ["ws://127.0.0.1:9"]}
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5), unreachable)
    port = await gateway.start("127.0.0.1", 0)
    try:
        await gateway.pool.wait_ready([WorkerKind.STT, WorkerKind.TTS], timeout=10)
        session = await GatewaySession.connect(f"ws://127.0.0.1:{port}/session", loopback_ice=True)
        await session.say(with_silence(speak("What is the weather like in Paris today?")), 16000)
        final = await session.wait_event("transcript.final", timeout=20)
        assert "weather" in final["text"].lower()  # heard (tiny.en slips on a word of piper's now and then)
        error = await session.wait_event("error", timeout=20)
        assert error["code"] == "no_worker" and "llm" in error["message"] and error["turn"] == 1
        # Still alive: the next turn is heard too.
        await session.say(with_silence(speak("My favorite color is green.")), 16000)
        second = await session.wait_event("transcript.final", timeout=20, turn=2)
        assert "green" in second["text"].lower()
        await session.close()
    finally:
        await gateway.close()


async def test_session_limit_is_a_clear_error(workers):
    _, urls = workers
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, max_sessions=1), urls)
    port = await gateway.start("127.0.0.1", 0)
    url = f"ws://127.0.0.1:{port}/session"
    try:
        first = await GatewaySession.connect(url, loopback_ice=True)
        with pytest.raises(GatewayError) as info:
            await GatewaySession.connect(url, loopback_ice=True)
        assert info.value.code == "too_many_sessions"
        await first.close()
    finally:
        await gateway.close()


async def test_a_pause_inside_a_turn_does_not_cut_it(workers, speak):
    """Speech resumes after the speculative pause: the turn goes on, no audio is lost.

    The pause is long enough for the speculative answer to be under way when
    speech resumes (its transcript takes ~50-300 ms here, with the models in
    this process), and short of the end of the turn.
    """
    _, urls = workers
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5, end_silence_ms=900), urls)
    port = await gateway.start("127.0.0.1", 0)
    await gateway.pool.wait_ready([WorkerKind.STT, WorkerKind.LLM, WorkerKind.TTS], timeout=10)
    session = await GatewaySession.connect(f"ws://127.0.0.1:{port}/session", loopback_ice=True)
    try:
        first, second = trimmed(speak("Please turn on the kitchen lights")), trimmed(speak("and close the door."))
        pause = np.zeros(int(16000 * 0.6), np.int16)  # past speculate_after_ms, short of end_silence_ms
        await session.say(with_silence(np.concatenate([first, pause, second])), 16000)
        final = await session.wait_event("transcript.final", timeout=20, turn=1)
        assert "kitchen" in final["text"].lower() and "door" in final["text"].lower(), final
        await session.wait_event("answer.done", timeout=30, turn=1)
        assert sum(1 for e in session.events if e["type"] == "transcript.final") == 1
        assert sum(1 for e in session.events if e["type"] == "answer.done") == 1
        assert gateway.sessions[session.session_id].runner.conversation.speculations_dropped >= 1  # the resume path ran
    finally:
        await session.close()
        await gateway.close()


async def test_camera_is_sampled_on_an_interval_when_configured(workers):
    from tests.test_worker_vision import sign

    _, urls = workers
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, vision_interval_s=0.5), urls)
    port = await gateway.start("127.0.0.1", 0)
    try:
        await gateway.pool.wait_ready([WorkerKind.VISION], timeout=10)
        session = await GatewaySession.connect(f"ws://127.0.0.1:{port}/session", camera=np.asarray(sign("OPEN 24H")), loopback_ice=True)
        first = await session.wait_event("vision", timeout=20)
        second = await session.wait_event("vision", timeout=20, after=session.events.index(first) + 1)
        assert "OPEN" in first["text"].upper() and first["turn"] == second["turn"] == 0  # no turn yet
        await session.close()
    finally:
        await gateway.close()


async def test_three_people_speaking_at_once_on_two_stt_slots_are_all_answered(start_worker, workers, speak):
    """The third speaker's STT job is refused as busy: it waits, asks again, its audio is replayed, and it
    is answered; no session goes deaf (issue: "three people speaking at once make one session deaf")."""
    _, urls = workers
    _, stt_url = await start_worker(WorkerKind.STT, capacity=2)
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5), {**urls, WorkerKind.STT: [stt_url]})
    port = await gateway.start("127.0.0.1", 0)
    sessions = []
    try:
        await gateway.pool.wait_ready(list(WorkerKind), timeout=10)
        questions = ["Please turn on the kitchen lights.", "What is the weather like in Paris today?", "My favorite color is green."]
        sessions = [await GatewaySession.connect(f"ws://127.0.0.1:{port}/session", loopback_ice=True) for _ in questions]
        await asyncio.gather(*(s.say(with_silence(speak(q), after_s=1.0), 16000) for s, q in zip(sessions, questions, strict=True)))
        finals = await asyncio.gather(*(s.wait_event("transcript.final", timeout=60) for s in sessions))
        for question, final in zip(questions, finals, strict=True):
            assert word_error_rate(question, final["text"]) <= 0.5, (question, final)
        done = await asyncio.gather(*(s.wait_event("answer.done", timeout=90) for s in sessions))
        assert all(d["text"].strip() for d in done)
        assert not any(e["type"] == "error" and e["code"] != "answer_truncated" for s in sessions for e in s.events)
        waited = [e for s in sessions for e in s.events if e["type"] == "waiting" and e["kind"] == "stt"]
        assert waited and "busy" in waited[0]["message"]  # the one who waited was told
        assert not any(len(line) for line in gateway.pool.waiting.values())
        # Still hearing: a second round on the same sessions.
        await asyncio.gather(*(s.say(with_silence(speak("Thank you.")), 16000) for s in sessions))
        await asyncio.gather(*(s.wait_event("transcript.final", timeout=60, turn=2) for s in sessions))
    finally:
        for session in sessions:
            await session.close()
        await gateway.close()
