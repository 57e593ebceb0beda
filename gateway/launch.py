"""``edgestream gateway``: the gateway, one process under uvloop, or several on one port (``gateway/processes.py``)."""

from __future__ import annotations

from stream import logs
from stream.config import Config
from stream.running import run, until_signalled


def print_listening(config: Config, port: int, processes: str = "") -> None:
    """The lines that say where the gateway listens and what it uses (``processes``: a line about them)."""
    settings, security = config.gateway, config.security
    web, ws = ("https", "wss") if security.tls_cert else ("http", "ws")
    host = settings.host
    print(f"edgestream gateway listening on {web}://{host}:{port}/ (signaling {ws}://{host}:{port}/session)", flush=True)
    if processes:
        print(f"  {processes}", flush=True)
    print(f"  clients: {'a token from ' + security.client_tokens_file if security.client_tokens_file else 'no token needed (loopback only)'}", flush=True)
    print(f"  worker links: {'authenticated with ' + security.worker_key_file if security.worker_key_file else 'not authenticated'}", flush=True)
    for kind, urls in config.worker_urls().items():
        print(f"  {kind.value} workers: {', '.join(urls)}", flush=True)
    if settings.discover:
        print("  and workers announced by mDNS (_edgestream._tcp)", flush=True)


async def serve_gateway(config: Config) -> None:
    from .server import Gateway

    gateway = Gateway(config.gateway, config.worker_urls(), config.security)
    print_listening(config, await gateway.start())
    await until_signalled()
    print("edgestream gateway: stopping", flush=True)
    await gateway.close()


def run_gateway(config: Config) -> int:
    """Run the gateway until a signal; its exit status."""
    logs.configure(config.log.format, config.log.level)
    count = config.gateway.process_count()
    if count == 1:
        run(serve_gateway(config))
        return 0
    from .processes import run_processes

    return run(run_processes(config, count))
