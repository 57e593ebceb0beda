"""How every edgestream process runs: its main coroutine on uvloop, until SIGINT or SIGTERM.

Written once for the gateway, each worker, ``up`` and the harnesses' client processes.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """Run ``main`` to its end on uvloop (asyncio's own loop where uvloop is not installed, as on Windows)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def until_signalled() -> None:
    """Return when the process gets SIGINT (Ctrl-C) or SIGTERM (a service manager's stop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
