"""A Wyoming STT or TTS server (``tcp://host:port``) behind the same interface as :class:`~stream.worker_client.WorkerClient`.

The gateway's pool holds worker links and opens jobs on them; for a Wyoming
server (``wyoming-faster-whisper``, ``wyoming-piper``, or an edgestream
worker's ``--wyoming`` listener) this adapter plays the link, so selection,
health, failover, model pinning and metrics treat it like any worker. What
Wyoming cannot do, and what the adapter does instead:

- **One connection per request, no job ids.** Every job (STT) or every
  piece of text (TTS) opens its own TCP connection; the "link" is a
  control connection for ``describe`` health checks, reopened when lost.
- **No partial transcripts** from ``wyoming-faster-whisper``: only the
  final ``transcript`` (``transcript-chunk`` events, where a server sends
  them, are passed on as partials). **No flush**: a flush ends the audio of
  the current request (``audio-stop``) and its transcript comes back as
  the flushed one; if speech goes on, a new request gets all the audio
  again, so the final transcript still covers the whole utterance.
- **No cancel** other than closing the request's connection.
- **No load reports and no capacity** in ``info``: the capacity is taken as
  1 (the servers decode one request at a time), so selection spreads work
  rather than stacking it there.
- **Model identity**: ``info`` names the program, its version and the model
  or voice; the pin (``model_sha256``) is the SHA-256 of those names, not of
  the model file, which the server does not report.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from pydantic import BaseModel

from .audio import Resampler, pcm16_mono
from .protocol import ErrorCode, Hello, JobDone, JobResult, MediaFormat, MediaFrame, WorkerKind
from .protocol.jobs import STT_SAMPLE_RATE, SttParams, SttResult, TtsParams, TtsResult
from .worker_client import ConnectionLost, JobFailed
from .wyoming import Decoder, Event, WyomingError, encode

READ_BYTES = 64 * 1024
JOB_EVENT_QUEUE = 256
"""Results queued per job: a TTS piece of 30 s comes as ~120 chunks."""
CAPACITY = 1
DESCRIBE_EVERY_S = 5.0
"""How often a health check is a real ``describe`` round trip (wyoming-piper's ``info`` is
~100 KB); in between it checks that the control connection is still open."""


class _Connection:
    """One TCP connection to a Wyoming server: events out, events in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = Decoder()
        self.pending: collections.deque[Event] = collections.deque()

    @classmethod
    async def open(cls, host: str, port: int, timeout: float) -> _Connection:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def send(self, *events: Event) -> None:
        for event in events:
            self.writer.write(encode(event))
        await self.writer.drain()

    async def receive(self) -> Event:
        """The next event; :class:`ConnectionLost` when the server closes or breaks the framing."""
        while not self.pending:
            data = await self.reader.read(READ_BYTES)
            if not data:
                raise ConnectionLost("the Wyoming server closed the connection")
            try:
                self.pending.extend(self.decoder.feed(data))
            except WyomingError as exc:
                raise ConnectionLost(f"the Wyoming server broke the framing: {exc}") from None
        return self.pending.popleft()

    def close(self) -> None:
        self.writer.close()


def _program(info: dict[str, Any], kind: WorkerKind, voice: str | None) -> tuple[str, str]:
    """(model id, identity) of ``info``'s ``kind`` service; ValueError if the server offers none.

    The STT model is the first one listed; the TTS voice is ``voice`` (the
    URL's ``?voice=``), which must be listed, or else the server's default,
    which ``info`` does not name (wyoming-piper lists its whole catalog).
    """
    key = "asr" if kind is WorkerKind.STT else "tts"
    programs = [p for p in info.get(key) or [] if isinstance(p, dict) and p.get("installed", True)]
    if not programs:
        raise ValueError(f"the Wyoming server offers no {key} service")
    program = programs[0]
    name = f"{program.get('name')} {program.get('version')}"
    if kind is WorkerKind.TTS:
        if voice is None:
            return str(program.get("name") or "tts")[:64], f"{name} (its default voice)"
        if not any(isinstance(v, dict) and v.get("name") == voice for v in program.get("voices") or []):
            raise ValueError(f"the Wyoming server has no voice {voice!r}")
        return voice[:64], f"{name} {voice}"
    model = str((program.get("models") or [{}])[0].get("name") or program.get("name") or "stt")
    parts = [p for p in model.rstrip("/").split("/") if p]
    return "/".join(parts[-2:])[-64:] or "stt", f"{name} {model}"


