"""``edgestream fuzz protocol``: a million mutated frames through the worker protocol's state machines.

Each frame starts as a valid one (a control message or a media frame of a
real job's lifecycle) and is mutated at random: bits flipped, bytes
replaced, inserted or deleted, cut short, spliced with another frame, or
replaced by random bytes. It goes to both sides' :class:`~stream.protocol.Connection`
(a worker's and a client's, each mid-conversation), as text and as binary.
The contract is that a frame is either accepted or refused with
:class:`~stream.protocol.ProtocolError`; any other exception is a crash, and
is reported with the input that caused it (hex) and its traceback.

The hypothesis tests in ``tests/test_protocol_*.py`` check the same contract
on a few hundred generated inputs per run; this is the long run.
"""

from __future__ import annotations

import json
import random
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from stream.protocol import (
    Auth,
    AuthOk,
    Connection,
    Error,
    ErrorCode,
    Hello,
    JobCancel,
    JobDone,
    JobEnd,
    JobFlush,
    JobResult,
    JobStart,
    JobText,
    LoadReport,
    LoadRequest,
    MediaFormat,
    MediaFrame,
    ProtocolError,
    Role,
    WorkerKind,
    encode_frame,
    encode_message,
)

MAX_REPORTED = 20
HELLO = Hello(
    worker_id="stt@x", kind=WorkerKind.STT, model_id="m", model_sha256="0" * 64, capacity=2, software="s", max_text_bytes=65536, max_frame_bytes=4 << 20
)
CHALLENGED_HELLO = HELLO.model_copy(update={"challenge": "c" * 64})
KEY = bytes(32)


def corpus() -> list[bytes]:
    """Valid frames of every type, as they go over the wire."""
    pcm = np.zeros(320, np.int16).tobytes()
    messages = [
        HELLO,
        CHALLENGED_HELLO,
        Auth(nonce="a" * 64, proof="b" * 64),
        AuthOk(proof="d" * 64),
        JobStart(job_id=7, kind=WorkerKind.STT, params={"language": "en"}, trace="abc.1"),
        JobStart(job_id=8, kind=WorkerKind.LLM, params={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}),
        JobText(job_id=7, seq=0, text="hello there"),
        JobFlush(job_id=7),
        JobEnd(job_id=7),
        JobCancel(job_id=7),
        JobResult(job_id=7, seq=0, data={"text": "hi", "final": False, "audio_s": 0.5}),
        JobDone(job_id=7, reason="complete", stats={"compute_s": 0.1}),
        Error(code=ErrorCode.BUSY, message="full", job_id=7),
        LoadRequest(),
        LoadReport(running=1, queued=0, capacity=2, service_rate=1.0, rate_unit="audio_s", jobs_completed=3),
    ]
    frames = [MediaFrame(7, 0, MediaFormat.PCM_S16LE, pcm, 1, 16_000), MediaFrame(7, 1, MediaFormat.JPEG, b"\xff\xd8\xff\xe0" + bytes(60))]
    return [encode_message(m).encode() for m in messages] + [encode_frame(f) for f in frames]


def mutate(data: bytes, rng: random.Random, corpus: list[bytes]) -> bytes:
    """One random mutation of ``data`` (sometimes several)."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 4))):
        op = rng.randrange(8)
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # replace a byte with an interesting one
            buf[rng.randrange(len(buf))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, ord('"'), ord("{"), ord("}"), ord("\\"), rng.randrange(256)))
        elif op == 2:  # insert bytes
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randrange(1, 9))
        elif op == 3 and buf:  # delete a run
            i = rng.randrange(len(buf))
            del buf[i : i + rng.randrange(1, 9)]
        elif op == 4:  # cut short
            del buf[rng.randrange(len(buf) + 1) :]
        elif op == 5:  # splice with another frame
            other = rng.choice(corpus)
            buf = buf[: rng.randrange(len(buf) + 1)] + bytearray(other[rng.randrange(len(other) + 1) :])
        elif op == 6:  # a big number where a small one was
            text = bytes(buf).replace(b"7", str(rng.choice((0, -1, 2**32, 2**63, 10**100))).encode(), 1)
            buf = bytearray(text)
        else:  # random bytes
            buf = bytearray(rng.randbytes(rng.randrange(0, 64)))
    return bytes(buf)


def _sides() -> list[Connection]:
    """A worker's and a client's connection, each with an open job 7 (so job frames reach the state checks),
    and both sides of a keyed connection waiting for the other's proof."""
    worker = Connection(Role.WORKER, WorkerKind.STT)
    worker.receive_text(encode_message(JobStart(job_id=7, kind=WorkerKind.STT)))
    client = Connection(Role.CLIENT)
    client.receive_text(encode_message(HELLO))
    client.send(JobStart(job_id=7, kind=WorkerKind.STT))
    keyed_worker = Connection(Role.WORKER, WorkerKind.STT, key=KEY)
    keyed_worker.send(CHALLENGED_HELLO)
    keyed_client = Connection(Role.CLIENT, key=KEY)
    keyed_client.receive_text(encode_message(CHALLENGED_HELLO))
    keyed_client.send(keyed_client.auth())
    return [worker, client, keyed_worker, keyed_client]


def run_fuzz(frames: int, seed: int, out: Path) -> dict[str, Any]:
    rng = random.Random(seed)
    inputs = corpus()
    sides = _sides()
    crashes: dict[str, dict[str, Any]] = {}
    accepted = refused = 0
    started = time.perf_counter()
    for n in range(frames):
        data = mutate(rng.choice(inputs), rng, inputs)
        if n % 5000 == 0:
            sides = _sides()  # fresh state now and then, so early jobs stay reachable
        side = sides[n % len(sides)]
        as_text = (n // len(sides)) % 2 == 0
        try:
            if as_text:
                side.receive_text(data)
            else:
                side.receive_binary(data)
            accepted += 1
        except ProtocolError:
            refused += 1
        except Exception as exc:
            key = f"{type(exc).__name__} in {'text' if as_text else 'binary'} on {side.role.value}"
            entry = crashes.setdefault(key, {"count": 0, "input_hex": data.hex(), "traceback": traceback.format_exc()})
            entry["count"] += 1
        if (n + 1) % 200_000 == 0:
            print(f"  {n + 1} frames, {len(crashes)} kinds of crash, {time.perf_counter() - started:.0f} s", flush=True)
    elapsed = time.perf_counter() - started
    report = {
        "command": "fuzz protocol",
        "frames": frames,
        "seed": seed,
        "seconds": round(elapsed, 1),
        "accepted": accepted,
        "refused": refused,
        "crashes": sum(c["count"] for c in crashes.values()),
        "crash_kinds": dict(list(crashes.items())[:MAX_REPORTED]),
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"{frames} frames in {elapsed:.0f} s: {accepted} accepted, {refused} refused with a protocol error, {report['crashes']} crashes; JSON in {out}")
    for key, entry in crashes.items():
        print(f"  CRASH x{entry['count']}: {key}: input {entry['input_hex'][:80]}...")
    return report
