"""A far link for tests and benchmarks: a TCP relay that holds every chunk for a while in each direction.

Kernels without ``netem`` cannot add propagation delay, so it is made here (a
stand-in for distance). ``--delay-ms 20`` adds 40 ms to every round trip.

    python -m gateway.harness.delay_relay --listen 198.18.7.4:8701 --target 198.18.7.4:8702 --delay-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=1024)

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(deliver())
    try:
        while data := await reader.read(65536):
            await queue.put((time.monotonic() + delay_s, data))
        await queue.put((0.0, b""))
        await sender
    finally:
        sender.cancel()
        with contextlib.suppress(Exception):
            writer.close()


async def start_relay(listen_host: str, listen_port: int, target_host: str, target_port: int, delay_s: float) -> asyncio.Server:
    """Listen on ``listen_host:listen_port`` (0: any port) and relay each connection to the target, delayed."""

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(target_host, int(target_port))
        except OSError:
            client_writer.close()
            return
        with contextlib.suppress(asyncio.CancelledError):  # the relay is shutting down
            await asyncio.gather(pump(client_reader, server_writer, delay_s), pump(server_reader, client_writer, delay_s), return_exceptions=True)

    return await asyncio.start_server(relay, listen_host, listen_port)


async def main(listen: str, target: str, delay_s: float) -> None:
    host, port = listen.rsplit(":", 1)
    target_host, target_port = target.rsplit(":", 1)
    server = await start_relay(host, int(port), target_host, int(target_port), delay_s)
    print(f"relay {listen} -> {target} holding {delay_s * 1000:g} ms each way", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    args = parser.parse_args()
    asyncio.run(main(args.listen, args.target, args.delay_ms / 1000))