class WyomingClient:
    """A Wyoming STT or TTS server as a worker link (see the module docstring). Create with :meth:`connect`."""

    def __init__(self, url: str, kind: WorkerKind, host: str, port: int, hello: Hello, control: _Connection, open_timeout: float) -> None:
        self.url = url
        self.kind = kind
        self.host = host
        self.port = port
        self.hello = hello
        self.load = None
        """Wyoming servers send no load reports."""
        self.open_timeout = open_timeout
        self._control: _Connection | None = control
        self._closed = False
        self._jobs: set[WyomingJob] = set()
        self.voice: str | None = None
        """The TTS voice asked for in each ``synthesize`` (``None``: the server's default)."""
        self._rtt: float | None = None
        self._described_at = 0.0

    @classmethod
    async def connect(
        cls, url: str, kind: WorkerKind | None = None, open_timeout: float = 10.0, *, key: bytes | None = None, ssl_context: object = None
    ) -> WyomingClient:
        """Connect, ``describe``, and read the service from ``info`` (``kind`` must be offered).

        ``key`` and ``ssl_context`` are refused: Wyoming has neither
        authentication nor TLS, so a gateway configured to authenticate its
        workers cannot use a Wyoming server without saying so in its config.
        """
        if key is not None:
            raise ValueError("Wyoming servers cannot prove a worker key; leave worker_key_file unset to use them")
        parts = urlsplit(url)
        if parts.scheme != "tcp" or not parts.hostname or not parts.port:
            raise ValueError(f"not a Wyoming URL (tcp://host:port): {url}")
        control = await _Connection.open(parts.hostname, parts.port, open_timeout)
        try:
            async with asyncio.timeout(open_timeout):
                info = await _describe(control)
            kinds = [k for k in (WorkerKind.STT, WorkerKind.TTS) if info.get("asr" if k is WorkerKind.STT else "tts")]
            chosen = kind or (kinds[0] if kinds else WorkerKind.STT)
            voice = parse_qs(parts.query).get("voice", [None])[0]
            model_id, identity = _program(info, chosen, voice)
        except BaseException:
            control.close()
            raise
        hello = Hello(
            worker_id=f"wyoming-{chosen.value}@{parts.hostname}:{parts.port}",
            kind=chosen,
            model_id=model_id,
            model_sha256=hashlib.sha256(identity.encode()).hexdigest(),
            capacity=CAPACITY,
            software=identity[:64],
            max_text_bytes=1 << 16,
            max_frame_bytes=1 << 20,
        )
        client = cls(url, chosen, parts.hostname, parts.port, hello, control, open_timeout)
        client.voice = voice
        return client

    @property
    def closed(self) -> bool:
        return self._closed

    async def ping(self) -> float:
        """The health check: a ``describe`` round trip on the control connection (reopened if the
        server closed it) every ``DESCRIBE_EVERY_S``, its RTT; in between, the last RTT while the
        connection is open (a server that dies closes it, and the next check fails)."""
        if self._control is not None and self._rtt is not None and not self._control.reader.at_eof():
            if time.monotonic() - self._described_at < DESCRIBE_EVERY_S:
                return self._rtt
        started = time.monotonic()
        try:
            if self._control is None:
                self._control = await _Connection.open(self.host, self.port, self.open_timeout)
            await _describe(self._control)
        except (OSError, ConnectionLost):
            if self._control is not None:
                self._control.close()
            self._control = None
            # One retry on a fresh connection: servers close idle connections after a request.
            control = await _Connection.open(self.host, self.port, self.open_timeout)
            if self._closed:  # aborted meanwhile: the new connection is not kept
                control.close()
                raise ConnectionLost() from None
            self._control = control
            await _describe(control)
        self._described_at = time.monotonic()
        self._rtt = self._described_at - started
        return self._rtt

    async def start_job(self, params: BaseModel | dict[str, Any], *, trace: str | None = None) -> WyomingJob:
        if self._closed:
            raise ConnectionLost()
        job = WyomingSttJob(self, params) if self.kind is WorkerKind.STT else WyomingTtsJob(self, params)
        self._jobs.add(job)
        return job

    async def open_request(self) -> _Connection:
        try:
            return await _Connection.open(self.host, self.port, self.open_timeout)
        except (OSError, TimeoutError) as exc:
            raise ConnectionLost(f"cannot reach the Wyoming server at {self.url}: {exc}") from None

    def abort(self) -> None:
        """Drop every connection now; open jobs fail with :class:`ConnectionLost`."""
        self._closed = True
        if self._control is not None:
            self._control.close()
            self._control = None
        for job in list(self._jobs):
            job.fail(ConnectionLost())

    async def close(self) -> None:
        self.abort()

    async def __aenter__(self) -> WyomingClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def _describe(connection: _Connection) -> dict[str, Any]:
    await connection.send(Event("describe"))
    while (event := await connection.receive()).type != "info":
        pass
    return event.data


