"""The ``edgestream`` command (typer): workers, the whole system, probes, benchmarks."""

from __future__ import annotations

import asyncio
import sys
import traceback
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from pydantic import BaseModel, ValidationError

from stream.config import ConfigError, ExposureError, load_config
from stream.ports import PortInUse
from stream.protocol import WorkerKind

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Real-time multimodal conversation at the edge. Start with: edgestream up",
)
START, TRY, OPERATE, MEASURE = "Start", "Try it", "Operate", "Test and measure"
_debug = False
"""``--debug``: an ordinary mistake prints its traceback too."""


def fail(message: str, code: int = 1) -> typer.Exit:
    """One line on stderr for an ordinary mistake (the traceback too with ``--debug``); raise what it returns."""
    typer.echo(f"error: {message}", err=True)
    if _debug and sys.exc_info()[0] is not None:
        traceback.print_exc()
    return typer.Exit(code)


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"edgestream {version('edgestream')}")
        except PackageNotFoundError:
            typer.echo("edgestream (not installed as a package)")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Print the traceback behind an error too.")] = False,
) -> None:
    global _debug
    _debug = debug


ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file (default: configs/one-box.toml).")]
LogFormatOption = Annotated[str | None, typer.Option("--log-format", help="text, or json (one object per line, with session/turn/job ids).")]


def _with_log_format(cfg, log_format: str | None):
    if log_format is None:
        return cfg
    if log_format not in ("text", "json"):
        typer.echo(f"error: --log-format: expected text or json, got {log_format!r}", err=True)
        raise typer.Exit(2)
    return cfg.model_copy(update={"log": cfg.log.model_copy(update={"format": log_format})})


S = TypeVar("S", bound=BaseModel)


def _overridden(settings: S, options: dict[str, object]) -> S:
    """``settings`` with the command line's options (``None``: not given), validated like the file."""
    overrides = {k: v for k, v in options.items() if v is not None}
    try:
        return settings.model_validate({**settings.model_dump(), **overrides})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        typer.echo(f"error: --{str(first['loc'][0]).replace('_', '-')}: {first['msg']}", err=True)
        raise typer.Exit(2) from None


def _config(path: Path | None):
    try:
        return load_config(path)
    except ConfigError as exc:
        raise fail(str(exc), 2) from None


@app.command(rich_help_panel=START)
def up(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Address the gateway (the page) listens on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port the gateway (the page) listens on.")] = None,
) -> None:
    """Start the whole system on this box and keep it running: the gateway, the page, one worker of each kind."""
    from gateway.up import run_system
    from stream.running import run

    cfg = _config(config)
    cfg = cfg.model_copy(update={"gateway": _overridden(cfg.gateway, dict(host=host, port=port))})
    sys.exit(run(run_system(cfg, config)))


@app.command(rich_help_panel=START)
def worker(
    kind: Annotated[WorkerKind, typer.Argument(help="stt, llm, tts or vision")],
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (0: any free port).")] = None,
    model: Annotated[str | None, typer.Option(help="Model path (default: the embedded model).")] = None,
    capacity: Annotated[int | None, typer.Option(help="Jobs run at once.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads per job.")] = None,
    announce: Annotated[bool | None, typer.Option("--announce/--no-announce", help="Announce it on the LAN by mDNS.")] = None,
    announce_address: Annotated[str | None, typer.Option(help="HOST:PORT to announce instead of the bound one.")] = None,
    wyoming: Annotated[str | None, typer.Option(help="stt, tts: also serve Wyoming (Home Assistant) on HOST:PORT.")] = None,
    wyoming_open: Annotated[
        bool | None, typer.Option("--wyoming-open/--no-wyoming-open", help="Let Wyoming listen beyond loopback (no authentication).")
    ] = None,
    log_format: LogFormatOption = None,
) -> None:
    """Start a worker of KIND on this box: the edge-box launch command."""
    from stream.keys import KeyFileError
    from stream.tls import TlsError
    from workers.launch import ModelLoadError, run_worker
    from workers.model_files import ModelNotFound

    cfg = _with_log_format(_config(config), log_format)
    settings = cfg.workers.for_kind(kind)
    settings = _overridden(
        settings,
        dict(
            host=host,
            port=port,
            model=model,
            capacity=capacity,
            threads=threads,
            announce=announce,
            announce_address=announce_address,
            wyoming=wyoming,
            wyoming_open=wyoming_open,
        ),
    )
    try:
        run_worker(kind, settings, cfg.log, cfg.security)
    except ExposureError as exc:
        raise fail(str(exc), 2) from None
    except (ModelNotFound, ModelLoadError, FileNotFoundError, KeyFileError, TlsError, PortInUse) as exc:
        raise fail(str(exc), 1) from None
    except OSError as exc:  # the port is taken, or the address is not on this host
        raise fail(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}", 1) from None


