"""The launch command, as an operator runs it: `edgestream worker KIND`, then `edgestream probe`."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from pathlib import Path

import pytest

from gateway.harness.figures import free_port
from stream.audio import write_wav
from stream.protocol import WorkerKind
from tests.conftest import word_error_rate
from tests.test_worker_vision import encoded, sign

pytestmark = pytest.mark.models  # real models or processes of the system: the slow tier

EDGESTREAM = [sys.executable, "-m", "gateway"]


async def http_get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return data.decode().split("\r\n\r\n", 1)[1]


async def run(*args: str, timeout: float = 120) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(*EDGESTREAM, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode, output.decode()


class RunningWorker:
    def __init__(self, process: asyncio.subprocess.Process, url: str, banner: str) -> None:
        self.process, self.url, self.banner = process, url, banner


async def start_worker_process(kind: WorkerKind, *extra: str) -> RunningWorker:
    process = await asyncio.create_subprocess_exec(
        *EDGESTREAM,
        "worker",
        kind.value,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    banner = ""
    async with asyncio.timeout(120):
        while True:
            line = (await process.stdout.readline()).decode()
            if not line:
                raise AssertionError(f"worker exited before listening:\n{banner}")
            banner += line
            if match := re.search(r"listening on (ws://127\.0\.0\.1:\d+)", line):
                break
        banner += (await process.stdout.readline()).decode()  # the model line
    return RunningWorker(process, match.group(1), banner)


async def stop(worker: RunningWorker) -> int:
    worker.process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(worker.process.wait(), 30)


@pytest.mark.parametrize("kind", list(WorkerKind), ids=lambda k: k.value)
async def test_launch_command_serves_and_probe_gets_an_answer(kind: WorkerKind, tmp_path: Path, speak):
    worker = await start_worker_process(kind)
    try:
        assert re.search(r"model \S+ sha256 [0-9a-f]{64}", worker.banner), worker.banner
        if kind is WorkerKind.STT:
            write_wav(tmp_path / "q.wav", speak("Please turn on the kitchen lights."), 16000)
            code, output = await run("probe", "stt", str(tmp_path / "q.wav"), "--url", worker.url)
            final = re.search(r"final\s+(.*)", output)
            assert "partial" in output and final, output
            assert word_error_rate("Please turn on the kitchen lights.", final.group(1)) <= 0.34, output
        elif kind is WorkerKind.LLM:
            code, output = await run("probe", "llm", "Say hello.", "--url", worker.url)
            assert len(output.strip().splitlines()) >= 2, output
        elif kind is WorkerKind.TTS:
            code, output = await run("probe", "tts", "Good morning, everyone.", "--url", worker.url, "--out", str(tmp_path / "a.wav"))
            assert "Good morning, everyone." in output and (tmp_path / "a.wav").stat().st_size > 20_000
        else:
            (tmp_path / "sign.png").write_bytes(encoded(sign("EXIT GATE 7"), "PNG"))
            code, output = await run("probe", "vision", str(tmp_path / "sign.png"), "--url", worker.url)
            assert "EXIT GATE 7" in output.upper(), output
        assert code == 0, output
    finally:
        assert await stop(worker) == 0


async def test_bad_config_fails_naming_the_key(tmp_path: Path):
    (tmp_path / "bad.toml").write_text("[workers.stt]\ncapacity = -1\n")
    code, output = await run("worker", "stt", "--config", str(tmp_path / "bad.toml"), timeout=30)
    assert code == 2 and "workers.stt.capacity" in output and "greater than or equal to 1" in output


@pytest.mark.parametrize("command", [("gateway",), ("worker", "stt")])
async def test_command_line_options_are_validated_like_the_file(command: tuple[str, ...]):
    code, output = await run(*command, "--port", "70000", timeout=30)
    assert code == 2 and "--port" in output and "65535" in output


async def test_missing_model_file_is_a_clear_error(tmp_path: Path):
    code, output = await run("worker", "llm", "--model", str(tmp_path / "nope.gguf"), "--port", "0", timeout=30)
    assert code == 1 and "model not found" in output and "nope.gguf" in output


async def test_port_in_use_is_a_clear_error():
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        code, output = await run("worker", "tts", "--host", "127.0.0.1", "--port", str(port), timeout=60)
    finally:
        blocker.close()
    assert code == 1 and f"cannot listen on 127.0.0.1:{port}" in output


async def test_probe_reports_an_unreachable_worker():
    code, output = await run("probe", "llm", "hi", "--url", "ws://127.0.0.1:9", timeout=30)
    assert code == 1 and "cannot reach the llm worker" in output


async def test_up_starts_one_worker_of_each_kind_and_stops_them(tmp_path: Path):
    config = tmp_path / "box.toml"
    ports = {kind: free_port() for kind in WorkerKind}
    gateway_port = free_port()
    config.write_text(
        "".join(f"[workers.{kind.value}]\nport = {ports[kind]}\ncapacity = 1\nthreads = 1\n" for kind in WorkerKind) + f"[gateway]\nport = {gateway_port}\n"
    )
    process = await asyncio.create_subprocess_exec(*EDGESTREAM, "up", "--config", str(config), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    urls: dict[str, str] = {}
    output = ""
    try:
        async with asyncio.timeout(180):
            while len(urls) < len(WorkerKind):
                line = (await process.stdout.readline()).decode()
                assert line, f"edgestream up ended early:\n{output}"
                output += line
                if match := re.search(r"^\[\s*(\w+)\] edgestream \w+ worker .* listening on (ws://\S+)", line):
                    urls[match.group(1)] = match.group(2)
        assert set(urls) == {k.value for k in WorkerKind}
        code, answer = await run("probe", "tts", "Ready.", "--url", urls["tts"])
        assert code == 0 and "Ready." in answer
        # The gateway serves the page and reports every worker kind as connected.
        async with asyncio.timeout(30):
            while True:
                health = json.loads(await http_get(gateway_port, "/healthz"))
                if all(health["workers"].values()):
                    break
                await asyncio.sleep(0.2)
        assert "<title>edgestream</title>" in await http_get(gateway_port, "/")
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, output + rest.decode()
    assert rest.decode().count("stopping") == len(WorkerKind) + 1


def test_a_worker_with_more_threads_than_cores_says_so(caplog):
    from stream.config import LlmSettings
    from stream.protocol import WorkerKind
    from workers.launch import warn_if_oversubscribed

    assert not warn_if_oversubscribed(WorkerKind.LLM, LlmSettings(capacity=2, threads=1), cores=2)
    assert warn_if_oversubscribed(WorkerKind.LLM, LlmSettings(capacity=2, threads=2), cores=2)
    assert "set threads to 1 or less" in caplog.text and "2 x threads 2 = 4 threads on 2 cores" in caplog.text