class WyomingJob:
    """One job on a Wyoming server, with :class:`~stream.worker_client.JobHandle`'s interface."""

    def __init__(self, client: WyomingClient) -> None:
        self.client = client
        self.job_id = 0
        self.done: JobDone | None = None
        self._events: asyncio.Queue[JobResult | MediaFrame | JobDone | BaseException] = asyncio.Queue(JOB_EVENT_QUEUE)
        self._seq = 0
        self._open = True
        self._tasks: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None
        """Why the job failed, kept here too: a full queue cannot lose it."""

    @property
    def open(self) -> bool:
        return self._open

    async def next_event(self) -> JobResult | MediaFrame | None:
        if self.done is not None:
            return None
        if self._failure is not None and self._events.empty():
            raise self._failure
        event = await self._events.get()
        if isinstance(event, BaseException):
            self._finish()
            raise event
        if isinstance(event, JobDone):
            self.done = event
            self._finish()
            return None
        return event

    async def events(self) -> AsyncIterator[JobResult | MediaFrame]:
        """Results and media frames until the job is done; :class:`JobFailed` if it fails."""
        while (event := await self.next_event()) is not None:
            yield event

    def fail(self, error: BaseException) -> None:
        if self._open:
            self._failure = error
            self._put_nowait(error)  # wakes a reader waiting on an empty queue
            self._stop()

    async def cancel(self) -> None:
        self._stop()

    def forget(self) -> None:
        self._stop()

    async def send_image(self, data: bytes, media_format: MediaFormat) -> None:
        raise JobFailed(ErrorCode.BAD_FORMAT, "a Wyoming server takes no images")

    async def send_text(self, text: str) -> None:
        raise JobFailed(ErrorCode.BAD_FORMAT, "this Wyoming service takes no text")

    async def send_audio(self, samples: np.ndarray, sample_rate: int = STT_SAMPLE_RATE) -> None:
        raise JobFailed(ErrorCode.BAD_FORMAT, "this Wyoming service takes no audio")

    async def flush(self) -> None:
        pass

    # -- for the kinds --------------------------------------------------------------------

    def _result(self, data: dict[str, Any]) -> JobResult:
        self._seq += 1
        return JobResult(job_id=1, seq=self._seq, data=data)

    async def _put(self, event: JobResult | MediaFrame | JobDone | BaseException) -> None:
        await self._events.put(event)

    def _put_nowait(self, event: BaseException) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._events.put_nowait(event)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            self.fail(error if isinstance(error, JobFailed) else ConnectionLost(f"{type(error).__name__}: {error}"))

    def _stop(self) -> None:
        self._open = False
        for task in list(self._tasks):
            task.cancel()
        self._close_connections()
        self.client._jobs.discard(self)

    def _finish(self) -> None:
        self._open = False
        self._close_connections()
        self.client._jobs.discard(self)

    def _close_connections(self) -> None:
        pass


