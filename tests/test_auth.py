"""Gateway<->worker authentication: the state machine without sockets, then real workers and a real gateway.

A rogue worker here is a WebSocket server that speaks the worker protocol's
hello and records every frame it is sent: the one thing a real worker cannot
be made to do.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from websockets.asyncio.server import serve

from gateway.server import Gateway
from stream.config import GatewaySettings, SecuritySettings
from stream.keys import KeyFileError, create_key_file, is_private, load_key
from stream.protocol import (
    Auth,
    AuthOk,
    Connection,
    Error,
    ErrorCode,
    Hello,
    JobStart,
    LoadRequest,
    LocalProtocolError,
    MediaFormat,
    MediaFrame,
    ProtocolError,
    Role,
    WorkerKind,
    encode_frame,
)
from stream.protocol.auth import new_nonce, proof
from stream.sdk import GatewaySession
from stream.worker_client import WorkerClient
from tests.conftest import with_silence, word_error_rate, worker_hello

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def hello(challenge: str | None) -> Hello:
    return worker_hello(WorkerKind.STT, challenge, worker_id="stt-1")


def handshake(client_key: bytes | None, worker_key: bytes | None) -> tuple[Connection, Connection]:
    """Both sides up to (not past) the client's check of the hello."""
    worker = Connection(Role.WORKER, WorkerKind.STT, key=worker_key)
    client = Connection(Role.CLIENT, key=client_key)
    client.receive_text(worker.send(hello(new_nonce() if worker_key else None)))
    return client, worker


def test_with_the_same_key_both_sides_prove_it_and_jobs_flow():
    client, worker = handshake(KEY, KEY)
    assert not client.authenticated and not worker.authenticated
    with pytest.raises(LocalProtocolError):  # nothing goes to the worker before it has proved the key
        client.send(JobStart(job_id=1, kind=WorkerKind.STT))
    assert isinstance(worker.receive_text(client.send(client.auth())), Auth)
    assert worker.authenticated and not client.authenticated
    assert isinstance(client.receive_text(worker.send(worker.auth_ok())), AuthOk)
    assert client.authenticated
    assert isinstance(worker.receive_text(client.send(JobStart(job_id=1, kind=WorkerKind.STT))), JobStart)


def test_without_keys_no_auth_is_asked_or_allowed():
    client, worker = handshake(None, None)
    assert client.authenticated and worker.authenticated
    with pytest.raises(LocalProtocolError):
        client.auth()
    with pytest.raises(ProtocolError) as info:
        worker.receive_text(Auth(nonce=new_nonce(), proof="0" * 64).model_dump_json())
    assert info.value.code is ErrorCode.BAD_STATE


def test_a_worker_that_asks_no_proof_is_refused_by_a_client_with_a_key():
    worker = Connection(Role.WORKER, WorkerKind.STT)
    client = Connection(Role.CLIENT, key=KEY)
    with pytest.raises(ProtocolError) as info:
        client.receive_text(worker.send(hello(None)))
    assert info.value.code is ErrorCode.UNAUTHORIZED and "may not be ours" in info.value.message
    assert client.hello is None


def test_a_client_without_the_key_cannot_use_a_worker_that_has_one():
    worker = Connection(Role.WORKER, WorkerKind.STT, key=KEY)
    client = Connection(Role.CLIENT)
    with pytest.raises(ProtocolError) as info:
        client.receive_text(worker.send(hello(new_nonce())))
    assert info.value.code is ErrorCode.UNAUTHORIZED and "requires a key" in info.value.message
    # A client that ignores that and sends a job anyway is refused by the worker.
    for message in (JobStart(job_id=1, kind=WorkerKind.STT), LoadRequest()):
        with pytest.raises(ProtocolError) as info:
            worker.receive_text(message.model_dump_json())
        assert info.value.code is ErrorCode.UNAUTHORIZED
    with pytest.raises(ProtocolError) as info:
        worker.receive_binary(encode_frame(MediaFrame(1, 0, MediaFormat.PCM_S16LE, b"\x00\x01" * 160, 1, 16000)))
    assert info.value.code is ErrorCode.UNAUTHORIZED


