"""Metrics, health and logs: what an operator sees of a real turn through the real models."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.server import Gateway
from stream.config import GatewaySettings
from stream.http import get as http_get
from stream.protocol import WorkerKind
from stream.sdk import GatewaySession
from tests.conftest import wait_until, with_silence

pytestmark = pytest.mark.models  # real models or processes of the system: the slow tier

QUESTION = "What is the capital of France?"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(v for (n, ls), v in found.items() if n == name and set(labels.items()) <= set(ls))


def http_base(ws_url: str) -> str:
    return ws_url.replace("ws://", "http://").removesuffix("/session")


async def scrape(url: str) -> dict:
    status, body = await http_get(f"{url}/metrics")
    assert status == 200
    return samples(body)


async def test_metrics_count_a_turn_and_time_its_stages(gateway, workers, speak):
    servers, urls = workers
    gateway_url = http_base(gateway.url)
    stt_url = urls[WorkerKind.STT][0].replace("ws://", "http://")
    stt_before = await scrape(stt_url)
    session = await GatewaySession.connect(gateway.url, loopback_ice=True)
    try:
        await session.say(with_silence(speak(QUESTION)), 16000)
        latency = await session.wait_event("latency", timeout=60)
        during = await scrape(gateway_url)
        assert value(during, "edgestream_sessions_open") == 1
        await session.wait_event("answer.done", timeout=60)  # the turn counts once its answer has played
    finally:
        await session.close()
    found = await scrape(gateway_url)
    assert value(found, "edgestream_turns_total", outcome="answered") == 1
    assert value(found, "edgestream_turns_total") == 1
    assert value(found, "edgestream_sessions_total") == 1
    for stage in ("end_of_turn", "stt_final", "first_token", "first_clause", "first_tts_audio", "voice_to_voice"):
        assert value(found, "edgestream_turn_stage_seconds_count", stage=stage) == 1, stage
    # The histogram holds exactly what the client was told.
    assert value(found, "edgestream_turn_stage_seconds_sum", stage="voice_to_voice") == pytest.approx(latency["first_audio_sent"] / 1000, abs=1e-3)
    for kind in ("stt", "llm", "tts"):
        assert value(found, "edgestream_jobs_total", kind=kind, outcome="ok") >= 1, kind
        assert value(found, "edgestream_selection_decisions_total", kind=kind, attempt="first") >= 1, kind
    frames = value(found, "edgestream_ingest_lag_seconds_count")
    assert frames == value(found, "edgestream_audio_frames_total") >= 100  # every frame of > 2 s of speech was timed
    assert value(found, "edgestream_worker_up", kind="stt") == 1
    assert value(found, "edgestream_failovers_total") == 0
    # The STT worker counted its side of the turn.
    stt_after = await scrape(stt_url)
    # Ended, or cancelled once its flushed transcript was the final one (no second decode).
    ended = ("complete", "cancelled")
    assert sum(value(stt_after, "edgestream_worker_jobs_total", outcome=o) for o in ended) > sum(
        value(stt_before, "edgestream_worker_jobs_total", outcome=o) for o in ended
    )
    assert value(stt_after, "edgestream_worker_first_output_seconds_count") > value(stt_before, "edgestream_worker_first_output_seconds_count")
    assert value(stt_after, "edgestream_worker_capacity") == servers[WorkerKind.STT].capacity


async def test_refusals_are_counted_by_code(gateway):
    import websockets

    async with websockets.connect(gateway.url) as ws:
        await ws.send('{"type": "offer", "sdp": 42}')
        assert json.loads(await ws.recv())["code"] == "malformed"
    found = await scrape(http_base(gateway.url))
    assert value(found, "edgestream_errors_total", code="malformed") == 1


async def test_readiness_names_a_missing_worker_kind(workers):
    _, urls = workers
    no_llm = {**urls, WorkerKind.LLM: ["ws://127.0.0.1:9"]}
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0), no_llm)
    port = await gateway.start("127.0.0.1", 0)
    try:
        await gateway.pool.wait_ready([WorkerKind.STT, WorkerKind.TTS], timeout=10)
        status, body = await http_get(f"http://127.0.0.1:{port}/readyz")
        assert status == 503
        assert json.loads(body)["missing"] == ["llm"]
        status, body = await http_get(f"http://127.0.0.1:{port}/healthz")
        health = json.loads(body)
        assert status == 200 and health["workers"]["llm"] is False
        # Never reached: as a worker still loading its model looks. The page says "starting".
        assert health["states"] == {"stt": "ready", "llm": "starting", "tts": "ready", "vision": "ready"}
        assert health["required"] == ["stt", "llm", "tts"]
    finally:
        await gateway.close()


async def test_readiness_when_every_kind_is_there(gateway):
    status, body = await http_get(f"{http_base(gateway.url)}/readyz")
    assert status == 200 and json.loads(body) == {"ready": True, "missing": [], "sessions": 0, "workers": {k.value: True for k in WorkerKind}}


async def test_the_page_server_answers_unknown_and_impossible_paths_with_404(gateway):
    base = http_base(gateway.url)
    assert (await http_get(f"{base}/"))[0] == 200
    for path in ("/nope.html", "/" + "a" * 300, "/x/" + "b" * 5000 + ".js", "/../../etc/passwd", "/a%00b", "/a\x00b"):
        status, body = await http_get(f"{base}{path}")
        assert status == 404 and body.strip() == "not found", path


async def test_the_browsers_favicon_request_gets_the_icon(gateway):
    status, headers, body = await raw_http(http_base(gateway.url), b"GET /favicon.ico HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200 and headers["Content-Type"] == "image/svg+xml" and body.startswith(b"<svg")


async def raw_http(base: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    return int(status_line.split()[1]), dict(line.split(": ", 1) for line in lines), body


async def test_only_get_and_head_are_served_and_head_has_no_body(gateway, start_worker):
    _, worker_url = await start_worker(WorkerKind.TTS, capacity=1)
    for base, path in ((http_base(gateway.url), "/"), (worker_url.replace("ws://", "http://"), "/healthz")):
        for method in ("POST", "DELETE", "TRACE", "PUT"):
            status, headers, _ = await raw_http(base, f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
            assert status == 405 and headers["Allow"] == "GET, HEAD", (base, method)
        status, headers, body = await raw_http(base, f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
        status, headers, body = await raw_http(base, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert status == 200 and len(body) == int(headers["Content-Length"]) > 0
    status, _, _ = await raw_http(http_base(gateway.url), b"HEAD /session HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 405


async def test_worker_health_and_readiness_follow_its_capacity(start_worker, connect):
    server, url = await start_worker(WorkerKind.STT, capacity=1)
    base = url.replace("ws://", "http://")
    status, body = await http_get(f"{base}/healthz")
    assert status == 200 and json.loads(body)["kind"] == "stt"
    assert (await http_get(f"{base}/readyz"))[0] == 200
    client = await connect(url)
    job = await client.start_job({})
    await wait_until(lambda: server.running == 1)
    status, body = await http_get(f"{base}/readyz")
    assert status == 503 and json.loads(body)["missing"] == ["capacity"]
    assert (await http_get(f"{base}/healthz"))[0] == 200  # full is not unhealthy
    await job.cancel()
    await wait_until(lambda: server.running == 0)
    assert (await http_get(f"{base}/readyz"))[0] == 200


async def start_json_logging_worker(kind: WorkerKind, log_file: Path) -> tuple[asyncio.subprocess.Process, str]:
    """``edgestream worker KIND --log-format json`` in its own process, its stderr to ``log_file``."""
    with log_file.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "worker",
            kind.value,
            "--port",
            "0",
            "--threads",
            "1",
            "--log-format",
            "json",
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    async with asyncio.timeout(120):
        while line := (await process.stdout.readline()).decode():
            if match := re.search(r"listening on (ws://127\.0\.0\.1:\d+)", line):
                return process, match.group(1)
    raise AssertionError(f"the worker exited: {log_file.read_text()}")


async def test_one_turn_id_follows_the_turn_from_gateway_to_worker(workers, speak, tmp_path, caplog):
    _, urls = workers
    worker_log = tmp_path / "stt.jsonl"
    process, stt_url = await start_json_logging_worker(WorkerKind.STT, worker_log)
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5), {**urls, WorkerKind.STT: [stt_url]})
    port = await gateway.start("127.0.0.1", 0)
    try:
        await gateway.pool.wait_ready(list(WorkerKind), timeout=10)
        caplog.set_level(logging.INFO, logger="edgestream")
        session = await GatewaySession.connect(f"ws://127.0.0.1:{port}/session", loopback_ice=True)
        session_id = (await session.wait_event("session.ready", timeout=10))["session_id"]
        await session.say(with_silence(speak(QUESTION)), 16000)
        await session.wait_event("latency", timeout=60)
        await session.close()
    finally:
        await gateway.close()
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
    turn_id = f"{session_id}.1"
    on_gateway = [r for r in caplog.records if r.name == "edgestream.gateway" and getattr(r, "turn", None) == turn_id]
    assert on_gateway, [r.getMessage() for r in caplog.records]
    assert all(r.session == session_id for r in on_gateway)
    assert any("answered" in r.getMessage() for r in on_gateway)
    lines = [json.loads(line) for line in worker_log.read_text().splitlines() if line.startswith("{")]
    on_worker = [line for line in lines if line.get("turn") == turn_id]
    assert any("started" in line["message"] for line in on_worker), lines
    assert any("complete" in line["message"] or "cancelled" in line["message"] for line in on_worker), lines
    assert all(line["job"].startswith("stt/") and line["level"] in ("INFO", "WARNING") for line in on_worker)


def test_text_log_lines_end_with_the_ids():
    from stream import logs

    logs.install()
    formatter = logs.TextFormatter()
    with logs.bound(session="abc", turn="abc.2"):
        record = logging.getLogger("edgestream.test").makeRecord("edgestream.test", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    assert formatter.format(record).endswith("edgestream.test: hello there [session=abc turn=abc.2]")


REFUSE = """
import asyncio, sys, websockets
from gateway.server import Gateway
from stream import logs
from stream.config import GatewaySettings

async def main():
    logs.configure("text", "info")
    gateway = Gateway(GatewaySettings(port=0), {})
    port = await gateway.start("127.0.0.1", 0)
    for _ in range(int(sys.argv[1])):
        async with websockets.connect(f"ws://127.0.0.1:{port}/session") as ws:
            await ws.send("not json")
            await ws.recv()
            await ws.wait_closed()
    await gateway.close()

asyncio.run(main())
"""


def _refusal_lines(connections: int) -> list[str]:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", REFUSE, str(connections)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stderr.splitlines() if "connection" in line or "refused" in line]


def test_a_refused_signaling_connection_logs_one_line():
    about_it = _refusal_lines(1)
    assert len(about_it) == 1 and "refused: malformed" in about_it[0], about_it


def test_a_flood_of_refused_connections_does_not_flood_the_log():
    from gateway.server import REFUSALS_LOGGED_BURST

    about_it = _refusal_lines(40)  # well under 4 s: the rate lets few more through than the burst
    assert REFUSALS_LOGGED_BURST <= len(about_it) < 25, about_it
