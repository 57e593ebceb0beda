"""``edgestream probe``: one job against one worker, printed as it streams."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .audio import read_wav, resample, write_wav
from .protocol import MediaFormat, WorkerKind
from .protocol.jobs import STT_SAMPLE_RATE, TtsResult
from .worker_client import JobFailed, SpeechChunk, WorkerClient


def _read_input(kind: WorkerKind, argument: str) -> tuple[np.ndarray, int] | bytes | None:
    """The file a probe sends (STT: audio, vision: an image), read before any connection; raises ValueError."""
    if kind is WorkerKind.STT:
        return read_wav(argument)
    if kind is WorkerKind.VISION:
        try:
            data = Path(argument).read_bytes()
        except OSError as exc:
            raise ValueError(f"{argument}: {exc.strerror or exc}") from None
        if not (data[:4] == b"\x89PNG" or data[:3] == b"\xff\xd8\xff"):
            raise ValueError(f"{argument}: not a PNG or JPEG image")
        return data
    return None


async def run_probe(kind: WorkerKind, argument: str, url: str, out: Path | None) -> int:
    try:
        data = _read_input(kind, argument)
    except ValueError as exc:  # AudioFileError too
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        client = await WorkerClient.connect(url, kind)
    except (OSError, TimeoutError) as exc:
        print(f"error: cannot reach the {kind.value} worker at {url}: {exc}", file=sys.stderr)
        return 1
    hello = client.hello
    print(f"{hello.worker_id}: {hello.model_id} (sha256 {hello.model_sha256[:12]}...), capacity {hello.capacity}")
    started = time.perf_counter()
    try:
        async with client:
            if kind is WorkerKind.STT:
                assert isinstance(data, tuple)
                samples, rate = data
                async for result in client.transcribe(resample(samples, rate, STT_SAMPLE_RATE), pace=True):
                    print(f"{time.perf_counter() - started:6.2f}s {'final  ' if result.final else 'partial'} {result.text}")
            elif kind is WorkerKind.LLM:
                async for piece in client.chat([{"role": "user", "content": argument}]):
                    print(piece, end="", flush=True)
                print(f"\n({time.perf_counter() - started:.2f}s)")
            elif kind is WorkerKind.TTS:
                chunks = []
                async for item in client.synthesize(argument):
                    if isinstance(item, SpeechChunk):
                        chunks.append(item)
                    elif isinstance(item, TtsResult):
                        print(f"{time.perf_counter() - started:6.2f}s {item.audio_s:5.2f}s of audio: {item.clause}")
                if out is not None and chunks:
                    write_wav(out, np.concatenate([c.pcm for c in chunks]), chunks[0].sample_rate)
                    print(f"wrote {out}")
            else:
                assert isinstance(data, bytes)
                fmt = MediaFormat.PNG if data[:4] == b"\x89PNG" else MediaFormat.JPEG
                result = await client.analyze_image(data, fmt)
                for line in result.lines:
                    print(f"{line.score:.2f} {line.text}")
                if result.description:
                    print(f"description: {result.description}")
                print(f"({time.perf_counter() - started:.2f}s)")
    except JobFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
