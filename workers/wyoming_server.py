"""A worker's engine as a Wyoming service, for Home Assistant and its satellites.

``edgestream worker stt --wyoming 127.0.0.1:10300`` (or ``tts``) serves the
same engine, the same capacity and the same load reports as the worker's
own WebSocket, to Wyoming clients over plain TCP (``stream/wyoming.py``
frames the events):

- ``describe`` -> ``info``: the model, its sha256 as the version, and
  ``supports_transcript_streaming`` / ``supports_synthesize_streaming``.
- STT: ``transcribe`` (optional: its ``language``), ``audio-start``,
  ``audio-chunk``..., ``audio-stop`` -> ``transcript``. While audio streams,
  the engine's partial transcripts go out as ``transcript-start`` and
  ``transcript-chunk`` events, then ``transcript-stop`` after the final
  ``transcript`` (what ``wyoming-faster-whisper`` does not do). A chunk is
  text appended to what was sent: a partial that revises earlier words is
  not sent (it cannot be taken back), and the final ``transcript`` has the
  whole, corrected text. Audio of any rate and channel count is converted
  to 16 kHz mono (PyAV's resampler); 16-bit only.
- TTS: ``synthesize`` -> ``audio-start``, ``audio-chunk``..., ``audio-stop``;
  or streamed text: ``synthesize-start``, ``synthesize-chunk``...,
  ``synthesize-stop`` -> the same audio, then ``synthesize-stopped``. Chunks
  are spoken as they come, cut into sentences (the engine's phonemizer);
  the ``synthesize`` a streaming client sends after its stream, for older
  servers, is ignored.

Wyoming has no authentication and no cancel (a client closes the
connection): the listener is loopback-only unless ``wyoming_open`` says
otherwise, and a connection that closes mid-job cancels the job. One job
per connection at a time, as the protocol has it. A job that does not fit
the worker's capacity is refused with an ``error`` event (``busy``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from stream.audio import Resampler, pcm16_mono
from stream.protocol import MediaFormat, MediaFrame, WorkerKind
from stream.protocol.jobs import STT_SAMPLE_RATE, SttParams, SttResult, TtsParams, TtsResult
from stream.wyoming import Decoder, Event, WyomingError, encode

from .job import Job, JobCancelled, TextInput
from .server import WorkerServer

log = logging.getLogger("edgestream.worker")

READ_BYTES = 64 * 1024
MAX_CONNECTIONS = 64
"""Wyoming connections held at once; more are told ``busy`` and closed. Each holds at most
one event being read (``stream/wyoming.py``: ~5 MB) and one job's queued inputs."""
PROGRAM = "edgestream"


def describe(server: WorkerServer) -> Event:
    """The ``info`` event for this worker's model."""
    model = server.engine.model
    common = {
        "name": model.model_id,
        "description": f"edgestream {server.kind.value} worker {server.worker_id}",
        "attribution": {"name": "edgestream", "url": "https://github.com/"},
        "installed": True,
        "version": model.sha256[:12],
    }
    if server.kind is WorkerKind.STT:
        program = {**common, "name": PROGRAM, "supports_transcript_streaming": True}
        program["models"] = [{**common, "languages": ["en"]}]
        return Event("info", {"asr": [program]})
    program = {**common, "name": PROGRAM, "supports_synthesize_streaming": True}
    program["voices"] = [{**common, "languages": ["en_US"], "speakers": None}]
    return Event("info", {"tts": [program]})


def _audio_format(data: dict[str, Any]) -> tuple[int, int] | None:
    """(rate, channels) of an ``audio-start``, or ``None`` if it is not audio this takes."""
    rate, width, channels = data.get("rate", STT_SAMPLE_RATE), data.get("width", 2), data.get("channels", 1)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (rate, width, channels)):
        return None
    if not 8000 <= rate <= 96000 or width != 2 or not 1 <= channels <= 8:
        return None
    return rate, channels