@app.command(rich_help_panel=START)
def gateway(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    loopback_ice: Annotated[bool, typer.Option(help="Offer 127.0.0.1 as an ICE candidate (loopback-only machines).")] = False,
    discover: Annotated[bool | None, typer.Option("--discover/--no-discover", help="Use workers announced by mDNS.")] = None,
    processes: Annotated[int | None, typer.Option(help=r"Gateway processes on the one port (0: one per core; \[gateway] processes).")] = None,
    log_format: LogFormatOption = None,
) -> None:
    """Start the gateway: WebRTC sessions, signaling on /session, the demo page on /."""
    from gateway.launch import run_gateway
    from gateway.tokens import TokenFileError
    from stream.keys import KeyFileError
    from stream.tls import TlsError

    cfg = _with_log_format(_config(config), log_format)
    overrides = dict(host=host, port=port, discover=discover, loopback_ice=True if loopback_ice else None, processes=processes)
    cfg = cfg.model_copy(update={"gateway": _overridden(cfg.gateway, overrides)})
    try:
        code = run_gateway(cfg)
    except (ExposureError, KeyFileError, TlsError, TokenFileError) as exc:
        raise fail(str(exc), 2) from None
    except OSError as exc:
        raise fail(f"cannot listen on {cfg.gateway.host}:{cfg.gateway.port}: {exc.strerror or exc}", 1) from None
    if code:
        raise typer.Exit(code)


@app.command(rich_help_panel=TRY)
def samples(directory: Annotated[Path, typer.Argument(help="Where to write question.wav and sign.png.")] = Path(".")) -> None:
    """Write a spoken question (question.wav) and a sign to read (sign.png), made here with the embedded models."""
    from workers.samples import write_samples

    try:
        question, sign = write_samples(directory)
    except OSError as exc:
        raise fail(f"cannot write to {directory}: {exc.strerror or exc}") from None
    typer.echo(f"wrote {question} and {sign}; try them:")
    typer.echo(f"  python -m stream.sdk {question}            # a spoken question to the gateway (edgestream up)")
    typer.echo(f"  edgestream probe stt {question}")
    typer.echo(f"  edgestream probe vision {sign}")


@app.command(rich_help_panel=TRY)
def probe(
    kind: Annotated[WorkerKind, typer.Argument(help="stt, llm, tts or vision")],
    input: Annotated[str, typer.Argument(help="stt: a WAV file; llm: a prompt; tts: text; vision: a PNG/JPEG file")],
    url: Annotated[str | None, typer.Option(help="Worker URL (default: from the config).")] = None,
    config: ConfigOption = None,
    out: Annotated[Path | None, typer.Option(help="tts: write the speech to this WAV file.")] = None,
) -> None:
    """Send one job to a worker and print what comes back, as it streams."""
    from stream.probe import run_probe

    if url is None:
        settings = _config(config).workers.for_kind(kind)
        from stream.config import connect_address

        url = f"ws://{connect_address(settings.host)}:{settings.port}"
    sys.exit(asyncio.run(run_probe(kind, input, url, out)))


token_app = typer.Typer(no_args_is_help=True, help="Client tokens: who may open a session on the gateway.")
app.add_typer(token_app, name="token", rich_help_panel=OPERATE)
TokenFileOption = Annotated[Path | None, typer.Option("--file", help=r"Token file (default: \[security] client_tokens_file of the config).")]


def _with_token_file(file: Path | None, config: Path | None, action):
    """Run ``action(token_file)``; a file that cannot be read or written is a clear error, exit 1."""
    from gateway.tokens import TokenFile, TokenFileError

    path = file or _config(config).security.client_tokens_file
    if not path:
        typer.echo("error: no token file: pass --file, or set [security] client_tokens_file", err=True)
        raise typer.Exit(2)
    tokens = TokenFile(path)
    try:
        return tokens, action(tokens)
    except TokenFileError as exc:
        raise fail(str(exc), 1) from None


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="Who the token is for (a person, a device).")],
    file: TokenFileOption = None,
    config: ConfigOption = None,
) -> None:
    """Add a client token and print it (only its hash is kept: copy it now)."""
    tokens, token = _with_token_file(file, config, lambda tokens: tokens.create(name))
    typer.echo(token)
    typer.echo(f"token {name!r} added to {tokens.path}; a running gateway accepts it within a second", err=True)


