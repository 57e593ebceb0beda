"""Give freed memory back to the system when a worker goes idle (or a gateway session ends).

Models allocate large working buffers from several threads: a 30 s
utterance decoded on four Whisper replicas at once takes the STT worker from
~430 MB to ~960 MB. glibc frees those buffers into its per-thread arenas and
keeps them, so the RSS stays at its peak for the process's life (measured:
+570 MB after one 62 s monologue). ``malloc_trim(0)`` hands the free pages
back (~20 ms for a 1 GB heap, in a thread). It runs each time a worker has
no job left, and when a gateway session ends (a camera sending 12 MP frames
leaves the gateway's decoder threads' arenas ~130 MB bigger), at most one at
a time; on a C library without it, nothing happens.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging

log = logging.getLogger("edgestream")


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim with
        return None


_TRIM = _malloc_trim()


def trim() -> bool:
    """Return free heap pages to the system (blocking); whether anything could be done."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


class IdleTrim:
    """Runs :func:`trim` in a thread when asked to, unless one is already running."""

    def __init__(self) -> None:
        self._running: asyncio.Task[bool] | None = None

    def soon(self) -> None:
        if _TRIM is None or (self._running is not None and not self._running.done()):
            return
        self._running = asyncio.get_running_loop().create_task(asyncio.to_thread(trim), name="malloc_trim")

    async def close(self) -> None:
        if self._running is not None:
            await asyncio.gather(self._running, return_exceptions=True)
