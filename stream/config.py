"""edgestream's TOML configuration, validated at load.

A bad file fails with :class:`ConfigError`, whose message names the file, the
key and the problem (``configs/x.toml: workers.stt.capacity: Input should be
greater than or equal to 1``), so an operator can fix it without reading code.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from stream.protocol import WorkerKind

CONFIG_DIR = Path(str(resources.files("stream") / "configs")).resolve()
"""The default configs: package data (``stream/configs`` links to the repository's ``configs/``)."""
DEFAULT_CONFIG = CONFIG_DIR / "one-box.toml"

Port = Annotated[int, Field(ge=0, le=65535)]
Threads = Annotated[int, Field(ge=1, le=256)]


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkerSettings(_Section):
    """Settings every worker kind shares."""

    host: str = "127.0.0.1"
    port: Port = 0
    """0 picks a free port (printed at start)."""
    model: str = ""
    """Path of the model file (STT: the CTranslate2 directory); empty for the embedded default."""
    capacity: Annotated[int, Field(ge=1, le=64)] = 2
    """Jobs run at once; one more is refused with ``busy`` unless it fits the queue."""
    max_queue: Annotated[int, Field(ge=0, le=1024)] = 0
    """Jobs that may wait for a free slot before ``busy`` is answered."""
    threads: Threads = 2
    """CPU threads the model may use per job."""
    report_interval_s: Annotated[float, Field(gt=0, le=3600)] = 1.0
    """How often a load report is pushed to each connected client."""
    idle_input_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    """A job that waits this long for its next input (audio, text) fails with ``limit``: a
    client that opens jobs and goes quiet cannot hold the worker's slots."""
    worker_id: str = ""
    """Name in hello and logs; empty for ``KIND@HOST:PORT``."""
    announce: StrictBool = False
    """Announce this worker on the LAN by mDNS (``_edgestream._tcp``) so gateways find it."""
    announce_address: str = ""
    """``HOST:PORT`` to announce instead of the bound address (behind a port forward or a relay)."""
    wyoming: str = ""
    """``HOST:PORT`` to serve the Wyoming protocol on too (STT and TTS workers: Home Assistant); empty: not."""
    wyoming_open: StrictBool = False
    """Let the Wyoming listener take a non-loopback address: Wyoming has no authentication,
    so anyone who reaches it can run jobs (as Home Assistant's own Wyoming servers allow)."""

    @field_validator("announce_address", "wyoming")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected HOST:PORT, got {value!r}")
        return value


class SttSettings(WorkerSettings):
    port: Port = 8701
    compute_type: str = "int8"
    max_utterance_s: Annotated[float, Field(gt=0, le=600)] = 60.0
    partial_interval_s: Annotated[float, Field(gt=0, le=10)] = 0.5


class LlmSettings(WorkerSettings):
    port: Port = 8702
    n_ctx: Annotated[int, Field(ge=256, le=262144)] = 2048
    system_prompt: str = "You are a helpful voice assistant. Answer in one or two short sentences."
    chat_format: str = ""
    """llama.cpp chat format name; empty uses the template inside the GGUF."""


class TtsSettings(WorkerSettings):
    port: Port = 8703
    config_path: str = ""
    """The voice's .onnx.json; empty for ``MODEL.json`` beside the model."""
    max_text_chars: Annotated[int, Field(ge=1, le=1_000_000)] = 20_000


class VisionSettings(WorkerSettings):
    port: Port = 8704
    capacity: Annotated[int, Field(ge=1, le=64)] = 1
    mmproj: str = ""
    """A llama.cpp multimodal projector (GGUF); with ``vlm_model`` it enables descriptions."""
    vlm_model: str = ""
    """A llama.cpp vision-language model (GGUF) used with ``mmproj``."""


class WorkersConfig(_Section):
    stt: SttSettings = SttSettings()
    llm: LlmSettings = LlmSettings()
    tts: TtsSettings = TtsSettings()
    vision: VisionSettings = VisionSettings()

    def for_kind(self, kind: WorkerKind) -> WorkerSettings:
        return getattr(self, kind.value)


class GatewaySettings(_Section):
    host: str = "127.0.0.1"
    port: Port = 8080
    workers: dict[WorkerKind, list[str]] = {}
    """Worker URLs by kind; a kind left out uses ``[workers.KIND]`` of this file (one box)."""
    loopback_ice: StrictBool = False
    """Offer 127.0.0.1 as an ICE candidate: for tests on machines with only loopback."""
    ice_timeout_s: Annotated[float, Field(gt=0, le=120)] = 15.0
    processes: Annotated[int, Field(ge=0, le=256)] = 0
    """Gateway processes serving its one port, sessions spread over them (``gateway/processes.py``):
    one core each; 0 is one per core this process may run on. Each holds its own worker links
    and about 150 MB; the session limits below are the whole gateway's."""
    max_sessions: Annotated[int, Field(ge=1, le=10_000)] = 16
    max_sessions_per_client: Annotated[int, Field(ge=1, le=10_000)] = 4
    """Sessions one client may hold at once: per token, or per address where no token is needed."""
    max_pending_signaling: Annotated[int, Field(ge=1, le=100_000)] = 64
    """Signaling connections open without an offer yet, in all (more are refused at the
    handshake with HTTP 503): each holds a socket and a task for up to 10 s."""
    max_pending_signaling_per_address: Annotated[int, Field(ge=1, le=100_000)] = 8
    """The same, from one address: one host cannot take every socket the gateway has."""
    offers_per_minute: Annotated[float, Field(gt=0, le=100_000)] = 30
    """Offers one client (token, or address) may make a minute, in bursts of as many (more are
    refused with ``rate_limited`` before anything parses them): an offer costs ~1-5 ms of the
    event loop and a peer connection being set up."""
    max_video_pixels: Annotated[int, Field(ge=64 * 64, le=3840 * 2160)] = 1920 * 1080
    """Decoded camera frames larger than this are dropped, counted and reported once
    (``video_too_large``): a 12000x8000 frame holds 144 MB and takes seconds to encode for vision.
    At most a 4K frame, the most the vision worker takes."""
    max_media_sections: Annotated[int, Field(ge=2, le=64)] = 4
    """Media sections (``m=`` lines) an offer may have, counted before aiortc parses it: each
    costs a decoder thread and ~1 ms of the event loop to parse (audio, video, data: 3)."""
    max_utterance_s: Annotated[float, Field(ge=1, le=600)] = 30.0
    """A turn that goes on this long is ended here and answered; the client is told (``utterance_too_long``)."""
    end_silence_ms: Annotated[float, Field(ge=64, le=5000)] = 320
    """Silence after speech that ends a turn."""
    speculate_after_ms: Annotated[float, Field(ge=0, le=5000)] = 128
    """Silence after which the answer is prepared speculatively (held back until the
    end of the turn is confirmed, dropped if speech resumes); 0 turns this off."""
    max_answer_tokens: Annotated[int, Field(ge=1, le=4096)] = 96
    prefill_while_speaking: StrictBool = True
    """Have the LLM worker evaluate the question from its partial transcripts while it is
    spoken, so the answer's first token waits only for the last words."""
    first_piece_words: Annotated[int, Field(ge=1, le=64)] = 2
    """The first piece of an answer's speech ends at the first punctuation or after this
    many words, whichever comes first (``gateway/clauses.py``): speech starts after a handful of
    tokens. Chosen on ``bench voice`` (README, *Voice to voice*): on the 2-vCPU AMD EPYC, 2 words
    put the first audio 115 ms after the first token against 142-153 ms for 3, and no answer's
    audio ran out before its end with either (the next piece is ready before the first has played)."""
    max_history_turns: Annotated[int, Field(ge=0, le=1000)] = 8
    system_prompt: str = "You are a helpful voice assistant. Answer in one or two short sentences."
    vision_on_turn: StrictBool = True
    """OCR the latest camera frame when the person starts speaking (ready by the end of the turn)."""
    vision_interval_s: Annotated[float, Field(ge=0, le=3600)] = 0.0
    """Also OCR the latest frame every this many seconds (0: only at turns)."""
    ice_servers: list[str] = []
    """STUN/TURN URLs on your network for the gateway's ICE (none by default: nothing leaves the LAN)."""
    selection: Literal["latency-aware", "round-robin", "least-loaded"] = "latency-aware"
    """How a job's worker is chosen (``gateway/selection.py``)."""
    job_deadline_s: Annotated[float, Field(gt=0, le=120)] = 5.0
    """A worker that gives a job no first result (final transcript, token, audio) within this is stalled: the job moves."""
    busy_wait_s: Annotated[float, Field(gt=0, le=300)] = 30.0
    """A job every worker refuses as full (``busy``) waits this long for room, the longest
    waiting first, before its turn fails; the client hears ``waiting`` meanwhile."""
    max_waiting_jobs: Annotated[int, Field(ge=1, le=100_000)] = 64
    """Jobs of one kind that may wait for room at once; more fail at once with ``busy``
    (each keeps its turn's audio or text, at most ``max_utterance_s`` of audio: ~1 MB)."""
    discover: StrictBool = False
    """Also use workers announced on the LAN by mDNS (``_edgestream._tcp``), besides ``workers``."""
    discover_interfaces: list[str] = []
    """Addresses of the interfaces to browse on; empty for all."""
    required_kinds: list[WorkerKind] = [WorkerKind.STT, WorkerKind.LLM, WorkerKind.TTS]
    """Kinds without which ``/readyz`` says not ready (a turn needs them; vision only adds context)."""

    def share_of(self, processes: int) -> GatewaySettings:
        """What one of ``processes`` gateway processes enforces of the per-connection limits.

        ``max_pending_signaling`` (and per address) and ``offers_per_minute`` are checked
        where the connection lands, before any session exists to ask the supervisor about:
        each process holds its share (the limit divided by ``processes``, at least 1), so the
        gateway as a whole holds no more than the limit. A client whose connections the
        kernel happens to hash onto one process meets its share there first.
        """
        if processes <= 1:
            return self
        return self.model_copy(
            update={
                "max_pending_signaling": max(1, self.max_pending_signaling // processes),
                "max_pending_signaling_per_address": max(1, self.max_pending_signaling_per_address // processes),
                "offers_per_minute": self.offers_per_minute / processes,
            }
        )

    def process_count(self) -> int:
        """How many gateway processes ``processes`` means on this machine."""
        if self.processes:
            return self.processes
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return os.cpu_count() or 1


class SecuritySettings(_Section):
    """Who may connect to what (README, "Security"). Paths are read at start."""

    worker_key_file: str = ""
    """Key shared by the gateway and its workers (``edgestream keys worker FILE``): each proves
    to the other that it holds it on every worker link. Empty: worker links are not authenticated."""
    client_tokens_file: str = ""
    """Tokens a client must present to open a session (``edgestream token create NAME``).
    Required when the gateway listens on any address but loopback."""
    tls_cert: str = ""
    """This process's certificate (PEM; ``edgestream cert create DIR``): the gateway serves
    https/wss, a worker wss, and worker URLs of this file become ``wss://``."""
    tls_key: str = ""
    """The private key of ``tls_cert`` (PEM)."""
    tls_ca: str = ""
    """Certificates trusted for ``wss://`` worker links (on a LAN: the self-signed
    certificate itself); empty: the system's CAs."""

    @model_validator(mode="after")
    def _cert_with_key(self) -> SecuritySettings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        return self


class ExposureError(ValueError):
    """A server (gateway or worker) would listen beyond this box with nothing to keep strangers out."""


def check_gateway_exposure(host: str, has_client_tokens: bool) -> None:
    """Raise :class:`ExposureError` if a gateway on ``host`` would let anyone on the network in."""
    if not has_client_tokens and not is_loopback(host):
        raise ExposureError(
            f"listening on {host} lets anyone on the network in: set [security] client_tokens_file "
            "(create tokens with `edgestream token create NAME`), or listen on 127.0.0.1"
        )


def connect_address(host: str) -> str:
    """Where this box reaches a server bound to ``host``: loopback for a wildcard address."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) can only be reached from this box."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LogSettings(_Section):
    format: Literal["text", "json"] = "text"
    """``json``: one object per line with ``session``, ``turn`` and ``job`` ids (``stream/logs.py``)."""
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Section):
    gateway: GatewaySettings = GatewaySettings()
    workers: WorkersConfig = WorkersConfig()
    security: SecuritySettings = SecuritySettings()
    log: LogSettings = LogSettings()

    def worker_urls(self) -> dict[WorkerKind, list[str]]:
        """Where the gateway finds each kind: ``[gateway.workers]``, else this box's workers.

        With ``discover`` on, a kind left out of ``[gateway.workers]`` has no
        static URL: mDNS finds its workers.
        """
        urls = {}
        scheme = "wss" if self.security.tls_cert else "ws"
        for kind in WorkerKind:
            configured = self.gateway.workers.get(kind)
            if configured:
                urls[kind] = list(configured)
            elif self.gateway.discover:
                continue
            else:
                settings = self.workers.for_kind(kind)
                urls[kind] = [f"{scheme}://{connect_address(settings.host)}:{settings.port}"]
        return urls


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate a config file; ``None`` loads the one-box default."""
    if path is None:
        if not DEFAULT_CONFIG.exists():  # an install without the source tree
            return Config()
        path = DEFAULT_CONFIG
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_config(raw, source=str(path))


def parse_config(raw: dict, source: str = "<config>") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            key = ".".join(str(part) for part in err["loc"])
            got = f" (got {err['input']!r})" if err["type"] != "extra_forbidden" and not isinstance(err["input"], dict) else ""
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{source}: {key}: {msg}{got}")
        raise ConfigError("\n".join(problems)) from None
