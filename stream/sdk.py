"""The edgestream client SDK for AR devices and scripts: one WebRTC session with a gateway.

It sends a microphone (speech you queue, silence between) and optionally a
camera, receives the answer audio, and delivers the gateway's events::

    import asyncio
    from stream.audio import read_wav
    from stream.sdk import GatewaySession

    async def main():
        session = await GatewaySession.connect("ws://127.0.0.1:8080/session")
        samples, rate = read_wav("question.wav")
        await session.say(samples, rate)
        final = await session.wait_event("transcript.final")
        print("you said:", final["text"])
        done = await session.wait_event("answer.done")
        print("answer:", done["text"])
        await session.close()

    asyncio.run(main())

Run ``python -m stream.sdk question.wav`` (or ``--ask "a typed question"``) for exactly that.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import json
import ssl
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, NoReturn

import av
import numpy as np
import websockets
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .audio import FrameClock, Resampler, audio_frame
from .backoff import Backoff

RATE = 48_000
FRAME = 960  # 20 ms


class GatewayError(Exception):
    """The gateway refused the session (``code`` says why)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class MicrophoneTrack(MediaStreamTrack):
    """An audio track that plays queued speech in real time, and silence otherwise."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[tuple[np.ndarray, asyncio.Future[float] | None]] = deque()
        self._clock = FrameClock(FRAME, RATE)

    def queue(self, samples: np.ndarray, sample_rate: int) -> asyncio.Future[float]:
        """Queue mono int16 speech; the future gives the monotonic time its last sample was sent."""
        pcm = Resampler(sample_rate, RATE).push(np.asarray(samples, np.int16)) if sample_rate != RATE else np.asarray(samples, np.int16)
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        chunks = [pcm[i : i + FRAME] for i in range(0, len(pcm), FRAME)] or [np.zeros(0, np.int16)]
        for chunk in chunks[:-1]:
            self._queue.append((chunk, None))
        self._queue.append((chunks[-1], done))
        return done

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        pts = await self._clock.tick()
        samples = np.zeros(FRAME, np.int16)
        if self._queue:
            chunk, done = self._queue.popleft()
            samples[: len(chunk)] = chunk
            if done is not None and not done.done():
                done.set_result(time.monotonic())
        return audio_frame(samples, RATE, pts)


class CameraTrack(MediaStreamTrack):
    """A video track showing one RGB image (replaceable) at a steady frame rate."""

    kind = "video"

    def __init__(self, image: np.ndarray, fps: float = 10.0) -> None:
        super().__init__()
        self.image = image
        self.fps = fps
        self._start: float | None = None
        self._count = 0

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.time()
        else:
            self._count += 1
            wait = self._start + self._count / self.fps - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
        frame = av.VideoFrame.from_ndarray(self.image, format="rgb24")
        frame.pts = int(self._count * 90_000 / self.fps)
        frame.time_base = fractions.Fraction(1, 90_000)
        return frame


FINAL_CODES = frozenset({"unauthorized", "token_revoked", "bad_offer", "malformed"})
"""Refusals that another attempt cannot fix: a session that gets one is closed for good."""


class GatewaySession:
    """One conversation with a gateway. Create with :meth:`connect`.

    With ``reconnect``, the conversation outlives its connection: when the
    gateway goes away (restarted, unreachable, the network dropped), the
    session says so with a ``connection.lost`` event, retries with
    :class:`Backoff`, and says ``connection.restored`` once a new WebRTC
    session is up, with the same microphone, camera and event list.
    (Turns in flight when the connection dropped are lost with it.)
    """

    def __init__(
        self,
        url: str,
        *,
        microphone: MediaStreamTrack | None = None,
        camera: np.ndarray | None = None,
        keep_answer_s: float = 600.0,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 20.0,
        reconnect: Backoff | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.backoff = reconnect
        self.pc: RTCPeerConnection | None = None
        self.microphone = microphone or MicrophoneTrack()
        self.camera = CameraTrack(camera) if camera is not None else None
        self.channel: RTCDataChannel | None = None
        """The events channel: the gateway's events, and :meth:`ask` and :meth:`interrupt` the other way."""
        self.session_id = ""
        self.events: list[dict[str, Any]] = []
        self._event_added = asyncio.Condition()
        self.received: deque[tuple[float, np.ndarray]] = deque(maxlen=int(keep_answer_s * RATE / FRAME))
        """The last ``keep_answer_s`` of answer audio, as (monotonic arrival time, 48 kHz mono int16) per frame."""
        self.frames_received = 0
        self.reconnects = 0
        """Connections restored after a loss."""
        self._signaling: websockets.ClientConnection | None = None
        self._tasks: set[asyncio.Task] = set()
        self._link_lost = asyncio.Event()
        self._relay = MediaRelay() if reconnect else None
        """With ``reconnect``, each connection sends a proxy of the microphone and camera: aiortc
        stops a track whose sender ends, and the same sources must feed the next connection."""
        self._closing = False
        self.closed = asyncio.Event()
        """Set when the session is over for good (closed, refused, or the link lost without ``reconnect``)."""
        self.close_reason: GatewayError | None = None

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        camera: np.ndarray | None = None,
        microphone: MediaStreamTrack | None = None,
        keep_answer_s: float = 600.0,
        loopback_ice: bool = False,
        timeout: float = 20.0,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        reconnect: Backoff | bool = False,
    ) -> GatewaySession:
        """Open a session: offer audio (and video with ``camera``), wait for the answer and ICE.

        ``microphone`` replaces the built-in :class:`MicrophoneTrack` (then
        :meth:`say` is not available): a device's own audio track, or one
        that yields pre-encoded Opus packets. ``keep_answer_s`` bounds the
        answer audio kept in :attr:`received`. ``token`` is the client token
        the gateway asks for (``edgestream token create``); ``ssl_context``
        verifies a ``wss://`` gateway (``stream.tls.client_context(ca)``).
        ``reconnect`` (``True`` or a :class:`Backoff`) keeps the session
        across gateway restarts; the first connection must still succeed.
        """
        if loopback_ice:
            from stream.loopback import allow_loopback_ice

            allow_loopback_ice()
        backoff = Backoff() if reconnect is True else (reconnect or None)
        self = cls(
            url,
            microphone=microphone,
            camera=camera,
            keep_answer_s=keep_answer_s,
            token=token,
            ssl_context=ssl_context,
            timeout=timeout,
            reconnect=backoff,
        )
        try:
            await self._open()
        except BaseException:
            await self.close()
            raise
        self._spawn(self._stay_connected())
        return self

    async def _open(self) -> None:
        """One WebRTC session with the gateway: offer, answer, ICE; raises :class:`GatewayError` when refused."""
        # No ICE servers: aiortc's default is a public STUN server, and the
        # gateway is on the local network.
        pc = self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self._link_lost.clear()
        pc.addTrack(self._relay.subscribe(self.microphone, buffered=False) if self._relay else self.microphone)
        if self.camera is not None:
            pc.addTrack(self._relay.subscribe(self.camera, buffered=False) if self._relay else self.camera)
        self.channel = pc.createDataChannel("events")
        self.channel.on("message", self._on_event)
        channel_open = asyncio.Event()
        self.channel.on("open", channel_open.set)
        pc.on("track", self._on_track)
        connected = asyncio.Event()

        @pc.on("connectionstatechange")
        def _state() -> None:
            if pc.connectionState == "connected":
                connected.set()
            elif pc.connectionState in ("failed", "closed") and pc is self.pc:
                self._link_lost.set()

        async with asyncio.timeout(self.timeout):
            await pc.setLocalDescription(await pc.createOffer())  # gathers ICE candidates
            self._signaling = await websockets.connect(self.url, max_size=64 * 1024, ssl=self.ssl_context if self.url.startswith("wss:") else None)
            offer = {"type": "offer", "sdp": pc.localDescription.sdp}
            if self.token:
                offer["token"] = self.token
            await self._signaling.send(json.dumps(offer))
            reply = json.loads(await self._signaling.recv())
            if reply.get("type") == "error":
                raise GatewayError(reply.get("code", "error"), reply.get("message", ""))
            self.session_id = reply["session_id"]
            await pc.setRemoteDescription(RTCSessionDescription(sdp=reply["sdp"], type="answer"))
            await connected.wait()
            await channel_open.wait()  # ask() and interrupt() work as soon as connect returns
        self._spawn(self._watch_signaling(self._signaling))

    async def _stay_connected(self) -> None:
        """Wait for the link to drop; then end the session, or (with ``reconnect``) open a new one."""
        while True:
            await self._link_lost.wait()
            if self._closing:
                return
            if self.close_reason is None and self._signaling is not None:
                # The media may notice first; the gateway's reason follows on the signaling socket.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._signaling.wait_closed(), 1.0)
                await asyncio.sleep(0)  # let the signaling watcher record the reason
            reason = self.close_reason or GatewayError("connection_lost", "the connection to the gateway was lost")
            if self.backoff is None or reason.code in FINAL_CODES:
                self.closed.set()
                await self._notify()
                return
            self._add_event({"type": "connection.lost", "code": reason.code, "message": reason.message})
            await self._drop_connection()
            if not await self._reopen():
                return

    async def _reopen(self) -> bool:
        """Retry with backoff until a new session is up (``True``), or give up and close (``False``)."""
        assert self.backoff is not None
        attempt = 0
        while not self._closing:
            attempt += 1
            if self.backoff.max_attempts is not None and attempt > self.backoff.max_attempts:
                break
            await asyncio.sleep(self.backoff.delay(attempt))
            self.close_reason = None
            try:
                await self._open()
            except GatewayError as exc:
                self.close_reason = exc
                await self._drop_connection()
                if exc.code in FINAL_CODES:
                    break
                continue
            except (OSError, TimeoutError, websockets.WebSocketException, ValueError, KeyError):
                await self._drop_connection()
                continue
            self.reconnects += 1
            self._add_event({"type": "connection.restored", "session_id": self.session_id, "attempts": attempt})
            return True
        self.closed.set()
        await self._notify()
        return False

    async def _drop_connection(self) -> None:
        """Close this connection's signaling socket and peer connection (the session object lives on)."""
        if self._signaling is not None:
            await self._signaling.close()
        if self.pc is not None:
            await self.pc.close()

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_event(self, message: str | bytes) -> None:
        self._add_event(json.loads(message))

    def _add_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._spawn(self._notify())

    async def _notify(self) -> None:
        async with self._event_added:
            self._event_added.notify_all()

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self._spawn(self._record(track))

    async def _record(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                self.frames_received += 1
                if self.received.maxlen:
                    pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).mean(axis=1).astype(np.int16)
                    self.received.append((time.monotonic(), pcm))

    async def _watch_signaling(self, signaling: websockets.ClientConnection) -> None:
        """The session lives as long as its signaling socket; an error before the close says why it ended."""
        with contextlib.suppress(websockets.ConnectionClosed):
            async for text in signaling:
                message = json.loads(text)
                if message.get("type") == "error":
                    self.close_reason = GatewayError(message.get("code", "error"), message.get("message", ""))
        if signaling is self._signaling:
            self._link_lost.set()

    # -- using the session ---------------------------------------------------------------

    async def say(self, samples: np.ndarray, sample_rate: int) -> float:
        """Speak ``samples`` into the session; returns the monotonic time speech ended."""
        if not isinstance(self.microphone, MicrophoneTrack):
            raise TypeError("say() needs the built-in microphone track")
        return await self.microphone.queue(samples, sample_rate)

    def ask(self, text: str) -> int:
        """Send a typed question (answered in text and speech, as a turn of its own).

        Returns the index in :attr:`events` to wait from: ``wait_event("answer.done", after=i)``.
        """
        return self._send_message({"type": "ask", "text": text})

    def interrupt(self) -> int:
        """Stop the answer playing now (as speaking over it does); returns the index in :attr:`events`."""
        return self._send_message({"type": "interrupt"})

    def _send_message(self, message: dict[str, Any]) -> int:
        if self.channel is None or self.channel.readyState != "open":
            raise GatewayError("not_connected", "the session is not connected now")
        after = len(self.events)
        self.channel.send(json.dumps(message))
        return after

    async def wait_event(self, type_: str, timeout: float = 30.0, after: int = 0, **match: Any) -> dict[str, Any]:
        """The first event of ``type_`` (``"*"``: any type; index >= ``after``) whose fields equal ``match``."""

        def found() -> dict[str, Any] | None:
            for event in self.events[after:]:
                if type_ in ("*", event.get("type")) and all(event.get(k) == v for k, v in match.items()):
                    return event
            return None

        async with asyncio.timeout(timeout):
            async with self._event_added:
                while (event := found()) is None:
                    if self.closed.is_set():
                        raise self.close_reason or GatewayError("closed", "the session ended")
                    await self._event_added.wait()
        return event

    def first_audible(self, after: float, threshold_dbfs: float = -45.0) -> float | None:
        """Arrival time of the first answer frame louder than ``threshold_dbfs`` after ``after``."""
        limit = 32768 * 10 ** (threshold_dbfs / 20)
        for at, pcm in self.received:
            if at >= after and np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > limit:
                return at
        return None

    def answer_audio(self, after: float = 0.0) -> np.ndarray:
        chunks = [pcm for at, pcm in self.received if at >= after]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)

    @property
    def connected(self) -> bool:
        """Whether a connection to the gateway is up now (it is not while reconnecting)."""
        return not self._link_lost.is_set() and not self.closed.is_set()

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        await self._drop_connection()
        if self._relay is not None:  # the sources outlive connections; end them with the session
            self.microphone.stop()
            if self.camera is not None:
                self.camera.stop()
        self.closed.set()


