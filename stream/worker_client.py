"""Async client of one worker: many concurrent jobs multiplexed on one WebSocket.

The gateway uses it to reach workers; operators and tests use it to talk to a
worker directly::

    async with await WorkerClient.connect("ws://127.0.0.1:8701") as stt:
        async for result in stt.transcribe(samples_16k):
            print("final" if result.final else "partial", result.text)

Protocol rules live in :class:`stream.protocol.Connection`; this module only
moves frames and hands each job its own bounded queue of events.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import websockets
from pydantic import BaseModel
from websockets.asyncio.client import ClientConnection, connect

from .protocol import (
    DEFAULT_LIMITS,
    Connection,
    Error,
    ErrorCode,
    Hello,
    JobCancel,
    JobDone,
    JobEnd,
    JobFlush,
    JobResult,
    JobStart,
    JobText,
    LoadReport,
    LoadRequest,
    MediaFormat,
    MediaFrame,
    ProtocolError,
    Role,
    WorkerKind,
)
from .protocol.jobs import (
    STT_SAMPLE_RATE,
    ChatMessage,
    LlmParams,
    LlmResult,
    SttParams,
    SttResult,
    TtsParams,
    TtsResult,
    VisionParams,
    VisionResult,
)

log = logging.getLogger("edgestream.client")

JOB_EVENT_QUEUE = 1024
"""Events buffered per job; when full, the reader waits (backpressure on the worker)."""


class JobFailed(Exception):
    """The worker refused or failed the job (``code`` says why)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


class ConnectionLost(JobFailed):
    def __init__(self, message: str = "connection to the worker was lost") -> None:
        super().__init__(ErrorCode.INTERNAL, message)


@dataclass(frozen=True, slots=True)
class SpeechChunk:
    """A piece of a TTS job's audio, as it streams."""

    pcm: np.ndarray
    sample_rate: int


JobEvent = JobResult | MediaFrame | JobDone


class JobHandle:
    """One job on a worker: send its input, iterate over its results."""

    def __init__(self, client: WorkerClient, job_id: int) -> None:
        self.client = client
        self.job_id = job_id
        self.done: JobDone | None = None
        self._events: asyncio.Queue[JobEvent | BaseException] = asyncio.Queue(JOB_EVENT_QUEUE)
        self._audio_seq = 0
        self._text_seq = 0

    async def send_audio(self, samples: np.ndarray, sample_rate: int = STT_SAMPLE_RATE) -> None:
        """Send mono int16 PCM."""
        frame = MediaFrame(self.job_id, self._audio_seq, MediaFormat.PCM_S16LE, np.asarray(samples, "<i2").tobytes(), 1, sample_rate)
        self._audio_seq += 1
        await self.client._send_frame(frame)

    async def send_image(self, data: bytes, media_format: MediaFormat) -> None:
        await self.client._send_frame(MediaFrame(self.job_id, 0, media_format, data))

    async def send_text(self, text: str) -> None:
        await self.client._send(JobText(job_id=self.job_id, seq=self._text_seq, text=text))
        self._text_seq += 1

    async def flush(self) -> None:
        """Ask for a result for all input so far, now (``job.flush``; STT answers with a flushed transcript)."""
        await self.client._send(JobFlush(job_id=self.job_id))

    async def end(self) -> None:
        """No more input."""
        await self.client._send(JobEnd(job_id=self.job_id))

    async def cancel(self) -> None:
        """Ask the worker to stop; the events end with ``job.done`` reason ``cancelled``."""
        if self.job_id in self.client.protocol.jobs:
            await self.client._send(JobCancel(job_id=self.job_id))

    def forget(self) -> None:
        """Nothing more of this job will be read: its late events are dropped, not queued."""
        self.client._handles.pop(self.job_id, None)

    @property
    def open(self) -> bool:
        """Whether the job may still be running on the worker."""
        return self.job_id in self.client.protocol.jobs

    async def next_event(self) -> JobResult | MediaFrame | None:
        """The next result or media frame; ``None`` once the job is done; :class:`JobFailed` if it failed.

        Cancelling the wait loses nothing (unlike cancelling an async generator's ``anext``).
        """
        if self.done is not None:
            return None
        event = await self._events.get()
        if isinstance(event, BaseException):
            raise event
        if isinstance(event, JobDone):
            self.done = event
            return None
        return event

    async def events(self) -> AsyncIterator[JobResult | MediaFrame]:
        """Results and media frames until the job is done; :class:`JobFailed` if it fails."""
        while (event := await self.next_event()) is not None:
            yield event

    async def _deliver(self, event: JobEvent | BaseException) -> None:
        await self._events.put(event)


