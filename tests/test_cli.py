"""The launch command, as an operator runs it: `edgestream worker KIND`, then `edgestream probe`."""

from __future__ import annotations

import asyncio
import json
import os
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


async def run_split(*command: str, timeout: float = 60) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a command."""
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode, out.decode(), err.decode()


def one_error_line(code: int, out: str, err: str) -> str:
    """The one ``error:`` line a mistake must give (and no traceback, anywhere)."""
    assert code != 0, (out, err)
    assert "Traceback" not in out + err, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


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


# -- ordinary mistakes: one line each, and a non-zero exit ------------------------------------

SDK = [sys.executable, "-m", "stream.sdk"]


async def test_ordinary_mistakes_give_one_line_and_a_nonzero_exit(tmp_path: Path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not audio, not an image")
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    mistakes = {
        "probe: missing file": ([*EDGESTREAM, "probe", "stt", str(tmp_path / "question.wav")], "question.wav: no such file"),
        "probe: not audio": ([*EDGESTREAM, "probe", "stt", str(notes)], "not a sound file"),
        "probe: not an image": ([*EDGESTREAM, "probe", "vision", str(notes)], "not a PNG or JPEG image"),
        "worker: corrupt model": ([*EDGESTREAM, "worker", "llm", "--model", str(corrupt), "--port", "0"], f"cannot load {corrupt} as the llm model"),
        "sdk: no arguments": ([*SDK], "give a sound file of a spoken question, or --ask TEXT"),
        "sdk: missing file": ([*SDK, str(tmp_path / "q.wav")], "q.wav: no such file"),
        "sdk: no gateway": ([*SDK, "--ask", "hi", "--gateway", "ws://127.0.0.1:9/session"], "cannot reach the gateway at ws://127.0.0.1:9/session"),
    }
    for name, (command, expected) in mistakes.items():
        line = one_error_line(*await run_split(*command))
        assert expected in line, (name, line)


async def test_a_gateway_without_workers_is_told_to_the_sdk_in_its_own_words(tmp_path: Path):
    gateway_port = free_port()
    config = tmp_path / "nobody.toml"  # workers on ports nobody listens on
    config.write_text("[gateway.workers]\n" + "".join(f'{kind.value} = ["ws://127.0.0.1:{free_port()}"]\n' for kind in WorkerKind))
    gateway = await asyncio.create_subprocess_exec(
        *EDGESTREAM,
        "gateway",
        "--config",
        str(config),
        "--port",
        str(gateway_port),
        "--loopback-ice",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(30):
            while b"listening on" not in await gateway.stdout.readline():
                pass
        line = one_error_line(*await run_split(*SDK, "--ask", "What time is it?", "--gateway", f"ws://127.0.0.1:{gateway_port}/session"))
        assert "no_worker: no llm worker is available" in line
    finally:
        gateway.send_signal(signal.SIGTERM)
        await asyncio.wait_for(gateway.communicate(), 30)


async def test_sdk_help_is_help_not_a_file_name():
    code, out, _ = await run_split(*SDK, "--help")
    assert code == 0 and "usage: python -m stream.sdk" in out and "--ask TEXT" in out


async def test_version_and_a_help_that_starts_with_what_a_user_needs_first():
    from importlib.metadata import version

    code, out, _ = await run_split(*EDGESTREAM, "--version")
    assert code == 0 and out.strip() == f"edgestream {version('edgestream')}"
    code, out, _ = await run_split(*EDGESTREAM, "--help")
    assert code == 0
    assert out.index("Start") < out.index(" up ") < out.index("Try it") < out.index("Test and measure"), out


async def test_up_with_its_port_taken_says_so_before_any_model_loads(tmp_path: Path):
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        code, out, err = await run_split(*EDGESTREAM, "up", "--port", str(port), timeout=30)
    finally:
        blocker.close()
    line = one_error_line(code, out, err)
    assert f"the gateway: cannot listen on 127.0.0.1:{port}" in line and "in use" in line
    assert "loading" not in out and "started" not in out  # nothing was started


async def test_debug_shows_the_traceback_behind_the_line(tmp_path: Path):
    code, _, err = await run_split(*EDGESTREAM, "--debug", "worker", "llm", "--model", str(tmp_path / "nope.gguf"), "--port", "0")
    assert code == 1 and err.startswith("error: llm model not found") and "Traceback" in err


async def test_a_worker_killed_under_up_comes_back_and_the_gateway_stays_up(tmp_path: Path):
    from stream.sdk import GatewaySession

    config = tmp_path / "box.toml"
    ports = {kind: free_port() for kind in WorkerKind}
    gateway_port = free_port()
    config.write_text(
        "".join(f"[workers.{kind.value}]\nport = {ports[kind]}\ncapacity = 1\nthreads = 1\n" for kind in WorkerKind)
        + f"[gateway]\nport = {gateway_port}\nloopback_ice = true\n"
    )
    process = await asyncio.create_subprocess_exec(*EDGESTREAM, "up", "--config", str(config), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output: list[str] = []

    async def line_matching(pattern: str, timeout: float) -> re.Match[str]:
        async with asyncio.timeout(timeout):
            while True:
                line = (await process.stdout.readline()).decode()
                assert line, "edgestream up ended early:\n" + "".join(output)
                output.append(line)
                if match := re.search(pattern, line):
                    return match

    session = None
    try:
        pids = {}
        for _ in range(len(WorkerKind) + 1):
            match = await line_matching(r"^edgestream up: started the (\w+)(?: worker)? \(pid (\d+)\)", 30)
            pids[match.group(1)] = int(match.group(2))
        ready = await line_matching(r"^edgestream up: ready in \d+ s: open (http://\S+) in a browser", 180)
        assert ready.group(1) == f"http://127.0.0.1:{gateway_port}/"
        assert not any("Connection refused" in line or "out of rotation" in line for line in output), "".join(output)

        session = await GatewaySession.connect(f"ws://127.0.0.1:{gateway_port}/session", loopback_ice=True)
        os.kill(pids["llm"], signal.SIGKILL)
        await line_matching(r"^edgestream up: the llm worker exited with -9; starting it again in", 10)
        # A turn in the gap: answered if the worker is already back, else a clear error; never silence.
        seen = session.ask("What is the capital of France?")
        while (outcome := await session.wait_event("*", timeout=60, after=seen))["type"] not in ("answer.done", "error"):
            seen += 1  # wait_event("*", after=i) is events[i]
        assert outcome["type"] == "answer.done" or outcome["code"] in ("no_worker", "llm_failed"), outcome

        restarted = await line_matching(r"^edgestream up: the llm worker started again \(pid (\d+), restart 1\)", 30)
        assert int(restarted.group(1)) != pids["llm"]
        async with asyncio.timeout(120):  # the new worker loads its model and the gateway's link re-dials it
            while not json.loads(await http_get(gateway_port, "/healthz"))["workers"]["llm"]:
                await asyncio.sleep(0.2)
        after = session.ask("What is the capital of Italy?")
        done = await session.wait_event("answer.done", timeout=60, after=after)
        assert done["text"].strip()
        # The same gateway served both turns: it never exited.
        assert session.connected and not any("the gateway exited" in line for line in output)
        os.kill(pids["gateway"], 0)
    finally:
        if session is not None:
            await session.close()
        process.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, "".join(output) + rest.decode()


async def test_samples_are_made_here_and_the_sdk_asks_the_spoken_one(tmp_path: Path, gateway):
    code, out, err = await run_split(*EDGESTREAM, "samples", str(tmp_path), timeout=120)
    assert code == 0, err
    assert f"python -m stream.sdk {tmp_path / 'question.wav'}" in out
    assert (tmp_path / "sign.png").read_bytes()[:4] == b"\x89PNG"
    code, out, err = await run_split(*SDK, str(tmp_path / "question.wav"), "--gateway", gateway.url, timeout=120)
    assert code == 0, out + err
    said = re.search(r"^you said: (.*)$", out, re.M)
    assert said and word_error_rate("What is the capital of France?", said.group(1)) <= 0.34, out
    assert re.search(r"^answer: +\S", out, re.M) and re.search(r"^latency: +answer audio [\d.]+ ms", out, re.M), out


async def test_killing_up_itself_stops_every_process_it_started(tmp_path: Path):
    config = tmp_path / "box.toml"
    config.write_text("".join(f"[workers.{kind.value}]\nport = {free_port()}\nthreads = 1\n" for kind in WorkerKind) + f"[gateway]\nport = {free_port()}\n")
    process = await asyncio.create_subprocess_exec(*EDGESTREAM, "up", "--config", str(config), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    pids = []
    async with asyncio.timeout(30):
        while len(pids) < len(WorkerKind) + 1:
            line = (await process.stdout.readline()).decode()
            assert line, "edgestream up ended early"
            if match := re.search(r"^edgestream up: started the .* \(pid (\d+)\)", line):
                pids.append(int(match.group(1)))
    async with asyncio.timeout(120):  # loaded and quiet: a broken stdout pipe would not stop them now
        while "ready in" not in (await process.stdout.readline()).decode():
            pass
    process.kill()  # no chance to clean up
    await process.wait()

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except FileNotFoundError:
            return False

    async with asyncio.timeout(30):
        while any(alive(pid) for pid in pids):
            await asyncio.sleep(0.2)


async def test_wyoming_is_loopback_only_unless_opened_and_only_for_stt_and_tts():
    code, out, err = await run_split(*EDGESTREAM, "worker", "stt", "--port", "0", "--wyoming", "0.0.0.0:10300", timeout=60)
    assert code == 2 and "Wyoming has no authentication" in one_error_line(code, out, err) and "--wyoming-open" in err
    code, out, err = await run_split(*EDGESTREAM, "worker", "llm", "--port", "0", "--wyoming", "127.0.0.1:10300", timeout=60)
    assert code == 2 and "only stt and tts workers speak Wyoming" in one_error_line(code, out, err)
    code, out, err = await run_split(*EDGESTREAM, "worker", "tts", "--port", "0", "--wyoming", "nowhere", timeout=60)
    assert code == 2 and "--wyoming" in one_error_line(code, out, err) and "HOST:PORT" in err
