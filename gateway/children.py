"""Supervised child processes: started, their output relayed with a prefix, stopped, restarted with backoff.

Written once for ``edgestream up`` (the gateway and one worker of each kind,
``gateway/up.py``) and for a gateway of several processes
(``gateway/processes.py``). When to restart is ``gateway/restarts.py``'s
policy; this is the I/O around it. A child gets SIGTERM from the kernel if
its supervisor dies, even by SIGKILL (Linux), so no process is left holding
its port and memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .restarts import Restarts

STOP_S = 15.0
"""How long a process may take to stop after SIGTERM before it is killed."""
PR_SET_PDEATHSIG = 1
RELAY_DRAIN_S = 2.0
"""How long the last lines of a process that exited are waited for."""
RESTART_RETRY_S = 10.0


@dataclass(eq=False)
class Child:
    """One supervised process: its command, the running process, and its exits."""

    name: str
    args: list[str]
    label: str = ""
    """How the supervisor's lines name it ("the tts worker"); ``name`` prefixes its output."""
    env: dict[str, str] | None = None
    """Its environment (``None``: the supervisor's)."""
    say: Callable[[str], None] = print
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: Restarts = field(default_factory=Restarts)
    relay: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.label = self.label or self.name

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            env=self.env,
        )
        self.started_at = time.monotonic()
        assert self.process.stdout is not None
        self.relay = asyncio.create_task(_relay(self.name, self.process.stdout))

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_S)
        except TimeoutError:
            self.say(f"the {self.label} did not stop within {STOP_S:g} s; killing it")
            process.kill()
            await process.wait()


def _die_with_parent() -> None:
    """In the child, before it runs: get SIGTERM when the supervisor dies (Linux). Elsewhere:
    nothing (a clean stop still stops them)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def _relay(name: str, stream: asyncio.StreamReader) -> None:
    while line := await stream.readline():
        sys.stdout.write(f"[{name:>7}] {line.decode(errors='replace')}")
        sys.stdout.flush()


async def stop_all(kids: list[Child]) -> None:
    """SIGTERM every child, wait for each (killing what outstays ``STOP_S``) and for its last lines."""
    await asyncio.gather(*(child.stop() for child in kids), return_exceptions=True)
    await asyncio.gather(*(child.relay for child in kids if child.relay is not None), return_exceptions=True)


async def supervise(
    kids: list[Child],
    stopper: asyncio.Task[None],
    essential: Callable[[Child], bool],
    on_exit: Callable[[Child], None] = lambda child: None,
) -> int:
    """Restart what exits, until a signal (0) or an ``essential`` child that cannot be kept running (1).

    ``on_exit`` is told of each exit before anything else is done about it.
    """
    exits: dict[asyncio.Task[int], Child] = {}
    restarts: dict[asyncio.Task[None], Child] = {}

    def watch(child: Child) -> None:
        assert child.process is not None
        exits[asyncio.create_task(child.process.wait())] = child

    for child in kids:
        watch(child)
    while True:
        done, _ = await asyncio.wait([stopper, *exits, *restarts], return_when=asyncio.FIRST_COMPLETED)
        if stopper in done:
            for task in [*exits, *restarts]:
                task.cancel()
            return 0
        for task in done:
            if task in restarts:
                child = restarts.pop(task)
                try:
                    await child.start()
                except OSError as exc:  # no memory, no such executable any more: try again later
                    child.say(f"the {child.label} could not be started again: {exc}; trying again in {RESTART_RETRY_S:g} s")
                    restarts[asyncio.create_task(asyncio.sleep(RESTART_RETRY_S))] = child
                    continue
                assert child.process is not None
                child.say(f"the {child.label} started again (pid {child.process.pid}, restart {child.restarts.restarts})")
                watch(child)
                continue
            child = exits.pop(task)
            status = task.result()
            on_exit(child)
            if child.relay is not None:
                # Its last lines first; but a grandchild that kept its stdout open must not stall the supervisor.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(child.relay), RELAY_DRAIN_S)
            delay = child.restarts.after_exit(status, time.monotonic() - child.started_at)
            if delay is None:
                child.say(f"the {child.label} exited with {status}; not restarting it: {child.restarts.why_not(status)}")
                if essential(child):
                    return 1
                continue
            child.say(f"the {child.label} exited with {status}; starting it again in {delay:.1f} s")
            restarts[asyncio.create_task(asyncio.sleep(delay))] = child