class WorkerClient:
    """A connection to one worker. Create with :meth:`connect`."""

    def __init__(self, websocket: ClientConnection, protocol: Connection, hello: Hello, url: str) -> None:
        self.websocket = websocket
        self.protocol = protocol
        self.hello = hello
        self.url = url
        self.load: LoadReport | None = None
        self.errors: collections.deque[Error] = collections.deque(maxlen=32)
        """Recent errors not tied to a job (refused messages)."""
        self._handles: dict[int, JobHandle] = {}
        self._load_waiters: list[asyncio.Future[LoadReport]] = []
        self._reader = asyncio.create_task(self._read(), name=f"worker-client {url}")

    @classmethod
    async def connect(
        cls,
        url: str,
        kind: WorkerKind | None = None,
        open_timeout: float = 10.0,
        *,
        key: bytes | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> WorkerClient:
        """Connect, take the worker's hello (``kind``, if given, must match), and authenticate.

        With ``key``, the worker must prove that it holds the same key before
        this returns (:mod:`stream.protocol.auth`); a worker that cannot, or
        asks for a key this client lacks, raises :class:`ProtocolError` with
        code ``unauthorized``. ``ssl_context`` verifies a ``wss://`` worker's
        certificate (``stream/tls.py``).
        """
        protocol = Connection(Role.CLIENT, kind, key=key)
        limits = DEFAULT_LIMITS
        websocket = await connect(
            url,
            open_timeout=open_timeout,
            max_size=max(limits.max_frame_bytes, limits.max_text_bytes),
            ping_interval=5,
            ping_timeout=15,
            # No permessage-deflate: the frames are mostly PCM, which barely
            # compresses, and deflating every 20 ms frame costs CPU and latency on a LAN.
            compression=None,
            ssl=ssl_context if url.startswith("wss:") else None,
        )
        try:
            async with asyncio.timeout(open_timeout):
                first = await websocket.recv()
                hello = protocol.receive_text(first) if isinstance(first, str) else None
                if not isinstance(hello, Hello):
                    raise ProtocolError(ErrorCode.BAD_STATE, "the worker did not start with hello")
                if not protocol.authenticated:
                    await websocket.send(protocol.send(protocol.auth()))
                    reply = await websocket.recv()
                    message = protocol.receive_text(reply) if isinstance(reply, str) else None
                    if isinstance(message, Error):
                        raise ProtocolError(ErrorCode.UNAUTHORIZED, f"worker {hello.worker_id} refused: {message.message}")
                    if not protocol.authenticated:
                        raise ProtocolError(ErrorCode.UNAUTHORIZED, f"worker {hello.worker_id} did not answer auth")
        except BaseException:
            await websocket.close()
            raise
        return cls(websocket, protocol, hello, url)

    async def __aenter__(self) -> WorkerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.websocket.close()
        # The reader may be held up delivering to a job nobody reads any more
        # (bounded queues): give it a moment, then stop it.
        done, _ = await asyncio.wait({self._reader}, timeout=2.0)
        if not done:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    def abort(self) -> None:
        """Drop the connection now, without a closing handshake (a stalled worker would not answer one).

        Every open job fails at once with :class:`ConnectionLost`.
        """
        if self.websocket.transport is not None:
            self.websocket.transport.abort()

    @property
    def closed(self) -> bool:
        return self._reader.done()

    async def ping(self) -> float:
        """A WebSocket ping's round trip, in seconds (the pool's health check and RTT estimate)."""
        pong = await self.websocket.ping()
        return await pong

    # -- jobs ------------------------------------------------------------------

    async def start_job(self, params: BaseModel | dict[str, Any], *, trace: str | None = None) -> JobHandle:
        """Open a job on the worker with kind-specific ``params``; ``trace`` (a turn id) goes into the worker's logs."""
        if isinstance(params, BaseModel):
            params = params.model_dump(exclude_defaults=True)
        job_id = self.protocol.next_job_id()
        handle = JobHandle(self, job_id)
        self._handles[job_id] = handle
        try:
            await self._send(JobStart(job_id=job_id, kind=self.hello.kind, params=params, trace=trace))
        except BaseException:
            self._handles.pop(job_id, None)
            raise
        return handle

    async def request_load(self, timeout: float = 5.0) -> LoadReport:
        waiter: asyncio.Future[LoadReport] = asyncio.get_running_loop().create_future()
        self._load_waiters.append(waiter)
        await self._send(LoadRequest())
        return await asyncio.wait_for(waiter, timeout)

    # -- conveniences, one per kind ------------------------------------------

    async def transcribe(self, samples: np.ndarray, *, frame_s: float = 0.02, pace: bool = False, params: SttParams | None = None) -> AsyncIterator[SttResult]:
        """Stream 16 kHz mono int16 ``samples`` as one utterance; yield partials, then the final."""
        job = await self.start_job(params or SttParams())
        step = int(frame_s * STT_SAMPLE_RATE)

        async def feed() -> None:
            for start in range(0, len(samples), step):
                await job.send_audio(samples[start : start + step])
                if pace:
                    await asyncio.sleep(frame_s)
            await job.end()

        feeder = asyncio.create_task(feed())
        try:
            async for event in job.events():
                if isinstance(event, JobResult):
                    yield SttResult.model_validate(event.data)
            await feeder
        finally:
            feeder.cancel()

    async def chat(self, messages: Sequence[ChatMessage | dict[str, str]], **options: Any) -> AsyncIterator[str]:
        """Yield the answer's text piece by piece."""
        params = LlmParams(messages=[ChatMessage.model_validate(m) if isinstance(m, dict) else m for m in messages], **options)
        job = await self.start_job(params)
        await job.end()
        async for event in job.events():
            if isinstance(event, JobResult):
                yield LlmResult.model_validate(event.data).text

    async def synthesize(self, text: str, **options: Any) -> AsyncIterator[SpeechChunk | TtsResult]:
        """Yield audio chunks as they are synthesized, and a :class:`TtsResult` after each clause."""
        job = await self.start_job(TtsParams(text=text, **options))
        await job.end()
        async for event in job.events():
            if isinstance(event, MediaFrame):
                yield SpeechChunk(np.frombuffer(event.payload, "<i2"), event.sample_rate)
            else:
                yield TtsResult.model_validate(event.data)

    async def analyze_image(self, data: bytes, media_format: MediaFormat, *, trace: str | None = None, **options: Any) -> VisionResult:
        job = await self.start_job(VisionParams(**options), trace=trace)
        await job.send_image(data, media_format)
        await job.end()
        result: VisionResult | None = None
        async for event in job.events():
            if isinstance(event, JobResult):
                result = VisionResult.model_validate(event.data)
        if result is None:
            raise JobFailed(ErrorCode.INTERNAL, "vision job ended without a result")
        return result

    # -- transport -------------------------------------------------------------

    async def _send(self, message: JobStart | JobText | JobFlush | JobEnd | JobCancel | LoadRequest) -> None:
        try:
            await self.websocket.send(self.protocol.send(message))
        except websockets.ConnectionClosed:
            raise ConnectionLost() from None

    async def _send_frame(self, frame: MediaFrame) -> None:
        try:
            await self.websocket.send(self.protocol.send_frame(frame))
        except websockets.ConnectionClosed:
            raise ConnectionLost() from None

    async def _read(self) -> None:
        reason = "connection to the worker was lost"
        try:
            async for data in self.websocket:
                try:
                    event = self.protocol.receive_text(data) if isinstance(data, str) else self.protocol.receive_binary(data)
                except ProtocolError as exc:
                    log.warning("%s: bad frame from worker: %s", self.url, exc)
                    continue
                if event is not None:
                    await self._dispatch(event)
        except websockets.ConnectionClosed as exc:
            reason = f"connection to the worker closed ({exc.rcvd.code if exc.rcvd else 'no close frame'})"
        finally:
            for handle in self._handles.values():
                with contextlib.suppress(asyncio.QueueFull):
                    handle._events.put_nowait(ConnectionLost(reason))
            self._handles.clear()
            for waiter in self._load_waiters:
                if not waiter.done():
                    waiter.set_exception(ConnectionLost(reason))

    async def _dispatch(self, event: Any) -> None:
        if isinstance(event, LoadReport):
            self.load = event
            waiters, self._load_waiters = self._load_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(event)
        elif isinstance(event, Error):
            handle = self._handles.pop(event.job_id, None) if event.job_id is not None else None
            if handle is not None:
                await handle._deliver(JobFailed(event.code, event.message))
            else:
                log.warning("%s: worker refused a message: %s: %s", self.url, event.code.value, event.message)
                self.errors.append(event)
        elif isinstance(event, (JobResult, MediaFrame, JobDone)):
            handle = self._handles.get(event.job_id)
            if handle is not None:
                if isinstance(event, JobDone):
                    del self._handles[event.job_id]
                await handle._deliver(event)
