"""Announcements and the pool's admission rules: bad announcements and bad workers are kept out.

mDNS itself is exercised across network namespaces in ``tests/test_multihost.py``
(multicast here would leave the machine).
"""

from __future__ import annotations

import pytest

from gateway.worker_pool import WorkerPool
from stream.announcement import BadAnnouncement, parse, properties
from stream.protocol import WorkerKind
from tests.conftest import wait_until

SHA = "ab" * 32


def good(**changes: str) -> dict[bytes, bytes]:
    props = {**properties(WorkerKind.STT, "whisper-tiny.en", SHA, 2), **changes}
    return {k.encode(): v.encode() for k, v in props.items()}


def test_a_good_announcement_becomes_a_url():
    found = parse("stt-a._edgestream._tcp.local.", good(), ["198.18.0.3"], 8701)
    assert (found.kind, found.model_id, found.model_sha256, found.capacity) == (WorkerKind.STT, "whisper-tiny.en", SHA, 2)
    assert found.url == "ws://198.18.0.3:8701"


@pytest.mark.parametrize(
    ("props", "addresses", "port", "problem"),
    [
        (good(kind="teleport"), ["198.18.0.3"], 8701, "unknown worker kind"),
        (good(sha256="not-a-hash"), ["198.18.0.3"], 8701, "not 64 hex digits"),
        (good(sha256="AB" * 32), ["198.18.0.3"], 8701, "not 64 hex digits"),
        (good(proto="99"), ["198.18.0.3"], 8701, "protocol version"),
        (good(capacity="lots"), ["198.18.0.3"], 8701, "not a number"),
        (good(capacity="0"), ["198.18.0.3"], 8701, "out of range"),
        (good(model=""), ["198.18.0.3"], 8701, "no model id"),
        (good(), [], 8701, "no usable address"),
        (good(), ["0.0.0.0", "169.254.1.1"], 8701, "no usable address"),
        (good(), ["198.18.0.3"], None, "bad port"),
        ({b"kind": b"stt"}, ["198.18.0.3"], 8701, "protocol version"),
    ],
    ids=[
        "unknown-kind",
        "bad-hash",
        "upper-case-hash",
        "other-protocol",
        "capacity-text",
        "capacity-zero",
        "no-model",
        "no-address",
        "unusable-address",
        "no-port",
        "almost-empty",
    ],
)
def test_bad_announcements_say_what_is_wrong(props, addresses, port, problem):
    with pytest.raises(BadAnnouncement, match=problem):
        parse("x._edgestream._tcp.local.", props, addresses, port)


async def test_unreachable_and_mismatched_workers_stay_out_and_others_are_unaffected(start_worker):
    _, stt_url = await start_worker(WorkerKind.STT)
    _, tts_url = await start_worker(WorkerKind.TTS)
    pool = WorkerPool({WorkerKind.STT: [stt_url]})
    pool.start()
    try:
        pool.add("ws://127.0.0.1:9", WorkerKind.LLM, source="mdns", expect_model=("smollm2", SHA))  # nothing listens
        pool.add(tts_url, WorkerKind.TTS, source="mdns", expect_model=("piper-voice", SHA))  # serves another hash
        await pool.wait_ready([WorkerKind.STT], timeout=10)
        await wait_until(lambda: pool.members[tts_url].failures >= 1 and pool.members["ws://127.0.0.1:9"].failures >= 1)
        assert not pool.available(WorkerKind.LLM) and not pool.available(WorkerKind.TTS)
        assert "announced" in pool.members[tts_url].problem
        assert pool.available(WorkerKind.STT)
        snapshot = {row["url"]: row for row in pool.snapshot()}
        assert snapshot[stt_url]["healthy"] and not snapshot[tts_url]["healthy"]
    finally:
        await pool.close()


async def test_a_flapping_worker_keeps_its_backoff():
    pool = WorkerPool()
    pool.start()
    try:
        url = "ws://127.0.0.1:9"
        for _ in range(3):  # announced and withdrawn, again and again
            pool.add(url, WorkerKind.STT, source="mdns")
            await wait_until(lambda: pool.members[url].failures >= 1)
            failures = pool.members[url].failures
            await pool.remove(url)
        pool.add(url, WorkerKind.STT, source="mdns")
        assert pool.members[url].failures >= failures + 1  # the next retry waits longer, not from scratch
    finally:
        await pool.close()
