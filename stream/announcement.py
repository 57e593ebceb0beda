"""What a worker announces on the LAN by mDNS, and how an announcement is checked (pure).

Workers register ``<worker id>._edgestream._tcp.local.`` with these TXT
properties (all strings)::

    kind      stt | llm | tts | vision
    model     model id
    sha256    the model file's hash (64 hex digits)
    capacity  jobs run at once
    proto     worker protocol version
    path      WebSocket path (optional, default "/")
    tls       "1" when the worker serves wss:// (optional)

The worker publishes, the gateway browses (``workers/announce.py``,
``gateway/discovery.py``); both share this module so they cannot disagree.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .protocol import PROTOCOL_VERSION, WorkerKind

SERVICE_TYPE = "_edgestream._tcp.local."
WYOMING_SERVICE_TYPE = "_wyoming._tcp.local."
"""Home Assistant's Wyoming services (``wyoming-faster-whisper --zeroconf``, an edgestream worker's
``--wyoming`` listener). They carry no TXT record; the service is read from its ``info``. An
edgestream worker's one has ``edgestream`` set, so gateways take that worker by its native link."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BadAnnouncement(ValueError):
    """An mDNS record that does not describe a worker this gateway can use."""


@dataclass(frozen=True)
class Announcement:
    name: str
    kind: WorkerKind
    model_id: str
    model_sha256: str
    capacity: int
    url: str


def properties(kind: WorkerKind, model_id: str, model_sha256: str, capacity: int, tls: bool = False) -> dict[str, str]:
    """The TXT properties a worker publishes."""
    props = {"kind": kind.value, "model": model_id, "sha256": model_sha256, "capacity": str(capacity), "proto": str(PROTOCOL_VERSION), "path": "/"}
    if tls:
        props["tls"] = "1"
    return props


def parse(name: str, props: dict[bytes | str, bytes | str | None], addresses: list[str], port: int | None) -> Announcement:
    """Check a resolved service record; :class:`BadAnnouncement` says what is wrong with it."""
    text = {_str(k): _str(v) for k, v in props.items() if v is not None}
    kind_name = text.get("kind", "")
    try:
        kind = WorkerKind(kind_name)
    except ValueError:
        raise BadAnnouncement(f"unknown worker kind {kind_name!r}") from None
    if text.get("proto") != str(PROTOCOL_VERSION):
        raise BadAnnouncement(f"protocol version {text.get('proto')!r}, this gateway speaks {PROTOCOL_VERSION}")
    sha = text.get("sha256", "")
    if not _SHA256.match(sha):
        raise BadAnnouncement(f"model hash {sha[:70]!r} is not 64 hex digits")
    model = text.get("model", "")
    if not model or len(model) > 200:
        raise BadAnnouncement("no model id")
    try:
        capacity = int(text.get("capacity", ""))
    except ValueError:
        raise BadAnnouncement(f"capacity {text.get('capacity')!r} is not a number") from None
    if not 1 <= capacity <= 1024:
        raise BadAnnouncement(f"capacity {capacity} out of range")
    if port is None or not 0 < port < 65536:
        raise BadAnnouncement(f"bad port {port}")
    usable = [a for a in addresses if _usable(a)]
    if not usable:
        raise BadAnnouncement(f"no usable address in {addresses}")
    host = usable[0] if ":" not in usable[0] else f"[{usable[0]}]"
    path = text.get("path", "/") or "/"
    if not path.startswith("/"):
        raise BadAnnouncement(f"bad path {path!r}")
    scheme = "wss" if text.get("tls") == "1" else "ws"
    return Announcement(name, kind, model, sha, capacity, f"{scheme}://{host}:{port}{path if path != '/' else ''}")


def _usable(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return not (ip.is_unspecified or ip.is_multicast or ip.is_link_local)


def _str(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
