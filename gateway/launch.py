"""``edgestream gateway``: the gateway, one process under uvloop, or several on one port (``gateway/processes.py``)."""

from __future__ import annotations

from stream import logs
from stream.config import Config
from stream.running import run, until_signalled

from .server import Gateway


async def serve_gateway(config: Config) -> None:
    settings = config.gateway
    gateway = Gateway(settings, config.worker_urls(), config.security)
    port = await gateway.start()
    host = settings.host
    web, ws = ("https", "wss") if gateway.ssl_context else ("http", "ws")
    print(f"edgestream gateway listening on {web}://{host}:{port}/ (signaling {ws}://{host}:{port}/session)", flush=True)
    security = config.security
    print(f"  clients: {'a token from ' + security.client_tokens_file if gateway.tokens else 'no token needed (loopback only)'}", flush=True)
    print(f"  worker links: {'authenticated with ' + security.worker_key_file if gateway.pool.key else 'not authenticated'}", flush=True)
    for kind, urls in config.worker_urls().items():
        print(f"  {kind.value} workers: {', '.join(urls)}", flush=True)
    if settings.discover:
        print("  and workers announced by mDNS (_edgestream._tcp)", flush=True)
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