class WyomingSttJob(WyomingJob):
    """An utterance: ``audio-start``, chunks, ``audio-stop`` per request; a flush ends a request early."""

    def __init__(self, client: WyomingClient, params: BaseModel | dict[str, Any]) -> None:
        super().__init__(client)
        self.params = params if isinstance(params, SttParams) else SttParams.model_validate(params or {})
        self._audio: list[np.ndarray] = []
        """Everything sent: a request after a flush hears it all again."""
        self._request: _Connection | None = None
        """The request audio goes to now (``None``: none open)."""
        self._final_request: _Connection | None = None
        self._flush_reader: asyncio.Task[None] | None = None
        """The reader of the last flushed request, until its transcript came."""
        self._flushed_text: str | None = None
        """The transcript of the last flush, while no audio came after it."""
        self._audio_since_flush = True
        self._readers: dict[_Connection, asyncio.Task[None]] = {}
        """Each open request's reader (a flushed request's runs until its transcript)."""
        self._resampler: Resampler | None = None

    async def send_audio(self, samples: np.ndarray, sample_rate: int = STT_SAMPLE_RATE) -> None:
        pcm = np.asarray(samples, np.int16)
        if sample_rate != STT_SAMPLE_RATE:
            if self._resampler is None or self._resampler.from_rate != sample_rate:
                self._resampler = Resampler(sample_rate, STT_SAMPLE_RATE)  # one per job: its filter state carries on
            pcm = self._resampler.push(pcm)
        if not len(pcm):
            return
        self._audio.append(pcm)
        self._flushed_text = None
        self._audio_since_flush = True
        if self._request is None:
            await self._open_request()  # the first audio, or speech went on after a flush: all of it again
        else:
            await self._send(self._request, _chunk(pcm))

    async def flush(self) -> None:
        """End the current request: its transcript is the flushed one (see the module docstring)."""
        if self._request is None:
            await self._put(self._result(SttResult(text=self._flushed_text or "", flushed=True, final=False, audio_s=self._seconds()).model_dump()))
            return
        self._audio_since_flush = False
        self._flush_reader = self._readers.get(self._request)
        await self._end_request(self._request)

    async def end(self) -> None:
        if self._request is None and not self._audio_since_flush and self._flush_reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush_reader  # the flushed transcript, coming: it is the final one too
            if self._flushed_text is not None:
                await self._put(self._result(SttResult(text=self._flushed_text, final=True, audio_s=self._seconds()).model_dump()))
                await self._put(JobDone(job_id=1, reason="complete"))
            return
        if self._request is None:
            await self._open_request()
        assert self._request is not None
        self._final_request = self._request
        await self._end_request(self._request)

    async def _open_request(self) -> None:
        request = await self.client.open_request()
        self._request = request
        self._readers[request] = asyncio.create_task(self._read(request))
        fmt = {"rate": STT_SAMPLE_RATE, "width": 2, "channels": 1}
        await self._send(request, Event("transcribe", {"language": self.params.language}), Event("audio-start", fmt), *(_chunk(pcm) for pcm in self._audio))

    async def _end_request(self, request: _Connection) -> None:
        self._request = None
        await self._send(request, Event("audio-stop"))  # its reader delivers the transcript

    async def _send(self, request: _Connection, *events: Event) -> None:
        try:
            await request.send(*events)
        except OSError as exc:
            lost = ConnectionLost(f"the Wyoming server went away: {exc}")
            self.fail(lost)  # the job's reader hears it at once, not at the deadline
            raise lost from None

    async def _read(self, request: _Connection) -> None:
        try:
            while (event := await request.receive()).type != "transcript":
                if event.type == "transcript-chunk":
                    await self._put(self._result(SttResult(text=str(event.data.get("text", "")), final=False, audio_s=self._seconds()).model_dump()))
                elif event.type == "error":
                    raise JobFailed(ErrorCode.INTERNAL, f"Wyoming server: {event.data.get('text', 'error')}")
        except JobFailed as exc:  # ConnectionLost too: the job moves, and its audio is replayed elsewhere
            self.fail(exc)
            return
        except OSError as exc:  # a reset connection
            self.fail(ConnectionLost(f"the Wyoming server went away: {exc}"))
            return
        finally:
            request.close()
            self._readers.pop(request, None)
        text = str(event.data.get("text", "")).strip()
        if request is self._final_request:
            await self._put(self._result(SttResult(text=text, final=True, audio_s=self._seconds()).model_dump()))
            await self._put(JobDone(job_id=1, reason="complete"))
        else:  # a flush's answer (one per flush, in order)
            if not self._audio_since_flush:  # still the latest: speech did not go on since
                self._flushed_text = text
            await self._put(self._result(SttResult(text=text, flushed=True, final=False, audio_s=self._seconds()).model_dump()))

    def _seconds(self) -> float:
        return round(sum(len(a) for a in self._audio) / STT_SAMPLE_RATE, 3)

    def _close_connections(self) -> None:
        for request, reader in list(self._readers.items()):
            reader.cancel()
            request.close()
        self._readers.clear()
        self._request = None


