"""``edgestream up``: the whole system on one box.

The gateway and each worker run in their own process (``edgestream gateway``,
``edgestream worker KIND``), so models compute in parallel and one crash does
not take the others down. Their output is prefixed with the name; Ctrl-C
stops them all.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from stream.config import Config
from stream.protocol import WorkerKind
from stream.running import until_signalled


async def _relay(name: str, stream: asyncio.StreamReader) -> None:
    while line := await stream.readline():
        sys.stdout.write(f"[{name:>7}] {line.decode(errors='replace')}")
        sys.stdout.flush()


async def run_system(config: Config, config_path: Path | None) -> int:
    processes: dict[str, asyncio.subprocess.Process] = {}
    relays = []
    for name in ["gateway", *(kind.value for kind in WorkerKind)]:
        args = [sys.executable, "-m", "gateway"] + (["gateway"] if name == "gateway" else ["worker", name])
        if config_path is not None:
            args += ["--config", str(config_path)]
        process = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        processes[name] = process
        relays.append(asyncio.create_task(_relay(name, process.stdout)))
    exits = {name: asyncio.create_task(p.wait()) for name, p in processes.items()}
    stopper = asyncio.create_task(until_signalled())
    done, _ = await asyncio.wait([stopper, *exits.values()], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    for name, task in exits.items():
        if task in done:
            print(f"edgestream up: {name} exited with {task.result()}; stopping the others", flush=True)
            code = 1
    for process in processes.values():
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    await asyncio.gather(*(p.wait() for p in processes.values()))
    await asyncio.gather(*relays, return_exceptions=True)
    return code
