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

A trim gives back only whole free pages, and a heap that big buffers came
and went in is left fragmented: after a 62 s monologue (partial and final
decodes of 2-62 s on several threads) the STT worker still held +47-100% of
its starting RSS after the trim. Two glibc settings, fixed at a worker's
start by :func:`bound_heap` (before the model loads):

- the mmap threshold, at :data:`MMAP_THRESHOLD_BYTES`: glibc serves an
  allocation from its own ``mmap`` (given back on ``free``) only above a
  threshold that it *raises* each time such a buffer is freed, up to 32 MB,
  so after the first decode every buffer of the next ones lands in a heap;
- the number of heaps (arenas), at :data:`ARENA_MAX`: by default each thread
  that allocates may get its own (up to 8 per core), and each keeps its own
  free pieces.

``edgestream attack --only monologue``, 2-vCPU AMD EPYC, 2026-12-03, STT
worker RSS before / peak / after, one run each: 181 / 825 / 419 MB (+131%)
with neither, 159 / 542 / 233 (+47%) with the threshold, and 157-161 /
434-547 / 164-214 (+4%, +16%, +36%: 3 runs) with both; not always back
within 10% (what is left is not found yet). Decoding time, 128 short
utterances: 152-158 ms at the median either way (a 1 MB threshold cost
15-30%: a page fault per 4 KB of every buffer on every use).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Awaitable, Callable

log = logging.getLogger("edgestream")


def _glibc(function: str):
    """``function`` of the C library, or ``None`` where it has none (musl, macOS)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), function)
    except (OSError, AttributeError):
        return None


_TRIM = _glibc("malloc_trim")

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
"""``mallopt`` parameter numbers (glibc's ``malloc.h``)."""
MMAP_THRESHOLD_BYTES = 4 << 20
"""Allocations of this size or more get their own mapping, given back on ``free``."""
ARENA_MAX = 2
"""Heaps shared by all of a process's threads."""


def bound_heap(mmap_threshold: int = MMAP_THRESHOLD_BYTES, arena_max: int = ARENA_MAX) -> list[str]:
    """Fix glibc's mmap threshold and arena count (call before loading a model); the settings made.

    An operator's own ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_ARENA_MAX`` wins;
    on a C library without ``mallopt`` nothing happens.
    """
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return []
    made = []
    for name, parameter, value in (("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, mmap_threshold), ("MALLOC_ARENA_MAX", M_ARENA_MAX, arena_max)):
        if name not in os.environ and mallopt(parameter, value):
            made.append(name)
    return made


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

    def soon(self, after: Callable[[], Awaitable[None]] | None = None) -> None:
        """Trim in a thread, once ``after()`` (work still running that frees memory when done) returns."""
        if _TRIM is None or (self._running is not None and not self._running.done()):
            return
        self._running = asyncio.get_running_loop().create_task(self._trim(after), name="malloc_trim")

    @staticmethod
    async def _trim(after: Callable[[], Awaitable[None]] | None) -> bool:
        if after is not None:
            await after()
        return await asyncio.to_thread(trim)

    async def close(self) -> None:
        if self._running is not None:
            await asyncio.gather(self._running, return_exceptions=True)
