"""``stream/memory.py``: glibc's heap bounded at a worker's start, and freed pages handed back."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")

PROBE = "from stream import memory; print(','.join(memory.bound_heap()), memory.trim())"


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    return subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True).stdout.strip()


def test_a_worker_fixes_the_mmap_threshold_and_the_arena_count():
    assert _probe() == "MALLOC_MMAP_THRESHOLD_,MALLOC_ARENA_MAX True"


def test_an_operators_own_malloc_settings_win():
    assert _probe(MALLOC_ARENA_MAX="4") == "MALLOC_MMAP_THRESHOLD_ True"
    assert _probe(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="1") == "True"
