"""Is a port free? Asked before a model loads, so that a clash is told in a second, not after 25."""

from __future__ import annotations

import errno
import socket


class PortInUse(OSError):
    """``host:port`` cannot be listened on: its message is the one line a person is shown."""


def check_can_listen(host: str, port: int, what: str) -> None:
    """Raise :class:`PortInUse` if ``host:port`` cannot be bound now (port 0 always can).

    A check, not a reservation: the socket is closed again, and another
    program could take the port before the real listener binds it (that one
    then fails as it would have without this check).
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortInUse(f"{what}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    for family, kind, proto, _, address in infos[:1]:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the real listener does: TIME_WAIT is no clash
            try:
                probe.bind(address)
            except OSError as exc:
                hint = " (another edgestream, or another program, holds it: stop it or pick another port)" if exc.errno == errno.EADDRINUSE else ""
                raise PortInUse(f"{what}: cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