@token_app.command("revoke")
def token_revoke(name: Annotated[str, typer.Argument(help="The token's name.")], file: TokenFileOption = None, config: ConfigOption = None) -> None:
    """Remove a client token; a running gateway refuses it and ends its sessions within a second."""
    tokens, removed = _with_token_file(file, config, lambda tokens: tokens.revoke(name))
    if not removed:
        typer.echo(f"error: no token named {name!r} in {tokens.path}", err=True)
        raise typer.Exit(1)
    typer.echo(f"token {name!r} revoked")


@token_app.command("list")
def token_list(file: TokenFileOption = None, config: ConfigOption = None) -> None:
    """The tokens' names and creation times (the tokens themselves are not stored)."""
    _, entries = _with_token_file(file, config, lambda tokens: tokens.read())
    for entry in entries:
        typer.echo(f"{entry.name}\t{entry.created}")


keys_app = typer.Typer(no_args_is_help=True, help="The key gateway and workers share to authenticate each other.")
app.add_typer(keys_app, name="keys", rich_help_panel=OPERATE)


@keys_app.command("worker")
def keys_worker(path: Annotated[Path, typer.Argument(help="Where to write the key (mode 600); copy it to every box.")]) -> None:
    """Create the worker-link key; name it in [security] worker_key_file on the gateway and on every worker."""
    from stream.keys import create_key_file

    try:
        create_key_file(path)
    except FileExistsError:
        typer.echo(f"error: {path} exists; not replacing it", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {path}")


cert_app = typer.Typer(no_args_is_help=True, help="TLS certificates for https/wss on a LAN.")
app.add_typer(cert_app, name="cert", rich_help_panel=OPERATE)


@cert_app.command("create")
def cert_create(
    directory: Annotated[Path, typer.Argument(help="Writes DIR/edgestream.crt and DIR/edgestream.key (mode 600).")],
    name: Annotated[list[str] | None, typer.Option("--name", help="A host name or IP address the boxes are reached at (repeat).")] = None,
    days: Annotated[int, typer.Option(help="Days the certificate is valid.")] = 825,
) -> None:
    """A self-signed certificate and key for every box of a LAN (also the CA the gateway and clients trust)."""
    from stream.tls import create_self_signed, default_names

    names = list(dict.fromkeys([*default_names(), *(name or [])]))
    cert, key = directory / "edgestream.crt", directory / "edgestream.key"
    try:
        create_self_signed(cert, key, names, days)
    except FileExistsError as exc:
        raise fail(str(exc), 1) from None
    typer.echo(f"wrote {cert} and {key} for {', '.join(names)}")
    typer.echo(f'[security]\ntls_cert = "{cert}"\ntls_key = "{key}"\ntls_ca = "{cert}"', err=True)


fuzz_app = typer.Typer(no_args_is_help=True, help="Long fuzz runs (the tests run short ones under hypothesis).")
app.add_typer(fuzz_app, name="fuzz", rich_help_panel=MEASURE)


@fuzz_app.command("protocol")
def fuzz_protocol(
    frames: Annotated[int, typer.Option(help="Mutated frames to feed.")] = 1_000_000,
    seed: Annotated[int, typer.Option(help="Random seed (a run is reproducible).")] = 1,
    out: Annotated[Path, typer.Option(help="JSON report.")] = Path("fuzz-protocol.json"),
) -> None:
    """Mutated control messages and media frames into both sides' protocol state machines; any exception but ProtocolError is a crash."""
    from gateway.harness.fuzz import run_fuzz

    report = run_fuzz(frames, seed, out)
    raise typer.Exit(1 if report["crashes"] else 0)


@app.command(rich_help_panel=MEASURE)
def soak(
    sessions: Annotated[int, typer.Option(help="Concurrent talking sessions.")] = 20,
    minutes: Annotated[float, typer.Option(help="How long they talk.")] = 30.0,
    sample_every: Annotated[float, typer.Option(help="Seconds between samples of RSS and turn counts.")] = 30.0,
    clients: Annotated[int, typer.Option(help="Client processes.")] = 2,
    out: Annotated[Path, typer.Option(help="JSON output file.")] = Path("soak.json"),
) -> None:
    """Sessions talking to one gateway for a long time (canned models): RSS over time, lost turns, errors."""
    from gateway.harness.load_bench import run_soak

    summary = asyncio.run(run_soak(sessions, minutes * 60, sample_every, clients, out))
    raise typer.Exit(1 if summary["lost_turns"] or summary["connected"] < sessions else 0)


@app.command(rich_help_panel=MEASURE)
def chaos(
    kills: Annotated[int, typer.Option(help="Kills (kill -9 of a worker holding a live turn's job) to make.")] = 100,
    out: Annotated[Path, typer.Option(help="JSON output file.")] = Path("chaos.json"),
    logs: Annotated[Path | None, typer.Option(help="Directory for the worker processes' output.")] = None,
) -> None:
    """Kill worker processes mid-turn, again and again (real models, two workers per kind): every turn must be answered."""
    from gateway.harness.chaos import run_chaos

    summary = asyncio.run(run_chaos(kills, out, logs))
    raise typer.Exit(1 if summary["lost_turns"] else 0)


@app.command(rich_help_panel=MEASURE)
def attack(
    only: Annotated[list[str] | None, typer.Option("--only", help="Run only this attack (repeat for more); default: all.")] = None,
    out: Annotated[Path, typer.Option(help="JSON output file.")] = Path("attack.json"),
    logs: Annotated[Path | None, typer.Option(help="Directory for the system's processes' output.")] = None,
) -> None:
    """Replay the red-team findings against a live system on loopback; per attack: a real spoken turn
    answered, /healthz p99, RSS before/peak/after. Exits 1 if any attack fails."""
    from gateway.harness.attack import ATTACKS, run_attacks

    names = only or list(ATTACKS)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise typer.BadParameter(f"unknown attack {', '.join(unknown)}; known: {', '.join(ATTACKS)}", param_hint="--only")
    summary = asyncio.run(run_attacks(names, out, logs))
    raise typer.Exit(1 if summary["failed"] else 0)


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: each prints a table and writes JSON.")
app.add_typer(bench_app, name="bench", rich_help_panel=MEASURE)


@bench_app.command("workers")
def bench_workers(
    kinds: Annotated[list[WorkerKind] | None, typer.Option("--kind", help="Kinds to measure (default: all).")] = None,
    runs: Annotated[int, typer.Option(help="Runs per measurement; medians are reported.")] = 5,
    out: Annotated[Path, typer.Option(help="JSON output file.")] = Path("bench-workers.json"),
    wyoming: Annotated[
        list[str] | None, typer.Option("--wyoming", help="tcp://HOST:PORT of a Wyoming STT or TTS server to measure beside the native worker (repeat).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Each worker kind over a real WebSocket on loopback: STT RTF, LLM TTFT and tokens/s, TTS TTFA and RTF, OCR ms; Wyoming servers beside them."""
    from gateway.harness.worker_bench import run_worker_bench

    asyncio.run(run_worker_bench(kinds or list(WorkerKind), runs, out, _config(config), wyoming))


@bench_app.command("selection")
def bench_selection(
    loads: Annotated[str, typer.Option(help="Offered loads, as fractions of the workers' total capacity.")] = "0.3,0.5,0.7",
    jobs: Annotated[int, typer.Option(help="Jobs per policy and load.")] = 200,
    repeats: Annotated[int, typer.Option(help="Runs per policy and load (figures are medians over them).")] = 3,
    out: Annotated[Path, typer.Option(help="JSON output file.")] = Path("bench-selection.json"),
) -> None:
    """Worker selection on heterogeneous STT workers (one 4x slower, one 40 ms away): p50/p95 per policy and load."""
    from gateway.harness.selection_bench import run_selection_bench

    asyncio.run(run_selection_bench([float(x) for x in loads.split(",")], jobs, repeats, out))


@bench_app.command("gateway-load")
def bench_gateway_load(
    sessions: Annotated[str, typer.Option(help="Numbers of concurrent sessions to try, in order.")] = "10,20,40,60,80,100",
    clients: Annotated[int, typer.Option(help="Client processes the sessions are spread over.")] = 2,
    window: Annotated[float, typer.Option(help="Seconds measured per level (after all sessions are up).")] = 15.0,
    repeats: Annotated[int, typer.Option(help="Runs per level; a level passes on the median run.")] = 1,
    out: Annotated[Path, typer.Option(help="JSON output file.")] = Path("bench-gateway-load.json"),
    profile: Annotated[Path | None, typer.Option(help="Directory for py-spy profiles of each gateway process, one per run (needs py-spy).")] = None,
    processes: Annotated[str, typer.Option(help="Gateway process counts to run every level with, in order (the ratio is read off one run).")] = "1",
    logs: Annotated[Path | None, typer.Option(help="Directory to keep the gateway's and clients' logs in (default: a temporary one, removed).")] = None,
    clients_nice: Annotated[
        int,
        typer.Option(
            min=0, max=19, help="Run the client processes at this nice (lower CPU priority): the gateway gets the cores first, as on a box of its own."
        ),
    ] = 0,
) -> None:
    """N talking WebRTC sessions on a gateway (canned models): CPU per process and session, ingest lag p50/p99, lost frames; the largest N passing."""
    from gateway.harness.load_bench import run_load_bench

    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
    counts = tuple(int(x) for x in processes.split(","))
    asyncio.run(run_load_bench([int(x) for x in sessions.split(",")], clients, window, repeats, out, profile, counts, logs, clients_nice))


@bench_app.command("overhead")
def bench_overhead(
    turns: Annotated[int, typer.Option(help="Turns to measure (after one warm-up turn).")] = 20,
    out: Annotated[Path, typer.Option(help="JSON output file.")] = Path("bench-overhead.json"),
) -> None:
    """The pipeline's own share of a turn (canned models, over real WebRTC): end of turn to first answer audio, p50."""
    from gateway.harness.overhead_bench import run_overhead_bench

    asyncio.run(run_overhead_bench(turns, out))


@bench_app.command("voice")
def bench_voice(
    mode: Annotated[str, typer.Option(help="fresh (a new session per question), conversation (all in one session), or both.")] = "both",
    turns: Annotated[int, typer.Option(help="Turns of the conversation mode (after one warm-up turn).")] = 12,
    runs: Annotated[int, typer.Option(help="Runs, each on freshly started processes; medians over runs are reported.")] = 1,
    slowdown: Annotated[str | None, typer.Option(help="Emulate a slower box: CPU quota per process, e.g. stt=8,tts=3,llm=1.5,gateway=2 (needs root).")] = None,
    first_piece_words: Annotated[int | None, typer.Option(help=r"Override \[gateway] first_piece_words.")] = None,
    tree: Annotated[Path | None, typer.Option(help="Run the gateway and workers from this checkout (a baseline in the same run).")] = None,
    logs: Annotated[Path | None, typer.Option(help="Directory for the gateway's and workers' output.")] = None,
    gateway_option: Annotated[list[str] | None, typer.Option("--gateway-option", help=r"KEY=VALUE for the \[gateway] section, as TOML (repeat).")] = None,
    out: Annotated[Path, typer.Option(help="JSON output file.")] = Path("bench-voice.json"),
    config: ConfigOption = None,
) -> None:
    """Voice-to-voice latency over WebRTC on open questions in many voices: p50/p95, stage medians, idle floors."""
    from gateway.harness.voice_bench import run_voice_bench

    modes = ["fresh", "conversation"] if mode == "both" else [mode]
    if any(m not in ("fresh", "conversation") for m in modes):
        typer.echo(f"error: --mode: expected fresh, conversation or both, got {mode!r}", err=True)
        raise typer.Exit(2)
    factors: dict[str, float] = {}
    for item in filter(None, (slowdown or "").split(",")):
        name, _, value = item.partition("=")
        try:
            factors[name.strip()] = float(value)
        except ValueError:
            typer.echo(f"error: --slowdown: expected NAME=FACTOR, got {item!r}", err=True)
            raise typer.Exit(2) from None
        if name.strip() not in ("gateway", *(k.value for k in WorkerKind)):
            typer.echo(f"error: --slowdown: unknown process {name!r} (gateway, stt, llm, tts, vision)", err=True)
            raise typer.Exit(2)
    try:
        asyncio.run(
            run_voice_bench(
                modes,
                turns,
                runs,
                out,
                _config(config),
                slowdown=factors,
                tree=tree,
                first_piece_words=first_piece_words,
                logs=logs,
                gateway_options=dict(option.split("=", 1) for option in gateway_option or [] if "=" in option),
            )
        )
    except RuntimeError as exc:
        raise fail(str(exc), 1) from None
