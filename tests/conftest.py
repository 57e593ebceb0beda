"""Shared fixtures: real models loaded once per test session, real worker servers on loopback."""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import jiwer
import numpy as np
import pytest
import pytest_asyncio

from gateway.harness.speech import piper_voice
from gateway.server import Gateway
from stream.config import Config, GatewaySettings
from stream.protocol import Hello, WorkerKind
from stream.worker_client import WorkerClient
from workers.engine import Engine
from workers.launch import load_engine
from workers.server import WorkerServer

# -- tiers -------------------------------------------------------------------------------
# `pytest -m "not models"` is the fast tier: no real model, no browser, no process
# of the whole system. A test is in the slow tier when it uses one of these
# fixtures (each loads a model or starts a system), or when its module or the
# test itself says `pytest.mark.models`.
MODEL_FIXTURES = frozenset({"speak", "workers", "gateway", "two_of_each", "limited_gateway", "playwright", "open_page", "bare_gateway", "system"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.models)


_engines: dict[tuple[WorkerKind, tuple], Engine] = {}


def engine_for(kind: WorkerKind, **settings: object) -> Engine:
    """The real model engine of ``kind`` (embedded default model), loaded once per session.

    ``settings`` override the defaults (capacity 2, one thread); each distinct
    set of overrides is its own engine.
    """
    key = (kind, tuple(sorted(settings.items())))
    if key not in _engines:
        overrides = {"capacity": 2, "threads": 1, **settings}
        _engines[key] = load_engine(kind, Config().workers.for_kind(kind).model_copy(update=overrides))
    return _engines[key]


@pytest.fixture(scope="session", autouse=True)
def _close_engines():
    yield
    for engine in _engines.values():
        engine.close()
    _engines.clear()


StartWorker = Callable[..., Awaitable[tuple[WorkerServer, str]]]


@pytest_asyncio.fixture(loop_scope="session")
async def start_worker() -> AsyncIterator[StartWorker]:
    """Start a worker server on a free loopback port; all are closed after the test."""
    servers: list[WorkerServer] = []

    async def start(kind: WorkerKind, capacity: int = 2, engine: Engine | None = None, **options: object) -> tuple[WorkerServer, str]:
        server = WorkerServer(engine or engine_for(kind), capacity=capacity, **options)
        port = await server.start("127.0.0.1", 0)
        servers.append(server)
        return server, f"ws://127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.close()


@pytest_asyncio.fixture(loop_scope="session")
async def connect() -> AsyncIterator[Callable[[str], Awaitable[WorkerClient]]]:
    clients: list[WorkerClient] = []

    async def open_client(url: str) -> WorkerClient:
        client = await WorkerClient.connect(url)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        await client.close()


@pytest.fixture(scope="session")
def speak() -> Iterator[Callable[[str], np.ndarray]]:
    """Speech for a sentence, spoken by piper (exact words known), as 16 kHz mono int16."""
    with piper_voice() as say:
        yield functools.cache(say)


def worker_hello(kind: WorkerKind = WorkerKind.STT, challenge: str | None = None, worker_id: str = "w") -> Hello:
    """A valid worker ``hello`` for protocol tests without a worker."""
    return Hello(
        worker_id=worker_id,
        kind=kind,
        model_id="m",
        model_sha256="a" * 64,
        capacity=2,
        software="t",
        max_text_bytes=1 << 16,
        max_frame_bytes=1 << 20,
        challenge=challenge,
    )


_NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def normalize_words(text: str) -> str:
    """Lower case, no punctuation, small numbers as words ("at 7." == "at seven")."""
    words = re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()
    return " ".join(_NUMBERS[int(w)] if w.isdigit() and int(w) < len(_NUMBERS) else w for w in words)


def word_error_rate(reference: str, hypothesis: str) -> float:
    return jiwer.wer(normalize_words(reference), normalize_words(hypothesis) or "<empty>")


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


# -- a gateway with one in-process worker of each kind ------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def workers(start_worker):
    """One in-process worker of each kind on loopback; their servers, by kind."""
    servers, urls = {}, {}
    for kind in WorkerKind:
        servers[kind], url = await start_worker(kind, capacity=2)
        urls[kind] = [url]
    return servers, urls


@pytest_asyncio.fixture(loop_scope="session")
async def gateway(workers):
    _, urls = workers
    gateway = Gateway(GatewaySettings(loopback_ice=True, port=0, ice_timeout_s=5), urls)
    port = await gateway.start("127.0.0.1", 0)
    await gateway.pool.wait_ready(list(WorkerKind), timeout=10)
    gateway.url = f"ws://127.0.0.1:{port}/session"
    yield gateway
    await gateway.close()


def with_silence(samples: np.ndarray, before_s: float = 0.3, after_s: float = 0.8) -> np.ndarray:
    return np.concatenate([np.zeros(int(16000 * before_s), np.int16), samples, np.zeros(int(16000 * after_s), np.int16)])