class _Arguments(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (python -m stream.sdk --help)\n")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = _Arguments(prog="python -m stream.sdk", description="Ask a gateway one question, spoken (a sound file) or typed, and print the answer.")
    parser.add_argument("audio", nargs="?", type=Path, help="a sound file of the spoken question (WAV, FLAC, MP3, ...)")
    parser.add_argument("--ask", metavar="TEXT", help="a typed question instead of a spoken one")
    parser.add_argument("--gateway", default="ws://127.0.0.1:8080/session", help="signaling URL (default: %(default)s)")
    parser.add_argument("--token", help="the client token, if the gateway asks for one")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer (default: %(default)s)")
    arguments = parser.parse_args(argv)
    if (arguments.audio is None) == (arguments.ask is None):
        parser.error("give a sound file of a spoken question, or --ask TEXT")
    return arguments


async def _ask_once(arguments: argparse.Namespace) -> int:
    from .audio import AudioFileError, read_wav

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 1

    speech = None
    if arguments.audio is not None:
        try:
            speech = read_wav(arguments.audio)
        except AudioFileError as exc:
            return fail(str(exc))
    try:
        session = await GatewaySession.connect(arguments.gateway, token=arguments.token)
    except GatewayError as exc:
        return fail(f"the gateway refused the session: {exc}")
    except (OSError, TimeoutError, websockets.WebSocketException) as exc:
        return fail(f"cannot reach the gateway at {arguments.gateway}: {exc or type(exc).__name__}")
    try:
        await session.wait_event("session.ready", timeout=10)
        if speech is not None:
            samples, rate = speech
            await session.say(np.concatenate([samples, np.zeros(rate // 2, np.int16)]), rate)
        else:
            session.ask(arguments.ask)
        async with asyncio.timeout(arguments.timeout):
            seen = 0
            while True:  # the events of the turn, until its answer or the error that ends it
                event = await session.wait_event("*", timeout=arguments.timeout, after=seen)  # events[seen]
                seen += 1
                if event["type"] == "transcript.final":
                    print("you said:", event["text"])
                elif event["type"] == "error" and event.get("code") not in ("answer_truncated", "utterance_too_long"):
                    return fail(f"{event['code']}: {event['message']}")
                elif event["type"] == "answer.done":
                    print("answer:  ", event["text"].strip())
                    latency = await session.wait_event("latency", timeout=5, turn=event["turn"])
                    print(f"latency:  answer audio {latency.get('first_audio_sent')} ms after the end of the question")
                    return 0
    except TimeoutError:
        return fail(f"no answer within {arguments.timeout:g} s")
    except GatewayError as exc:
        return fail(f"the session ended: {exc}")
    finally:
        await session.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m stream.sdk``: one question to a gateway, its answer printed."""
    return asyncio.run(_ask_once(_arguments(argv)))


if __name__ == "__main__":
    sys.exit(main())
