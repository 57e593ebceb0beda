"""A gateway of several processes on one port behaves as one gateway (``gateway/processes.py``).

The gateway runs as ``edgestream gateway --processes 2`` (real processes,
the supervisor handing each accepted connection to one of them, real WebRTC
from the SDK); the workers are real worker servers with canned models, in
this process. The supervisor gives each new session to the process holding
the fewest, so sessions opened one after another alternate between the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from gateway.harness.figures import free_port
from gateway.harness.load_bench import start_canned_workers
from gateway.processes import listen_on
from gateway.tokens import TokenFile
from stream import tls
from stream.http import get
from stream.sdk import Backoff, GatewayError, GatewaySession

pytestmark = pytest.mark.models  # spawns processes

FAST = Backoff(initial_s=0.2, max_s=1.0)
ANSWER_PCM = (np.sin(np.arange(22050) / 8) * 8000).astype(np.int16)


class MultiProcessGateway:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path, trusted: ssl.SSLContext | None = None) -> None:
        self.process = process
        self.port = port
        self.log = log
        self.trusted = trusted
        secure = "s" if trusted is not None else ""
        self.url = f"ws{secure}://127.0.0.1:{port}/session"
        self.http = f"http{secure}://127.0.0.1:{port}"

    async def get(self, path: str) -> tuple[int, str]:
        return await get(f"{self.http}{path}", timeout=2, ssl_context=self.trusted)

    async def health(self) -> dict:
        status, body = await self.get("/healthz")
        assert status == 200, body
        return json.loads(body)

    async def metrics(self, query: str = "") -> str:
        status, body = await self.get(f"/metrics{query}")
        assert status == 200
        return body


@pytest_asyncio.fixture
async def canned_workers() -> AsyncIterator[dict[str, str]]:
    servers, urls = await start_canned_workers(ANSWER_PCM, 22050)
    yield urls
    for server in servers:
        await server.close()


@contextlib.asynccontextmanager
async def multi_process_gateway(
    tmp_path: Path, urls: dict[str, str], extra: str = "", security: str = "", trusted: ssl.SSLContext | None = None
) -> AsyncIterator[MultiProcessGateway]:
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"[gateway]\nport = {port}\nloopback_ice = true\nvision_on_turn = false\nice_timeout_s = 5\n{extra}"
        f'[gateway.workers]\nstt = ["{urls["stt"]}"]\nllm = ["{urls["llm"]}"]\ntts = ["{urls["tts"]}"]\nvision = []\n'
        f"{security}"
    )
    log = tmp_path / "gateway.log"
    command = [sys.executable, "-m", "gateway", "gateway", "--config", str(config), "--processes", "2"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)  # noqa: ASYNC220 (returns at once)
    gateway = MultiProcessGateway(process, port, log, trusted)
    try:
        async with asyncio.timeout(60):
            while True:
                assert process.poll() is None, log.read_text()
                with contextlib.suppress(OSError, ValueError):
                    status, _ = await gateway.get("/readyz")
                    if status == 200:
                        break
                await asyncio.sleep(0.2)
        yield gateway
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def open_spread(gateway: MultiProcessGateway, count: int, **options) -> list[GatewaySession]:
    """``count`` sessions, opened one after another: they are spread evenly over the two processes."""
    sessions = [await GatewaySession.connect(gateway.url, loopback_ice=True, **options) for _ in range(count)]
    spread = sorted((await sessions_by_pid(gateway)).values())
    assert spread == [count // 2, count - count // 2], spread
    return sessions


async def sessions_by_pid(gateway: MultiProcessGateway) -> dict[int, int]:
    return {p["pid"]: p["sessions"] for p in (await gateway.health())["processes"]}


async def wait_until_sessions(gateway: MultiProcessGateway, count: int, timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while (await gateway.health())["sessions"] != count:
            await asyncio.sleep(0.05)


async def answered(session: GatewaySession, timeout: float = 20) -> str:
    after = session.ask("What is the capital of France?")
    try:
        done = await session.wait_event("answer.done", timeout=timeout, after=after)
    except TimeoutError:
        raise AssertionError(f"not answered: {session.events[after:]}") from None
    return done["text"]


def test_a_port_another_program_listens_on_is_refused():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as other:
        with pytest.raises(OSError):
            listen_on("127.0.0.1", other.getsockname()[1])
    with socket.create_server(("127.0.0.1", 0), reuse_port=True) as sharing:  # a program that would share it
        with pytest.raises(OSError):
            listen_on("127.0.0.1", sharing.getsockname()[1])
    listeners = listen_on("127.0.0.1", 0)  # a free one
    try:
        assert len(listeners) == 1 and listeners[0].getsockname()[1] > 0
        with pytest.raises(OSError):  # a second gateway on it
            listen_on("127.0.0.1", listeners[0].getsockname()[1])
    finally:
        for listener in listeners:
            listener.close()


def test_a_name_of_several_addresses_is_listened_on_at_each_on_one_port():
    import socket

    addresses = {info[4][0] for info in socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)}
    listeners = listen_on("localhost", 0)
    try:
        assert {listener.getsockname()[0] for listener in listeners} == addresses
        assert len({listener.getsockname()[1] for listener in listeners}) == 1
    finally:
        for listener in listeners:
            listener.close()


async def test_session_limits_metrics_and_revocation_hold_across_processes(tmp_path, canned_workers):
    tokens = TokenFile(tmp_path / "tokens.json")
    kitchen, hall = tokens.create("kitchen"), tokens.create("hall")
    security = f'[security]\nclient_tokens_file = "{tmp_path / "tokens.json"}"\n'
    async with multi_process_gateway(tmp_path, canned_workers, "max_sessions = 4\nmax_sessions_per_client = 3\n", security) as gateway:
        health = await gateway.health()
        assert health["processes_expected"] == 2 and len(health["processes"]) == 2
        ours = await open_spread(gateway, 3, token=kitchen)
        others: list[GatewaySession] = []
        try:
            assert all(n >= 1 for n in (await sessions_by_pid(gateway)).values())
            with pytest.raises(GatewayError) as refused:  # the fourth of one client, whichever process takes it
                await GatewaySession.connect(gateway.url, loopback_ice=True, token=kitchen)
            assert refused.value.code == "too_many_client_sessions"
            others.append(await GatewaySession.connect(gateway.url, loopback_ice=True, token=hall))
            with pytest.raises(GatewayError) as refused:
                await GatewaySession.connect(gateway.url, loopback_ice=True, token=hall)
            assert refused.value.code == "too_many_sessions"
            for session in (*ours, *others):
                assert "Paris" in await answered(session)

            health = await gateway.health()
            assert health["sessions"] == 4 and sum(p["sessions"] for p in health["processes"]) == 4
            text = await gateway.metrics()
            assert "edgestream_sessions_open 4.0" in text
            assert 'edgestream_turns_total{outcome="answered"} 4.0' in text
            assert 'edgestream_errors_total{code="too_many_sessions"} 1.0' in text
            per_process = await gateway.metrics("?per_process=1")
            assert 'edgestream_sessions_open{process="0"}' in per_process and 'edgestream_sessions_open{process="1"}' in per_process

            tokens.revoke("kitchen")  # its sessions end in both processes
            async with asyncio.timeout(10):
                for session in ours:
                    await session.closed.wait()
            assert all(s.close_reason is not None and s.close_reason.code == "token_revoked" for s in ours)
            assert not others[0].closed.is_set() and "Paris" in await answered(others[0])
            await wait_until_sessions(gateway, 1)
        finally:
            for session in (*ours, *others):
                await session.close()


async def test_a_killed_process_loses_only_its_sessions_and_they_come_back(tmp_path, canned_workers):
    # max_sessions = 4: the killed process's sessions get back in only if its places were let go.
    async with multi_process_gateway(tmp_path, canned_workers, "max_sessions = 4\n") as gateway:
        sessions = await open_spread(gateway, 4, reconnect=FAST)
        try:
            for session in sessions:
                assert "Paris" in await answered(session)
            spread = await sessions_by_pid(gateway)
            victim = min(spread, key=lambda pid: (spread[pid] == 0, pid))
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()

            async def lost(session: GatewaySession) -> bool:
                with contextlib.suppress(TimeoutError):  # a session of the other process hears nothing
                    await session.wait_event("connection.lost", timeout=8)
                    return True
                return False

            lost_now = await asyncio.gather(*(lost(s) for s in sessions))
            survivors = [s for s, gone in zip(sessions, lost_now, strict=True) if not gone]
            moved = [s for s, gone in zip(sessions, lost_now, strict=True) if gone]
            assert moved and survivors and len(moved) == spread[victim]
            for session in survivors:  # the other process's sessions went on: no lost turn, no reconnect
                assert "Paris" in await answered(session)
                assert session.reconnects == 0
            for session in moved:
                await session.wait_event("connection.restored", timeout=20)
                assert "Paris" in await answered(session)
            await wait_until_sessions(gateway, 4)
            async with asyncio.timeout(20):  # the supervisor started it again
                while True:
                    pids = {p["pid"] for p in (await gateway.health())["processes"]}
                    if len(pids) == 2 and victim not in pids:
                        break
                    await asyncio.sleep(0.1)
            assert time.monotonic() - killed_at < 40
            assert "exited with -9; starting it again" in gateway.log.read_text()
        finally:
            for session in sessions:
                await session.close()


async def test_sigterm_drains_every_process(tmp_path, canned_workers):
    async with multi_process_gateway(tmp_path, canned_workers) as gateway:
        sessions = await open_spread(gateway, 2)
        try:
            gateway.process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                for session in sessions:
                    await session.closed.wait()
            assert all(s.close_reason is not None and s.close_reason.code == "shutting_down" for s in sessions)
            assert await asyncio.to_thread(gateway.process.wait, 20) == 0
        finally:
            for session in sessions:
                await session.close()


async def test_tls_is_spoken_by_the_process_a_connection_is_handed_to(tmp_path, canned_workers):
    cert, key = tmp_path / "edgestream.crt", tmp_path / "edgestream.key"
    tls.create_self_signed(cert, key, ["localhost", "127.0.0.1"])
    security = f'[security]\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
    async with multi_process_gateway(tmp_path, canned_workers, security=security, trusted=tls.client_context(cert)) as gateway:
        with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust it: refused, nothing else breaks
            await GatewaySession.connect(gateway.url, loopback_ice=True, ssl_context=ssl.create_default_context())
        sessions = await open_spread(gateway, 2, ssl_context=gateway.trusted)
        try:
            for session in sessions:
                assert "Paris" in await answered(session)
        finally:
            for session in sessions:
                await session.close()