def _chunk(pcm: np.ndarray) -> Event:
    return Event("audio-chunk", {"rate": STT_SAMPLE_RATE, "width": 2, "channels": 1}, pcm.astype("<i2").tobytes())


class WyomingTtsJob(WyomingJob):
    """Pieces of text, each one ``synthesize`` request in order; their audio streams back as PCM frames."""

    def __init__(self, client: WyomingClient, params: BaseModel | dict[str, Any]) -> None:
        super().__init__(client)
        self.params = params if isinstance(params, TtsParams) else TtsParams.model_validate(params or {})
        self._pieces: asyncio.Queue[str | None] = asyncio.Queue()
        self._request: _Connection | None = None
        if self.params.text.strip():
            self._pieces.put_nowait(self.params.text)
        self._spawn(self._speak_all())

    async def send_text(self, text: str) -> None:
        await self._pieces.put(text)

    async def end(self) -> None:
        await self._pieces.put(None)

    async def _speak_all(self) -> None:
        while (text := await self._pieces.get()) is not None:
            if text.strip():
                await self._speak(text)
        await self._put(JobDone(job_id=1, reason="complete"))

    async def _speak(self, text: str) -> None:
        self._request = request = await self.client.open_request()
        seconds, rate = 0.0, 22050
        try:
            voice = {"voice": {"name": self.client.voice}} if self.client.voice else {}
            await request.send(Event("synthesize", {"text": text, **voice}))
            while (event := await request.receive()).type != "audio-stop":
                if event.type == "audio-start":
                    rate = int(event.data.get("rate", rate))
                elif event.type == "audio-chunk" and event.payload:
                    rate, width, channels = int(event.data.get("rate", rate)), int(event.data.get("width", 2)), int(event.data.get("channels", 1))
                    if width != 2:
                        raise JobFailed(ErrorCode.BAD_FORMAT, f"the Wyoming server sent {8 * width}-bit audio")
                    pcm = pcm16_mono(event.payload, channels)
                    seconds += len(pcm) / rate
                    await self._put(MediaFrame(1, self._seq, MediaFormat.PCM_S16LE, pcm.tobytes(), 1, rate))
                elif event.type == "error":
                    raise JobFailed(ErrorCode.INTERNAL, f"Wyoming server: {event.data.get('text', 'error')}")
        finally:
            request.close()
            self._request = None
        await self._put(self._result(TtsResult(clause=text.strip(), audio_s=round(seconds, 3), sample_rate=rate).model_dump()))

    def _close_connections(self) -> None:
        if self._request is not None:
            self._request.close()
            self._request = None
