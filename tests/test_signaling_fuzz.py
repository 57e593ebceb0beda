"""Signaling and data-channel input under hypothesis: every bad message gets a clear error, nothing else breaks.

Each example runs a gateway of its own (no workers: nothing here needs a
model) in a fresh event loop, so examples cannot leak into each other.
"""

from __future__ import annotations

import asyncio
import json

import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.server import Gateway
from stream.config import GatewaySettings
from stream.sdk import GatewaySession

KNOWN_CODES = {"malformed", "bad_offer", "timeout"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
offers = st.fixed_dictionaries(
    {"type": st.sampled_from(["offer", "answer", "OFFER", ""]) | st.text(max_size=8)}, optional={"sdp": json_values | st.text(max_size=300)}
)
sdp_lines = st.lists(
    st.sampled_from(
        [
            "v=0",
            "o=- 1 1 IN IP4 0.0.0.0",
            "s=-",
            "t=0 0",
            "m=audio 9 UDP/TLS/RTP/SAVPF 111",
            "a=rtpmap:111 opus/48000/2",
            "c=IN IP4 0.0.0.0",
            "a=sendrecv",
            "m=video 0 RTP/AVP 0",
        ]
    )
    | st.text(max_size=40),
    max_size=10,
)
signaling_messages = (
    st.text(max_size=200)
    | st.binary(max_size=200)
    | json_values.map(json.dumps)
    | offers.map(json.dumps)
    | sdp_lines.map(lambda lines: json.dumps({"type": "offer", "sdp": "\r\n".join(lines) + "\r\n"}))
)
channel_messages = (
    st.text(max_size=300)
    | st.binary(min_size=1, max_size=300)
    | st.builds(  # shaped like the client's own messages, but wrong
        lambda kind, extra: json.dumps({"type": kind, **extra}),
        st.sampled_from(["ask", "interrupt", "offer", ""]),
        st.fixed_dictionaries({}, optional={"text": st.integers() | st.just("") | st.just(" " * 5) | st.just("x" * 5000), "extra": st.text(max_size=5)}),
    ).filter(lambda m: m != '{"type": "interrupt"}')  # the one valid message it can make
)
REFUSALS = {"malformed_message", "unknown_message", "message_too_large", "question_too_long"}


async def _refusals(messages: list[str | bytes]) -> None:
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5), {})
    port = await gateway.start("127.0.0.1", 0)
    url = f"ws://127.0.0.1:{port}/session"
    try:
        for message in messages:
            async with websockets.connect(url) as ws:
                await ws.send(message)
                reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert reply["type"] == "error" and reply["code"] in KNOWN_CODES and reply["message"], reply
        async with asyncio.timeout(10):  # a refused offer's session is cleaned up right after the reply
            while gateway.sessions:
                await asyncio.sleep(0.01)
        # Nothing else broke: a real client still gets a session.
        session = await GatewaySession.connect(url, loopback_ice=True)
        assert (await session.wait_event("session.ready", timeout=10))["session_id"] in gateway.sessions
        await session.close()
    finally:
        await gateway.close()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(signaling_messages, min_size=10, max_size=10))
def test_bad_signaling_is_refused_clearly(messages):
    asyncio.run(_refusals(messages))


async def _channel_noise(messages: list[str | bytes]) -> None:
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5), {})
    port = await gateway.start("127.0.0.1", 0)
    try:
        session = await GatewaySession.connect(f"ws://127.0.0.1:{port}/session", loopback_ice=True)
        await session.wait_event("session.ready", timeout=10)
        for message in messages:
            session.channel.send(message)
        async with asyncio.timeout(10):
            while sum(e.get("code") in REFUSALS for e in session.events) < len(messages):
                await asyncio.sleep(0.02)
        # The session is still there and connected.
        assert session.session_id in gateway.sessions and session.pc.connectionState == "connected"
        await session.close()
    finally:
        await gateway.close()


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(channel_messages, min_size=1, max_size=20))
def test_client_messages_on_the_events_channel_get_an_error_and_the_session_stays(messages):
    asyncio.run(_channel_noise(messages))
