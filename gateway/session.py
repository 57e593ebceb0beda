"""One WebRTC session: a peer connection, its tracks and data channel, and its conversation.

Audio in: Opus decoded by aiortc -> PyAV's resampler to 16 kHz mono -> turn
detector -> the conversation's runner (``gateway/runner.py``), which never
makes this loop wait. Video in: only the latest frame is kept (a stale frame
is worth nothing). Audio out: the answer track. Events out: the data channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import av
import numpy as np
from aiortc import RTCConfiguration, RTCDataChannel, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import InvalidAccessError, InvalidStateError, OperationError
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from stream import logs
from stream.audio import ArrivalLag
from stream.config import GatewaySettings
from stream.protocol.jobs import STT_SAMPLE_RATE

from . import client_messages
from .conversation.inputs import InterruptAnswer, TypedQuestion
from .events import ErrorEvent, Event, SessionReady
from .limits import TokenBucket
from .metrics import GatewayMetrics
from .runner import ConversationRunner
from .turns import TurnDetector, TurnSettings
from .worker_pool import WorkerPool

log = logging.getLogger("edgestream.gateway")

MAX_PENDING_EVENTS = 256
MIC_GAP_S = 1.0
"""A turn whose audio stops arriving for this long (packets, not silence: an unplugged
microphone, a client that froze) is ended as if the person had stopped speaking."""
PC_CLOSE_S = 5.0
"""How long closing the peer connection may take before the session is let go."""
CLIENT_MESSAGES_PER_S = 10
CLIENT_MESSAGE_BURST = 20
"""A client may send this many messages on the events channel at once, then ``CLIENT_MESSAGES_PER_S``."""


class BadOffer(ValueError):
    """An offer that is not an SDP offer aiortc can answer."""


def check_offer(sdp: str, max_media_sections: int) -> None:
    """Refuse an offer before aiortc parses it (a thread per media section, and a DTLS
    session it would answer without the fingerprint that secures it); raise :class:`BadOffer`."""
    lines = sdp.splitlines()
    sections = sum(1 for line in lines if line.startswith("m="))
    if sections > max_media_sections:
        raise BadOffer(f"the offer has {sections} media sections; this gateway takes {max_media_sections} at most (audio, video, data)")
    if not any(line.startswith("a=fingerprint:") for line in lines):
        raise BadOffer("the offer has no DTLS fingerprint (a=fingerprint)")


class Session:
    def __init__(self, pool: WorkerPool, settings: GatewaySettings, metrics: GatewayMetrics, client: str = "", session_id: str | None = None) -> None:
        self.id = session_id or uuid.uuid4().hex[:12]
        self.client = client
        """Who opened it: a token's name, or an address (``max_sessions_per_client`` counts by it)."""
        self.end_reason: tuple[str, str] | None = None
        """(code, message) the client is told when the gateway ends the session on purpose."""
        self.settings = settings
        self.metrics = metrics
        # No ICE server unless configured: aiortc's default is a public STUN
        # server, and nothing may leave the local network.
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(url) for url in settings.ice_servers]))
        self.runner = ConversationRunner(pool, settings, metrics, self.id, self.send, lambda: self.latest_frame)
        self.answer_track = self.runner.answer_track
        self.turns = TurnDetector(
            TurnSettings(end_silence_ms=settings.end_silence_ms, pause_ms=settings.speculate_after_ms, max_turn_ms=settings.max_utterance_s * 1000)
        )
        self.latest_frame: av.VideoFrame | None = None
        self.video_frames = 0
        self._audio_at = time.monotonic()
        """When the last audio frame arrived."""
        self.video_frames_dropped = 0
        """Camera frames above ``max_video_pixels`` (reported to the client once)."""
        self.audio_frames = 0
        self.channel: RTCDataChannel | None = None
        self._pending: list[str] = []
        self._client_messages = TokenBucket(CLIENT_MESSAGES_PER_S, CLIENT_MESSAGE_BURST)
        self._tasks: set[asyncio.Task] = set()
        self.closed = asyncio.Event()
        self.connected = asyncio.Event()
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_state)

    async def accept(self, offer_sdp: str) -> str:
        """Answer the client's offer (ICE gathering complete); raise :class:`BadOffer`."""
        check_offer(offer_sdp, self.settings.max_media_sections)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            if not any(t.kind == "audio" for t in self.pc.getTransceivers()):
                raise BadOffer("the offer has no audio")
            if "opus/48000" not in offer_sdp.lower():
                # The answer track sends Opus packets as they are (gateway/playout.py).
                raise BadOffer("the offer's audio has no Opus codec")
            self.pc.addTrack(self.answer_track)
            answer = await self.pc.createAnswer()  # aiortc refuses codecs it lacks here (OperationError)
            await self.pc.setLocalDescription(answer)
        except BadOffer:
            raise
        except (ValueError, TypeError, KeyError, IndexError, InvalidAccessError, InvalidStateError, OperationError) as exc:
            raise BadOffer(f"cannot use this offer: {exc or type(exc).__name__}") from None
        return self.pc.localDescription.sdp

    # -- callbacks -------------------------------------------------------------------

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self._spawn(self._ingest_audio(track))
            self._spawn(self._watch_microphone())
        elif track.kind == "video":
            self._spawn(self._keep_latest_frame(track))

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        self.channel = channel
        channel.on("message", self._on_client_message)
        pending, self._pending = self._pending, []
        for text in pending:
            channel.send(text)
        self.send(SessionReady(session_id=self.id))

    def _on_client_message(self, message: object) -> None:
        """A typed question or an interrupt (``gateway/client_messages.py``); anything else is
        answered with an error, and a flood once, not once per message."""
        first_refusal = not self._client_messages.refusing
        if not self._client_messages.allow():
            if first_refusal:
                log.warning("session %s: events channel flooded; dropping messages over %d/s", self.id, CLIENT_MESSAGES_PER_S)
                self.send(ErrorEvent(code="rate_limited", message=f"more than {CLIENT_MESSAGES_PER_S} messages/s on the events channel; the rest are dropped"))
            self.metrics.client_messages_dropped.inc()
            return
        try:
            parsed = client_messages.parse(message if isinstance(message, str | bytes) else str(message))
        except client_messages.BadMessage as exc:
            log.info("session %s: refused a message on the events channel: %s: %s", self.id, exc.code, exc.message)
            self.send(ErrorEvent(code=exc.code, message=exc.message))
            return
        if isinstance(parsed, client_messages.Ask):
            self.runner.handle(TypedQuestion(parsed.text))
        else:
            self.runner.handle(InterruptAnswer())

    async def _on_state(self) -> None:
        state = self.pc.connectionState
        log.info("session %s: %s", self.id, state)
        if state == "connected":
            self.connected.set()
        elif state in ("failed", "closed"):
            self.closed.set()

    # -- media -------------------------------------------------------------------

    async def _ingest_audio(self, track: MediaStreamTrack) -> None:
        # libswresample mixes down and converts in one call, and holds no audio back (stream/audio.py).
        resampler = av.AudioResampler(format="s16", layout="mono", rate=STT_SAMPLE_RATE)
        arrival = ArrivalLag()
        counts = self.metrics.ingest
        try:
            while True:
                frame = await track.recv()
                self.audio_frames += 1
                self._audio_at = time.monotonic()
                lag, lost = arrival.arrived(frame.pts, frame.samples, frame.sample_rate, self._audio_at)
                counts.frame(lag, lost)
                for out in resampler.resample(frame):
                    # one plane of samples, read in place (to_ndarray stacks planes: 4 us more a frame)
                    self._hear(np.frombuffer(out.planes[0], np.int16)[: out.samples])
        except MediaStreamError:
            pass

    def _hear(self, samples: np.ndarray) -> None:
        """16 kHz audio into turn taking, and what it decides into the conversation."""
        for event in self.turns.push(samples):
            self.runner.handle(event)

    async def _watch_microphone(self) -> None:
        """A microphone that goes quiet mid-turn (no packets at all, not silence) ends the turn.

        The turn detector counts time in received audio and would wait for
        ever, holding the turn's STT job; it hears the silence that did not
        come instead, and the turn ends as if the person had paused. A check
        a few times a second, not a timer per frame.
        """
        while True:
            await asyncio.sleep(MIC_GAP_S / 4)
            if self.turns.speaking and time.monotonic() - self._audio_at >= MIC_GAP_S:
                log.info("no audio for %g s in a turn: it ends as if the person stopped speaking", MIC_GAP_S)
                self._hear(np.zeros(int(STT_SAMPLE_RATE * (self.settings.end_silence_ms / 1000 + MIC_GAP_S)), np.int16))

    async def _keep_latest_frame(self, track: MediaStreamTrack) -> None:
        limit = self.settings.max_video_pixels
        try:
            while True:
                frame = await track.recv()
                if frame.width * frame.height > limit:
                    self.latest_frame = None  # an older, smaller frame would show a scene that is gone
                    self.video_frames_dropped += 1
                    if self.video_frames_dropped == 1:
                        log.warning("camera frames of %dx%d dropped (max_video_pixels %d)", frame.width, frame.height, limit)
                        self.send(
                            ErrorEvent(
                                code="video_too_large",
                                message=f"camera frames of {frame.width}x{frame.height} are dropped: this gateway takes {limit} pixels at most",
                            )
                        )
                    continue
                self.latest_frame = frame  # latest wins: nothing queues
                self.video_frames += 1
        except MediaStreamError:
            pass

    # -- events ---------------------------------------------------------------------

    def send(self, event: Event) -> None:
        if isinstance(event, ErrorEvent):
            self.metrics.errors.labels(event.code).inc()
        text = event.model_dump_json()
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(text)
        elif len(self._pending) < MAX_PENDING_EVENTS:
            self._pending.append(text)

    def _spawn(self, coroutine) -> None:
        with logs.bound(session=self.id):  # the task's log lines name this session
            task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def task_count(self) -> int:
        return len(self._tasks) + self.runner.task_count

    async def close(self) -> None:
        await self.runner.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(PC_CLOSE_S):  # aiortc's close waits on its transports
                await self.pc.close()
        self.answer_track.stop()
        self.closed.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