def test_a_wrong_key_fails_on_each_side():
    client, worker = handshake(OTHER_KEY, KEY)  # the client's key is wrong
    with pytest.raises(ProtocolError) as info:
        worker.receive_text(client.send(client.auth()))
    assert info.value.code is ErrorCode.UNAUTHORIZED and not worker.authenticated
    with pytest.raises(LocalProtocolError):
        worker.auth_ok()

    client, worker = handshake(KEY, OTHER_KEY)  # the worker's key is wrong
    auth = client.send(client.auth())
    # (a worker with another key refuses the client too; a rogue one might answer anyway)
    rogue_ok = AuthOk(proof=proof(OTHER_KEY, "worker", worker.hello.challenge, json.loads(auth)["nonce"], "stt-1"))
    with pytest.raises(ProtocolError) as info:
        client.receive_text(rogue_ok.model_dump_json())
    assert info.value.code is ErrorCode.UNAUTHORIZED and not client.authenticated


def test_proofs_cannot_be_reflected_or_replayed():
    client, _worker = handshake(KEY, KEY)
    auth = Auth.model_validate_json(client.send(client.auth()))
    # A rogue worker echoing the client's own proof back as its auth.ok.
    with pytest.raises(ProtocolError):
        client.receive_text(AuthOk(proof=auth.proof).model_dump_json())
    # A recorded auth, replayed on a new connection (a new challenge), is refused.
    _, other_worker = handshake(KEY, KEY)
    with pytest.raises(ProtocolError) as info:
        other_worker.receive_text(auth.model_dump_json())
    assert info.value.code is ErrorCode.UNAUTHORIZED


def test_auth_is_answered_once():
    client, worker = handshake(KEY, KEY)
    auth = client.send(client.auth())
    worker.receive_text(auth)
    with pytest.raises(ProtocolError):
        worker.receive_text(auth)
    client.receive_text(worker.send(worker.auth_ok()))
    with pytest.raises(LocalProtocolError):
        worker.send(worker.auth_ok())
    with pytest.raises(ProtocolError):
        client.receive_text(worker.auth_ok().model_dump_json())


def test_a_worker_cannot_send_jobs_output_or_load_before_auth():
    _, worker = handshake(KEY, KEY)
    from stream.protocol import LoadReport

    with pytest.raises(LocalProtocolError):
        worker.send(LoadReport(running=0, queued=0, capacity=1, service_rate=0, rate_unit="s", jobs_completed=0))
    # An error about the connection (a refused auth) may go out.
    worker.send(Error(code=ErrorCode.UNAUTHORIZED, message="no"))


def test_key_files(tmp_path):
    path = tmp_path / "worker.key"
    create_key_file(path)
    assert len(load_key(path)) == 32 and is_private(path)
    with pytest.raises(FileExistsError):
        create_key_file(path)
    (tmp_path / "short.key").write_text("abcd\n")
    (tmp_path / "junk.key").write_text("not hex at all\n")
    for name, words in (("short.key", "at least"), ("junk.key", "hex digits"), ("absent.key", "cannot read")):
        with pytest.raises(KeyFileError, match=words):
            load_key(tmp_path / name)


# -- real workers -------------------------------------------------------------------


async def test_a_worker_with_a_key_serves_only_clients_that_hold_it(start_worker, speak):
    server, url = await start_worker(WorkerKind.STT, key=KEY)
    client = await WorkerClient.connect(url, key=KEY)
    try:
        finals = [r.text async for r in client.transcribe(with_silence(speak("Turn on the lights."))) if r.final]
        assert word_error_rate("Turn on the lights.", finals[-1]) <= 0.25
    finally:
        await client.close()
    for key, words in ((None, "requires a key"), (OTHER_KEY, "refused")):
        with pytest.raises(ProtocolError) as info:
            await WorkerClient.connect(url, key=key)
        assert info.value.code is ErrorCode.UNAUTHORIZED and words in info.value.message
    # A client that skips auth and starts a job gets one error and a closed connection.
    async with websockets.connect(url) as websocket:
        assert json.loads(await websocket.recv())["challenge"]
        await websocket.send(JobStart(job_id=1, kind=WorkerKind.STT).model_dump_json())
        error = json.loads(await asyncio.wait_for(websocket.recv(), 5))
        assert error["type"] == "error" and error["code"] == "unauthorized"
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(websocket.recv(), 5)
        assert websocket.close_code == 1008
    assert server.jobs_completed == 1 and server.running == 0


