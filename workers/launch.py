"""Starting a worker: load its model (with progress), then serve it under uvloop."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

from stream import keys, logs, memory, tls
from stream.config import (
    ExposureError,
    LlmSettings,
    LogSettings,
    SecuritySettings,
    SttSettings,
    TtsSettings,
    VisionSettings,
    WorkerSettings,
    is_loopback,
)
from stream.ports import check_can_listen
from stream.protocol import WorkerKind
from stream.running import run, until_signalled

from .engine import Engine
from .model_files import ModelFile, resolve_model
from .server import WorkerServer

log = logging.getLogger("edgestream.worker")


class ModelLoadError(RuntimeError):
    """The model file is there but its library cannot load it (corrupt, truncated, the wrong kind of file)."""


def load_engine(kind: WorkerKind, settings: WorkerSettings, model: ModelFile | None = None) -> Engine:
    """Build the engine of ``kind`` (imports only that kind's model library)."""
    model = model or resolve_model(kind, settings.model)
    if kind is WorkerKind.STT:
        from .stt import SttEngine

        assert isinstance(settings, SttSettings), settings
        return SttEngine(model, settings)
    if kind is WorkerKind.LLM:
        from .llm import LlmEngine

        assert isinstance(settings, LlmSettings), settings
        return LlmEngine(model, settings)
    if kind is WorkerKind.TTS:
        from .tts import TtsEngine

        assert isinstance(settings, TtsSettings), settings
        return TtsEngine(model, settings)
    from .vision import VisionEngine

    assert isinstance(settings, VisionSettings), settings
    return VisionEngine(model, settings)


def _load_with_progress(kind: WorkerKind, settings: WorkerSettings) -> Engine:
    model = resolve_model(kind, settings.model)
    print(f"edgestream {kind.value} worker: loading {model.model_id} from {model.path}", flush=True)
    done = threading.Event()

    def tick() -> None:
        started = time.monotonic()
        while not done.wait(1.0):
            print(f"  ... loading ({time.monotonic() - started:.0f} s)", flush=True)

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    started = time.monotonic()
    try:
        engine = load_engine(kind, settings, model)
    except (ValueError, RuntimeError, OSError) as exc:  # what the model libraries raise for a file they cannot read
        log.debug("loading %s failed", model.path, exc_info=True)
        detail = str(exc).splitlines()[0] if str(exc) else "no detail"
        raise ModelLoadError(f"cannot load {model.path} as the {kind.value} model ({type(exc).__name__}: {detail})") from exc
    finally:
        done.set()
    print(f"  loaded in {time.monotonic() - started:.1f} s", flush=True)
    return engine


def load_worker_key(security: SecuritySettings) -> bytes | None:
    """The key shared with gateways, or ``None`` when none is configured; a readable-by-others file is warned about."""
    if not security.worker_key_file:
        return None
    key = keys.load_key(security.worker_key_file)
    if not keys.is_private(security.worker_key_file):
        log.warning("%s can be read by other users of this box; chmod 600 it", security.worker_key_file)
    return key


def warn_if_oversubscribed(kind: WorkerKind, settings: WorkerSettings, cores: int | None = None) -> bool:
    """Warn when ``capacity`` jobs of ``threads`` threads each are more threads than the box has cores.

    llama.cpp's threads (and CTranslate2's, onnxruntime's) wait for each other
    by spinning: oversubscribed, each waits on a peer the kernel has
    descheduled. Measured on a 2-vCPU box: two concurrent LLM answers with 2
    threads each took 216-310 s instead of 2.7 s (one thread each).
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = settings.capacity * settings.threads
    if wanted <= cores:
        return False
    log.warning(
        "%s worker: capacity %d x threads %d = %d threads on %d cores: jobs running at once will spin-wait for each "
        "other and run many times slower; set threads to %d or less",
        kind.value,
        settings.capacity,
        settings.threads,
        wanted,
        cores,
        max(1, cores // settings.capacity),
    )
    return True


async def serve_worker(kind: WorkerKind, settings: WorkerSettings, security: SecuritySettings = SecuritySettings()) -> None:
    key = load_worker_key(security)  # before the model: a bad key file fails at once
    if key is None and not is_loopback(settings.host):
        raise ExposureError(
            f"listening on {settings.host} lets anyone on the network run jobs on this worker: set [security] "
            "worker_key_file (create it with `edgestream keys worker PATH`, the same file on the gateway), or listen on 127.0.0.1"
        )
    ssl_context = tls.server_context(security.tls_cert, security.tls_key) if security.tls_cert else None
    wyoming_address = _wyoming_address(kind, settings)
    warn_if_oversubscribed(kind, settings)
    check_can_listen(settings.host, settings.port, f"{kind.value} worker")  # before a model that takes seconds to load
    if wyoming_address is not None:
        check_can_listen(*wyoming_address, f"{kind.value} worker's Wyoming listener")
    engine = await asyncio.to_thread(_load_with_progress, kind, settings)
    server = WorkerServer(
        engine,
        capacity=settings.capacity,
        max_queue=settings.max_queue,
        worker_id=settings.worker_id,
        report_interval_s=settings.report_interval_s,
        key=key,
        idle_input_s=settings.idle_input_s,
    )
    port = await server.start(settings.host, settings.port, ssl_context)
    scheme = "wss" if ssl_context else "ws"
    print(
        f"edgestream {kind.value} worker {server.worker_id} listening on {scheme}://{settings.host}:{port}\n"
        f"  model {engine.model.model_id} sha256 {engine.model.sha256}\n"
        f"  capacity {settings.capacity}, threads {settings.threads}\n"
        f"  clients {'must prove the key in ' + security.worker_key_file if key else 'are not authenticated (no worker_key_file)'}",
        flush=True,
    )
    wyoming = None
    wyoming_port = None
    if wyoming_address is not None:
        from .wyoming_server import WyomingListener

        wyoming = WyomingListener(server)
        wyoming_port = await wyoming.start(*wyoming_address)
        print(f"  Wyoming (Home Assistant) on tcp://{wyoming_address[0]}:{wyoming_port}, no authentication", flush=True)
    announcer = None
    if settings.announce:
        from .announce import Announcer

        host, announced_port = settings.host, port
        if settings.announce_address:
            host, _, text = settings.announce_address.rpartition(":")
            announced_port = int(text)
        announcer = Announcer(server, host, announced_port, tls=ssl_context is not None, wyoming_port=wyoming_port)
        await announcer.start()
        print(f"  announced by mDNS as {', '.join(announcer.addresses)} port {announced_port}", flush=True)
    await until_signalled()
    print(f"edgestream {kind.value} worker: stopping", flush=True)
    if announcer is not None:
        await announcer.close()
    if wyoming is not None:
        await wyoming.close()
    await server.close()
    engine.close()


def _wyoming_address(kind: WorkerKind, settings: WorkerSettings) -> tuple[str, int] | None:
    """Where the Wyoming listener goes (``None``: nowhere); a non-loopback one needs ``wyoming_open``."""
    if not settings.wyoming:
        return None
    if kind not in (WorkerKind.STT, WorkerKind.TTS):
        raise ExposureError(f"wyoming: only stt and tts workers speak Wyoming, not {kind.value}")
    host, _, port = settings.wyoming.rpartition(":")
    if not is_loopback(host) and not settings.wyoming_open:
        raise ExposureError(
            f"wyoming: listening on {host} lets anyone on the network run jobs (Wyoming has no authentication): "
            "set wyoming_open = true (--wyoming-open) to mean it, or listen on 127.0.0.1"
        )
    return host, int(port)


def run_worker(kind: WorkerKind, settings: WorkerSettings, log_settings: LogSettings = LogSettings(), security: SecuritySettings = SecuritySettings()) -> None:
    """The body of ``edgestream worker KIND``."""
    logs.configure(log_settings.format, log_settings.level)
    memory.bound_heap()  # before the model and its threads (stream/memory.py)
    run(serve_worker(kind, settings, security))
