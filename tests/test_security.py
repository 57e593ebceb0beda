"""Who may open a session, and TLS on every link: tokens, their CLI, exposure, certificates."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys

import pytest
import websockets

from gateway.server import Gateway
from gateway.tokens import TokenChecker, TokenFile, TokenFileError
from stream import tls
from stream.config import ExposureError, GatewaySettings, SecuritySettings
from stream.http import get
from stream.keys import create_key_file
from stream.protocol import WorkerKind
from stream.sdk import GatewayError, GatewaySession
from tests.conftest import wait_until, with_silence, word_error_rate

pytestmark = pytest.mark.models  # real models or processes of the system: the slow tier

PYTHON = sys.executable


def edgestream(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "gateway", *args], capture_output=True, text=True, timeout=60)


def test_token_file_keeps_hashes_and_names(tmp_path):
    tokens = TokenFile(tmp_path / "tokens.json")
    first = tokens.create("kitchen-tablet")
    second = tokens.create("ar-glasses")
    text = (tmp_path / "tokens.json").read_text()
    assert first not in text and second not in text and "kitchen-tablet" in text
    checker = TokenChecker(tokens.path)
    assert checker.client(first) == "kitchen-tablet" and checker.client(second) == "ar-glasses"
    assert checker.client("es_guess") is None and checker.client("") is None and checker.client("x" * 10_000) is None
    with pytest.raises(TokenFileError, match="exists"):
        tokens.create("ar-glasses")
    with pytest.raises(TokenFileError, match="name"):
        tokens.create("no spaces please")
    assert tokens.revoke("ar-glasses") and not tokens.revoke("ar-glasses")
    assert checker.reload() and checker.client(second) is None and checker.client(first) == "kitchen-tablet"
    # A broken file keeps the tokens read before (and says why in the log).
    tokens.path.write_text("{not json")
    assert not checker.reload() and checker.client(first) == "kitchen-tablet"


def test_token_cli_creates_lists_and_revokes(tmp_path):
    path = str(tmp_path / "tokens.json")
    created = edgestream("token", "create", "alice", "--file", path)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("es_") and TokenChecker(path).client(token) == "alice"
    listed = edgestream("token", "list", "--file", path)
    assert listed.returncode == 0 and listed.stdout.startswith("alice\t")
    assert edgestream("token", "revoke", "alice", "--file", path).returncode == 0
    missing = edgestream("token", "revoke", "alice", "--file", path)
    assert missing.returncode == 1 and "no token named 'alice'" in missing.stderr
    assert TokenChecker(path).client(token) is None


def test_the_token_file_is_never_written_through_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    path = tmp_path / "tokens.json"
    (tmp_path / f".{path.name}.{os.getpid()}.tmp").symlink_to(victim)  # the old, predictable temporary name
    TokenFile(path).create("kitchen-tablet")
    assert victim.read_text() == "precious\n"
    assert "kitchen-tablet" in path.read_text() and not path.is_symlink()
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_listening_beyond_loopback_needs_tokens(tmp_path):
    gateway = Gateway(GatewaySettings(port=0), {})
    with pytest.raises(ExposureError, match="client_tokens_file"):
        asyncio.run(gateway.start("0.0.0.0", 0))
    refused = edgestream("gateway", "--host", "0.0.0.0", "--port", "0")
    assert refused.returncode == 2 and "client_tokens_file" in refused.stderr


def test_a_worker_listening_beyond_loopback_needs_the_worker_key(tmp_path):
    refused = edgestream("worker", "stt", "--host", "0.0.0.0", "--port", "0")
    assert refused.returncode == 2 and "worker_key_file" in refused.stderr
    key = tmp_path / "worker.key"
    create_key_file(key)
    (tmp_path / "keyed.toml").write_text(f'[security]\nworker_key_file = "{key}"\n')
    # With the key it would start: it gets past the check to loading its model (stopped by a missing one).
    keyed = edgestream("worker", "stt", "--config", str(tmp_path / "keyed.toml"), "--host", "0.0.0.0", "--port", "0", "--model", str(tmp_path / "none"))
    assert keyed.returncode == 1 and "model not found" in keyed.stderr


async def open_gateway(urls, tmp_path, **settings) -> tuple[Gateway, str, TokenFile]:
    tokens = TokenFile(tmp_path / "tokens.json")
    security = SecuritySettings(client_tokens_file=str(tokens.path))
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5, **settings), urls, security)
    port = await gateway.start("127.0.0.1", 0)
    return gateway, f"ws://127.0.0.1:{port}/session", tokens


async def test_sessions_need_a_valid_token_and_end_when_it_is_revoked(workers, tmp_path, speak):
    _, urls = workers
    gateway, url, tokens = await open_gateway(urls, tmp_path)
    alice, bob = tokens.create("alice"), tokens.create("bob")
    try:
        await wait_until(lambda: gateway.tokens.client(bob) == "bob", timeout=5)
        for token, reason in ((None, "needs a token"), ("es_wrong", "unknown or revoked")):
            with pytest.raises(GatewayError) as info:
                await GatewaySession.connect(url, loopback_ice=True, token=token)
            assert info.value.code == "unauthorized" and reason in info.value.message
        assert gateway.metrics.errors.labels("unauthorized")._value.get() == 2
        # Even a session that reconnects ends for good when its token is revoked.
        alice_session = await GatewaySession.connect(url, loopback_ice=True, token=alice, reconnect=True)
        bob_session = await GatewaySession.connect(url, loopback_ice=True, token=bob)
        await bob_session.say(with_silence(speak("Good morning.")), 16000)
        final = await bob_session.wait_event("transcript.final", timeout=20)
        assert word_error_rate("Good morning.", final["text"]) <= 0.5
        assert edgestream("token", "revoke", "alice", "--file", str(tokens.path)).returncode == 0
        async with asyncio.timeout(10):
            await alice_session.closed.wait()
        assert alice_session.close_reason is not None and alice_session.close_reason.code == "token_revoked"
        assert not any(e["type"].startswith("connection.") for e in alice_session.events)
        with pytest.raises(GatewayError) as info:
            await GatewaySession.connect(url, loopback_ice=True, token=alice)
        assert info.value.code == "unauthorized"
        # Bob's session is untouched by Alice's revocation.
        assert bob_session.connected and bob_session.session_id in gateway.sessions
        await alice_session.close()
        await bob_session.close()
    finally:
        await gateway.close()


async def test_sessions_per_client_are_limited_without_touching_other_clients(workers, tmp_path):
    _, urls = workers
    gateway, url, tokens = await open_gateway(urls, tmp_path, max_sessions_per_client=1)
    alice, bob = tokens.create("alice"), tokens.create("bob")
    sessions = []
    try:
        await wait_until(lambda: gateway.tokens.client(bob) == "bob", timeout=5)
        sessions.append(await GatewaySession.connect(url, loopback_ice=True, token=alice))
        with pytest.raises(GatewayError) as info:
            await GatewaySession.connect(url, loopback_ice=True, token=alice)
        assert info.value.code == "too_many_client_sessions" and "alice" in info.value.message
        sessions.append(await GatewaySession.connect(url, loopback_ice=True, token=bob))
        assert all(s.connected for s in sessions) and len(gateway.sessions) == 2
        await sessions.pop(0).close()
        await wait_until(lambda: len(gateway.sessions) == 1)
        sessions.append(await GatewaySession.connect(url, loopback_ice=True, token=alice))  # a slot is free again
    finally:
        for session in sessions:
            await session.close()
        await gateway.close()


def test_cert_cli_writes_a_pair_that_verifies(tmp_path):
    made = edgestream("cert", "create", str(tmp_path / "tls"), "--name", "edge-box.lan", "--name", "198.18.0.7")
    assert made.returncode == 0, made.stderr
    cert, key = tmp_path / "tls" / "edgestream.crt", tmp_path / "tls" / "edgestream.key"
    assert key.stat().st_mode & 0o077 == 0
    tls.server_context(cert, key)
    from cryptography import x509

    names = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "edge-box.lan"} <= set(names.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "198.18.0.7"} <= {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    again = edgestream("cert", "create", str(tmp_path / "tls"))
    assert again.returncode == 1 and "not replacing" in again.stderr


async def test_every_link_over_tls_with_the_self_signed_pair(start_worker, tmp_path, speak):
    """Signaling over wss, worker links over wss (with the key), a real turn end to end."""
    cert, key = tmp_path / "edgestream.crt", tmp_path / "edgestream.key"
    tls.create_self_signed(cert, key, ["localhost", "127.0.0.1"])
    key_file = tmp_path / "worker.key"
    create_key_file(key_file)
    security = SecuritySettings(worker_key_file=str(key_file), tls_cert=str(cert), tls_key=str(key), tls_ca=str(cert))
    from stream.keys import load_key
    from workers.server import WorkerServer

    urls = {}
    servers: list[WorkerServer] = []
    for kind in (WorkerKind.STT, WorkerKind.LLM, WorkerKind.TTS):
        server, _ = await start_worker(kind, key=load_key(key_file))
        await server.close()  # restarted below on TLS (the fixture still closes it at the end)
        port = await server.start("127.0.0.1", 0, tls.server_context(cert, key))
        servers.append(server)
        urls[kind] = [f"wss://127.0.0.1:{port}"]
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5), urls, security)
    port = await gateway.start("127.0.0.1", 0)
    trusted = tls.client_context(cert)
    try:
        await gateway.pool.wait_ready([WorkerKind.STT, WorkerKind.LLM, WorkerKind.TTS], timeout=15)
        status, body = await get(f"https://127.0.0.1:{port}/healthz", ssl_context=trusted)
        assert status == 200 and json.loads(body)["ok"]
        # A client that does not trust the certificate cannot connect; plain ws:// is not served.
        with pytest.raises(ssl.SSLCertVerificationError):
            await GatewaySession.connect(f"wss://127.0.0.1:{port}/session", loopback_ice=True, ssl_context=ssl.create_default_context())
        with pytest.raises((websockets.InvalidMessage, websockets.InvalidHandshake, OSError, EOFError)):
            await GatewaySession.connect(f"ws://127.0.0.1:{port}/session", loopback_ice=True, timeout=5)
        session = await GatewaySession.connect(f"wss://127.0.0.1:{port}/session", loopback_ice=True, ssl_context=trusted)
        try:
            await session.say(with_silence(speak("What is the capital of Italy?")), 16000)
            final = await session.wait_event("transcript.final", timeout=20)
            assert word_error_rate("What is the capital of Italy?", final["text"]) <= 0.25
            done = await session.wait_event("answer.done", timeout=40)
            assert done["text"].strip()
            await wait_until(lambda: session.first_audible(after=0) is not None, timeout=20)
        finally:
            await session.close()
        assert all(m.url.startswith("wss://") and m.estimate.healthy for m in gateway.pool.members.values())
    finally:
        await gateway.close()


def test_security_config_is_checked_at_load():
    from stream.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        parse_config({"security": {"tls_cert": "/x.crt"}})
    with pytest.raises(ConfigError, match=r"security\.token_file: unknown key"):
        parse_config({"security": {"token_file": "/x"}})
    config = parse_config({"security": {"tls_cert": "/x.crt", "tls_key": "/x.key"}})
    assert all(url.startswith("wss://") for urls in config.worker_urls().values() for url in urls)
