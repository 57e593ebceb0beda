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

Run ``python -m stream.sdk question.wav`` for exactly that.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import sys
import time
from collections import deque
from typing import Any

import av
import numpy as np
import websockets
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .audio import FrameClock, Resampler, audio_frame

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


class GatewaySession:
    """One conversation with a gateway. Create with :meth:`connect`."""

    def __init__(self, microphone: MediaStreamTrack | None = None, keep_answer_s: float = 600.0) -> None:
        # No ICE servers: aiortc's default is a public STUN server, and the
        # gateway is on the local network.
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.microphone = microphone or MicrophoneTrack()
        self.camera: CameraTrack | None = None
        self.session_id = ""
        self.events: list[dict[str, Any]] = []
        self._event_added = asyncio.Condition()
        self.received: deque[tuple[float, np.ndarray]] = deque(maxlen=int(keep_answer_s * RATE / FRAME))
        """The last ``keep_answer_s`` of answer audio, as (monotonic arrival time, 48 kHz mono int16) per frame."""
        self.frames_received = 0
        self._signaling: websockets.ClientConnection | None = None
        self._tasks: list[asyncio.Task] = []
        self.closed = asyncio.Event()
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
    ) -> GatewaySession:
        """Open a session: offer audio (and video with ``camera``), wait for the answer and ICE.

        ``microphone`` replaces the built-in :class:`MicrophoneTrack` (then
        :meth:`say` is not available): a device's own audio track, or one
        that yields pre-encoded Opus packets. ``keep_answer_s`` bounds the
        answer audio kept in :attr:`received`.
        """
        if loopback_ice:
            from gateway.loopback import allow_loopback_ice

            allow_loopback_ice()
        self = cls(microphone, keep_answer_s)
        self.pc.addTrack(self.microphone)
        if camera is not None:
            self.camera = CameraTrack(camera)
            self.pc.addTrack(self.camera)
        channel = self.pc.createDataChannel("events")
        channel.on("message", self._on_event)
        self.channel = channel
        """The events channel (gateway to client; the gateway refuses what a client sends on it)."""
        self.pc.on("track", self._on_track)
        connected = asyncio.Event()

        @self.pc.on("connectionstatechange")
        def _state() -> None:
            if self.pc.connectionState == "connected":
                connected.set()
            elif self.pc.connectionState in ("failed", "closed"):
                self.closed.set()

        try:
            async with asyncio.timeout(timeout):
                await self.pc.setLocalDescription(await self.pc.createOffer())  # gathers ICE candidates
                self._signaling = await websockets.connect(url, max_size=64 * 1024)
                await self._signaling.send(json.dumps({"type": "offer", "sdp": self.pc.localDescription.sdp}))
                reply = json.loads(await self._signaling.recv())
                if reply.get("type") == "error":
                    raise GatewayError(reply.get("code", "error"), reply.get("message", ""))
                self.session_id = reply["session_id"]
                await self.pc.setRemoteDescription(RTCSessionDescription(sdp=reply["sdp"], type="answer"))
                await connected.wait()
        except BaseException:
            await self.close()
            raise
        self._tasks.append(asyncio.create_task(self._watch_signaling()))
        return self

    def _on_event(self, message: str | bytes) -> None:
        event = json.loads(message)
        self.events.append(event)
        asyncio.ensure_future(self._notify())

    async def _notify(self) -> None:
        async with self._event_added:
            self._event_added.notify_all()

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self._tasks.append(asyncio.create_task(self._record(track)))

    async def _record(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                self.frames_received += 1
                if self.received.maxlen:
                    pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).mean(axis=1).astype(np.int16)
                    self.received.append((time.monotonic(), pcm))

    async def _watch_signaling(self) -> None:
        assert self._signaling is not None
        with contextlib.suppress(websockets.ConnectionClosed):
            async for text in self._signaling:
                message = json.loads(text)
                if message.get("type") == "error":
                    self.close_reason = GatewayError(message.get("code", "error"), message.get("message", ""))
        self.closed.set()
        await self._notify()

    # -- using the session ---------------------------------------------------------------

    async def say(self, samples: np.ndarray, sample_rate: int) -> float:
        """Speak ``samples`` into the session; returns the monotonic time speech ended."""
        if not isinstance(self.microphone, MicrophoneTrack):
            raise TypeError("say() needs the built-in microphone track")
        return await self.microphone.queue(samples, sample_rate)

    async def wait_event(self, type_: str, timeout: float = 30.0, after: int = 0, **match: Any) -> dict[str, Any]:
        """The first event of ``type_`` (index >= ``after``) whose fields equal ``match``."""

        def found() -> dict[str, Any] | None:
            for event in self.events[after:]:
                if event.get("type") == type_ and all(event.get(k) == v for k, v in match.items()):
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

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._signaling is not None:
            await self._signaling.close()
        await self.pc.close()
        self.closed.set()


async def _main(path: str, url: str) -> None:
    from .audio import read_wav

    session = await GatewaySession.connect(url)
    samples, rate = read_wav(path)
    await session.say(np.concatenate([samples, np.zeros(rate // 2, np.int16)]), rate)
    print("you said:", (await session.wait_event("transcript.final"))["text"])
    print("answer:  ", (await session.wait_event("answer.done"))["text"])
    print("latency: ", await session.wait_event("latency"))
    await session.close()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ws://127.0.0.1:8080/session"))