class RogueWorker:
    """Answers like an STT worker (without the key, or with another) and records everything it is sent."""

    def __init__(self, key: bytes | None) -> None:
        self.key = key
        self.received: list[str | bytes] = []
        self.connections = 0
        self.url = ""

    async def start(self) -> None:
        self._server = await serve(self._handle, "127.0.0.1", 0)
        self.url = f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, websocket) -> None:
        self.connections += 1
        challenge = new_nonce() if self.key else None
        await websocket.send(hello(challenge).model_dump_json())
        try:
            async for data in websocket:
                self.received.append(data)
                if isinstance(data, str) and json.loads(data).get("type") == "auth":
                    nonce = json.loads(data)["nonce"]
                    await websocket.send(AuthOk(proof=proof(self.key, "worker", challenge, nonce, "stt-1")).model_dump_json())
        except websockets.ConnectionClosed:
            pass

    def sent_work(self) -> list[str | bytes]:
        """Anything but an auth attempt: job messages, audio frames, load requests."""
        return [m for m in self.received if isinstance(m, bytes) or json.loads(m).get("type") != "auth"]


async def test_rogue_workers_never_receive_audio_and_a_rogue_gateway_gets_no_worker(start_worker, workers, speak, tmp_path):
    key_file = tmp_path / "worker.key"
    create_key_file(key_file)
    key = load_key(key_file)
    _, _urls = workers
    rogues = [RogueWorker(None), RogueWorker(OTHER_KEY)]
    for rogue in rogues:
        await rogue.start()
    _, real_stt = await start_worker(WorkerKind.STT, key=key)
    keyed = {kind: [(await start_worker(kind, key=key))[1]] for kind in (WorkerKind.LLM, WorkerKind.TTS)}
    worker_urls = {**keyed, WorkerKind.STT: [rogues[0].url, rogues[1].url, real_stt]}
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5), worker_urls, SecuritySettings(worker_key_file=str(key_file)))
    port = await gateway.start("127.0.0.1", 0)
    try:
        await gateway.pool.wait_ready([WorkerKind.STT, WorkerKind.LLM, WorkerKind.TTS], timeout=15)
        async with asyncio.timeout(10):
            while not all(rogue.connections for rogue in rogues):
                await asyncio.sleep(0.05)
        problems = {m.url: m.problem for m in gateway.pool.members.values()}
        assert "may not be ours" in problems[rogues[0].url] and "does not hold the key" in problems[rogues[1].url]
        session = await GatewaySession.connect(f"ws://127.0.0.1:{port}/session", loopback_ice=True)
        try:
            for question in ("What is two plus two?", "Name a color."):
                after = len(session.events)
                await session.say(with_silence(speak(question)), 16000)
                done = await session.wait_event("answer.done", timeout=40, after=after)
                assert done["text"].strip()
                assert session.events[after:] and not any(e["type"] == "error" and e["code"] != "answer_truncated" for e in session.events[after:])
        finally:
            await session.close()
        for rogue in rogues:
            assert rogue.sent_work() == [], rogue.received[:3]
    finally:
        await gateway.close()
        for rogue in rogues:
            await rogue.close()

    # The other way round: a gateway without the key (or with another) never gets a keyed worker into rotation.
    other_file = tmp_path / "other.key"
    other_file.write_text(OTHER_KEY.hex())
    for security in (SecuritySettings(), SecuritySettings(worker_key_file=str(other_file))):
        rogue_gateway = Gateway(GatewaySettings(port=0), {WorkerKind.STT: [real_stt]}, security)
        await rogue_gateway.start("127.0.0.1", 0)
        try:
            member = rogue_gateway.pool.members[real_stt]
            async with asyncio.timeout(10):
                while "unauthorized" not in member.problem:
                    await asyncio.sleep(0.05)
            assert not rogue_gateway.pool.available(WorkerKind.STT)
        finally:
            await rogue_gateway.close()