class WyomingSession:
    """One Wyoming client connection: events in, one job at a time on the worker's engine."""

    def __init__(self, server: WorkerServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = "{}:{}".format(*(writer.get_extra_info("peername") or ("?", 0))[:2])
        self.job: Job | None = None
        self.task: asyncio.Task[None] | None = None
        self.language = "en"
        self.streamed_text = False
        """A ``synthesize-start`` stream was served: the ``synthesize`` after it is its old-style copy."""
        self._sent_text = ""
        """What ``transcript-chunk`` events have said so far, in all."""
        self._transcript_started = False
        self._audio_started = False
        self._resampler: Resampler | None = None
        self._channels = 1
        """Of the audio since ``audio-start``."""
        self._serial = 0

    async def run(self) -> None:
        decoder = Decoder()
        try:
            while data := await self.reader.read(READ_BYTES):
                for event in decoder.feed(data):
                    await self._handle(event)
        except WyomingError as exc:
            log.warning("wyoming client %s: %s; closing", self.peer, exc)
            with contextlib.suppress(ConnectionError):
                await self._send(Event("error", {"text": str(exc), "code": "malformed"}))
        except ConnectionError:
            pass
        finally:
            await self._stop_job()
            self.writer.close()

    async def _send(self, event: Event) -> None:
        self.writer.write(encode(event))
        await self.writer.drain()

    async def _handle(self, event: Event) -> None:
        kind = self.server.kind
        if event.type == "describe":
            await self._send(describe(self.server))
        elif event.type == "ping":
            await self._send(Event("pong", dict(event.data)))
        elif kind is WorkerKind.STT and event.type == "transcribe":
            self.language = str(event.data.get("language") or "en")[:8]
        elif kind is WorkerKind.STT and event.type == "audio-start":
            audio_format = _audio_format(event.data)
            if audio_format is None:
                await self._send(Event("error", {"text": "audio-start needs 16-bit audio: rate 8000-96000, width 2, channels 1-8", "code": "bad_format"}))
                return
            try:
                params = SttParams(language=self.language)
            except ValueError:
                await self._send(Event("error", {"text": f"not a language code: {self.language!r}", "code": "bad_params"}))
                return
            rate, self._channels = audio_format
            self._resampler = Resampler(rate, STT_SAMPLE_RATE) if rate != STT_SAMPLE_RATE else None
            await self._start(params)
        elif kind is WorkerKind.STT and event.type == "audio-chunk":
            await self._feed_audio(event)
        elif kind is WorkerKind.STT and event.type == "audio-stop":
            await self._end_input()
        elif kind is WorkerKind.TTS and event.type == "synthesize":
            if self.streamed_text:  # the old-style copy of the stream just served
                self.streamed_text = False
                return
            text = str(event.data.get("text") or "")
            try:
                params = TtsParams(text=text)
            except ValueError as exc:  # over the params' limits
                await self._send(Event("error", {"text": str(exc).splitlines()[0], "code": "limit"}))
                return
            await self._start(params)
            await self._end_input()
        elif kind is WorkerKind.TTS and event.type == "synthesize-start":
            await self._start(TtsParams())
            self.streamed_text = True
        elif kind is WorkerKind.TTS and event.type == "synthesize-chunk" and self.job is not None:
            await self._put(TextInput(str(event.data.get("text") or "")))
        elif kind is WorkerKind.TTS and event.type == "synthesize-stop":
            await self._end_input()
        else:
            log.info("wyoming client %s: ignored %s event", self.peer, event.type)

    async def _start(self, params: SttParams | TtsParams) -> None:
        if self.task is not None and not self.task.done():
            await self._send(Event("error", {"text": "one job at a time on a connection", "code": "busy"}))
            return
        if not self.server.admit():
            await self._send(Event("error", {"text": f"worker at capacity ({self.server.running} running)", "code": "busy"}))
            return
        self._serial += 1
        self.job = Job(self._serial, params, self._result_sender(), self._audio_sender(), idle_input_s=self.server.idle_input_s)
        self._sent_text = ""
        self._transcript_started = False
        self._audio_started = False
        job = self.job
        self.task = asyncio.create_task(self._run(job), name=f"wyoming-{self.server.kind.value}-{self.peer}")
        # A task cancelled before it ever ran never enters run_job: its admitted place is given back here.
        self.task.add_done_callback(lambda _: self.server.unqueue(job))

    async def _run(self, job: Job) -> None:
        try:
            await self.server.run_job(job)
        except JobCancelled:
            return
        except Exception as exc:
            log.warning("wyoming client %s: job failed: %s", self.peer, exc)
            self.server.metrics.job_ended("failed")
            with contextlib.suppress(ConnectionError):
                await self._send(Event("error", {"text": str(exc)[:1024], "code": "failed"}))
            return
        self.server.metrics.job_ended("complete")
        with contextlib.suppress(ConnectionError):
            if self.server.kind is WorkerKind.TTS:
                if not self._audio_started:  # nothing to say: still a well-formed answer
                    await self._send(Event("audio-start", {"rate": self.server.engine.sample_rate, "width": 2, "channels": 1}))
                await self._send(Event("audio-stop", {}))
                if self.streamed_text:
                    await self._send(Event("synthesize-stopped", {}))

    async def _put(self, item: Any) -> None:
        if self.job is not None and self.task is not None and not self.task.done():
            await self.job.inputs.put(item)

    async def _feed_audio(self, event: Event) -> None:
        if self.job is None or event.data.get("width", 2) != 2:
            return  # audio-start said the format; a chunk that says otherwise is not ours to guess
        pcm = pcm16_mono(event.payload, self._channels)
        if self._resampler is not None:
            pcm = self._resampler.push(pcm)
        if len(pcm):
            await self._put(MediaFrame(self.job.job_id, 0, MediaFormat.PCM_S16LE, pcm.astype("<i2").tobytes(), 1, STT_SAMPLE_RATE))

    async def _end_input(self) -> None:
        await self._put(None)
        if self.task is not None:
            with contextlib.suppress(Exception):
                await self.task  # one job at a time: the next event waits for this one's answer

    async def _stop_job(self) -> None:
        """The client went away: a job still running is cancelled (its slot is given back)."""
        if self.job is not None:
            self.job.cancel_event.set()
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task

    # -- results --------------------------------------------------------------------------

    def _result_sender(self):
        async def send(data: dict[str, Any]) -> None:
            if self.server.kind is WorkerKind.STT:
                await self._stt_result(SttResult.model_validate(data))
            else:
                TtsResult.model_validate(data)  # the piece is spoken; Wyoming has no event for that

        return send

    async def _stt_result(self, result: SttResult) -> None:
        if not self._transcript_started:
            self._transcript_started = True
            await self._send(Event("transcript-start", {"language": self.language}))
        if not result.final:
            if result.text.startswith(self._sent_text) and len(result.text) > len(self._sent_text):
                await self._send(Event("transcript-chunk", {"text": result.text[len(self._sent_text) :]}))
                self._sent_text = result.text
            return
        await self._send(Event("transcript", {"text": result.text, "language": self.language}))
        await self._send(Event("transcript-stop", {}))

    def _audio_sender(self):
        async def send(pcm: bytes, sample_rate: int) -> None:
            if not self._audio_started:
                self._audio_started = True
                await self._send(Event("audio-start", {"rate": sample_rate, "width": 2, "channels": 1}))
            await self._send(Event("audio-chunk", {"rate": sample_rate, "width": 2, "channels": 1}, pcm))

        return send


class WyomingListener:
    """The Wyoming TCP server beside a worker's WebSocket one."""

    def __init__(self, server: WorkerServer) -> None:
        self.server = server
        self._tcp: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        self._tcp = await asyncio.start_server(self._accept, host, port)
        return self._tcp.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._sessions) >= MAX_CONNECTIONS:
            log.warning("wyoming: %d connections held already; refusing another", MAX_CONNECTIONS)
            with contextlib.suppress(ConnectionError):
                writer.write(encode(Event("error", {"text": f"{MAX_CONNECTIONS} connections at most", "code": "busy"})))
                await writer.drain()
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            await WyomingSession(self.server, reader, writer).run()
        finally:
            self._sessions.discard(task)

    async def close(self) -> None:
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()
