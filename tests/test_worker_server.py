"""The worker server: capacity, load reports, and bad input from clients.

Each bad input gets a protocol error (or a clean close for a frame too large
to read) and the worker keeps serving its other connections.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

from stream.protocol import (
    ErrorCode,
    JobResult,
    JobStart,
    MediaFormat,
    MediaFrame,
    WorkerKind,
    encode_frame,
)
from stream.protocol.jobs import LlmParams
from stream.worker_client import JobFailed
from tests.conftest import wait_until

pytestmark = pytest.mark.models  # real models or processes of the system: the slow tier


async def raw_client(url: str):
    """A bare WebSocket, to send what no well-behaved client would."""
    websocket = await ws_connect(url, max_size=None)
    hello = json.loads(await websocket.recv())
    assert hello["type"] == "hello"
    return websocket


async def next_error(websocket, timeout: float = 5.0) -> dict:
    """The next ``error`` message (load reports may come in between)."""
    async with asyncio.timeout(timeout):
        while True:
            message = json.loads(await websocket.recv())
            if message["type"] == "error":
                return message


async def assert_still_serving(url: str, connect, speak) -> None:
    stt = await connect(url)
    results = [r async for r in stt.transcribe(speak("My favorite color is green."))]
    assert results[-1].final and "green" in results[-1].text.lower()


async def test_jobs_up_to_capacity_then_busy_at_once(start_worker, connect):
    server, url = await start_worker(WorkerKind.STT, capacity=2)
    stt = await connect(url)
    open_jobs = [await stt.start_job({}) for _ in range(2)]  # never ended: they hold their slots
    await wait_until(lambda: server.running == 2)
    assert (await stt.request_load()).running == 2
    extra = await stt.start_job({})
    with pytest.raises(JobFailed) as info:
        async with asyncio.timeout(2):  # "at once", not after a wait
            [e async for e in extra.events()]
    assert info.value.code is ErrorCode.BUSY
    await open_jobs[0].cancel()
    [e async for e in open_jobs[0].events()]
    admitted = await stt.start_job({})
    await wait_until(lambda: server.running == 2)
    for job in (open_jobs[1], admitted):
        await job.cancel()
    await wait_until(lambda: server.running == 0)


async def test_queue_holds_jobs_beyond_capacity(start_worker, connect):
    server, url = await start_worker(WorkerKind.STT, capacity=1, max_queue=1)
    stt = await connect(url)
    first = await stt.start_job({})
    second = await stt.start_job({})
    await wait_until(lambda: server.running == 1 and server.queued == 1)
    load = await stt.request_load()
    assert (load.running, load.queued, load.capacity) == (1, 1, 1)
    third = await stt.start_job({})
    with pytest.raises(JobFailed, match="busy"):
        [e async for e in third.events()]
    await first.end()
    [e async for e in first.events()]
    await wait_until(lambda: server.running == 1 and server.queued == 0)  # the queued one runs now
    await second.cancel()
    await wait_until(lambda: server.running == 0)


async def test_load_reports_are_pushed_periodically(start_worker, connect):
    _, url = await start_worker(WorkerKind.STT, report_interval_s=0.1)
    stt = await connect(url)
    await wait_until(lambda: stt.load is not None, timeout=5)
    assert stt.load.rate_unit == "audio_s" and stt.load.capacity == 2


async def test_a_load_report_tells_a_client_its_own_jobs_from_others(start_worker, connect):
    server, url = await start_worker(WorkerKind.STT, capacity=3)
    mine, theirs = await connect(url), await connect(url)
    await mine.start_job({})
    await theirs.start_job({})
    await theirs.start_job({})
    await wait_until(lambda: server.running == 3)
    load = await mine.request_load()
    assert (load.running, load.own_jobs) == (3, 1)
    assert (await theirs.request_load()).own_jobs == 2


async def test_service_rate_is_measured(start_worker, connect, speak):
    _server, url = await start_worker(WorkerKind.STT)
    stt = await connect(url)
    [r async for r in stt.transcribe(speak("Please turn on the kitchen lights."))]
    load = await stt.request_load()
    assert load.jobs_completed == 1 and load.service_rate > 1.0  # faster than real time


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x01garbage", "malformed"),
        (bytes([7]) + b"\0" * 40, "bad_version"),
        ("this is not json", "malformed"),
        ('{"v": 1, "type": "job.explode", "job_id": 1}', "unknown_type"),
        ('{"v": 9, "type": "job.end", "job_id": 1}', "bad_version"),
        ('{"v": 1, "type": "job.end", "job_id": 77}', "unknown_job"),
        ('{"v": 1, "type": "hello", "worker_id": "x"}', "malformed"),
        ('{"v": 1, "type": "job.start", "job_id": 1, "kind": "llm"}', "bad_params"),
        ('{"v": 1, "type": "job.start", "job_id": 1, "kind": "stt", "params": {"beam": 5}}', "bad_params"),
    ],
    ids=["garbage-bytes", "bad-frame-version", "garbage-text", "unknown-type", "bad-version", "unknown-job", "bad-hello", "wrong-kind", "unknown-param"],
)
async def test_bad_input_gets_a_protocol_error_and_the_connection_survives(start_worker, connect, speak, frame, code):
    _, url = await start_worker(WorkerKind.STT)
    websocket = await raw_client(url)
    await websocket.send(frame)
    error = await next_error(websocket)
    assert error["code"] == code and error["message"]
    # Same connection, next request: still answered.
    await websocket.send('{"v": 1, "type": "load.request"}')
    async with asyncio.timeout(5):
        while json.loads(await websocket.recv())["type"] != "load.report":
            pass
    await websocket.close()
    await assert_still_serving(url, connect, speak)


async def test_text_message_over_the_limit_is_refused(start_worker, connect, speak):
    _, url = await start_worker(WorkerKind.LLM)
    websocket = await raw_client(url)
    huge = LlmParams(messages=[{"role": "user", "content": "x" * 300_000}]).model_dump()
    await websocket.send(JobStart(job_id=1, kind=WorkerKind.LLM, params=huge).model_dump_json())
    error = await next_error(websocket)
    assert error["code"] == "too_large"
    await websocket.close()


async def test_oversized_frame_closes_only_that_connection(start_worker, connect, speak):
    server, url = await start_worker(WorkerKind.STT)
    stt = await connect(url)
    busy = await stt.start_job({})  # a job on another connection, mid-utterance
    samples = speak("Can you read the sign on the door?")
    await busy.send_audio(samples[:16000])
    websocket = await raw_client(url)
    await websocket.send(b"\0" * (server.limits.max_frame_bytes + 1024))
    with pytest.raises(websockets.ConnectionClosed) as info:
        async with asyncio.timeout(5):
            while True:
                await websocket.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009  # "message too big"
    await busy.send_audio(samples[16000:])
    await busy.end()
    finals = [e.data["text"] async for e in busy.events() if e.data.get("final")]
    assert "sign" in finals[-1].lower()


async def test_reused_job_id_is_refused_without_harming_the_live_job(start_worker, connect, speak):
    _, url = await start_worker(WorkerKind.STT)
    websocket = await raw_client(url)
    await websocket.send(JobStart(job_id=5, kind=WorkerKind.STT).model_dump_json())
    await websocket.send(JobStart(job_id=5, kind=WorkerKind.STT).model_dump_json())
    error = await next_error(websocket)
    assert error["code"] == "job_id_reused" and error["job_id"] is None
    samples = speak("My favorite color is green.")
    await websocket.send(encode_frame(MediaFrame(5, 0, MediaFormat.PCM_S16LE, samples.tobytes(), 1, 16000)))
    await websocket.send('{"v": 1, "type": "job.end", "job_id": 5}')
    async with asyncio.timeout(10):
        while True:
            message = json.loads(await websocket.recv())
            if message["type"] == "job.done":
                break
            if message["type"] == "job.result" and message["data"]["final"]:
                assert "green" in message["data"]["text"].lower()
    assert message["job_id"] == 5 and message["reason"] == "complete"
    await websocket.close()


async def test_client_vanishing_mid_job_frees_its_slots(start_worker, connect, speak):
    server, url = await start_worker(WorkerKind.STT, capacity=2)
    websocket = await raw_client(url)
    for job_id in (1, 2):
        await websocket.send(JobStart(job_id=job_id, kind=WorkerKind.STT).model_dump_json())
        await websocket.send(encode_frame(MediaFrame(job_id, 0, MediaFormat.PCM_S16LE, np.zeros(8000, np.int16).tobytes(), 1, 16000)))
    await wait_until(lambda: server.running == 2)
    websocket.transport.abort()  # no close handshake: the client just disappears
    await wait_until(lambda: server.running == 0 and not server.sessions, timeout=10)
    await assert_still_serving(url, connect, speak)


async def test_a_job_left_without_input_is_ended_and_frees_its_slot(start_worker, connect, speak):
    server, url = await start_worker(WorkerKind.STT, capacity=2, idle_input_s=0.5)
    stt = await connect(url)
    quiet = await stt.start_job({})  # opened, then nothing: a stalled microphone
    talking = await stt.start_job({})
    await wait_until(lambda: server.running == 2)
    speech = speak("Hello there.")
    for start in range(0, len(speech), 3200):  # audio every 0.2 s keeps a job alive past its idle limit
        await talking.send_audio(speech[start : start + 3200])
        await asyncio.sleep(0.2)
    with pytest.raises(JobFailed) as info:
        async with asyncio.timeout(5):
            [e async for e in quiet.events()]
    assert info.value.code is ErrorCode.LIMIT and "no input for 0.5 s" in info.value.message
    await talking.end()
    results = [e async for e in talking.events() if isinstance(e, JobResult)]
    assert results[-1].data["final"] and results[-1].data["text"].strip()
    await wait_until(lambda: server.running == 0)
