"""Accepted connections handed from a gateway's supervisor to its processes (transport).

The supervisor of a gateway of several processes (``gateway/processes.py``)
accepts every TCP connection on the gateway's port and passes the socket
itself to one process over a Unix socket (``SCM_RIGHTS``): the process owns
the connection from then on (its TLS, its WebSocket, the session's WebRTC),
and the supervisor closes its copy. Nothing is proxied; the supervisor's cost
is one ``accept`` and one ``sendmsg`` a connection.

Each message is one byte with one descriptor. A process that does not read
(stuck) fills its socket's buffer (a few hundred messages); :meth:`Outlet.give`
then says so instead of waiting, and the supervisor hands the connection to
another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("edgestream.gateway")

HELLO_TIMEOUT_S = 5.0
"""How long a process that connected may take to say which one it is."""
FDS_PER_READ = 16


class Outlet:
    """The supervisor's end of one process's hand-off socket."""

    def __init__(self, index: int, sock: socket.socket, on_closed: Callable[[Outlet], None]) -> None:
        self.index = index
        self.sock = sock
        self.closed = False
        self._on_closed = on_closed
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def give(self, connection: socket.socket) -> bool:
        """Pass ``connection`` to the process (the caller closes its own copy); ``False`` if it could not be passed now."""
        if self.closed:
            return False
        try:
            socket.send_fds(self.sock, [b"c"], [connection.fileno()])
        except BlockingIOError:  # the process is not reading: someone else takes this one
            return False
        except OSError as exc:
            if exc.errno == errno.ETOOMANYREFS:  # too many descriptors in flight from here: also "not now"
                return False
            # it is gone
            self.close()
            return False
        return True

    def _readable(self) -> None:
        # The process sends nothing after its hello: readable means it closed its end (exited).
        try:
            data = self.sock.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        self._on_closed(self)


async def accept_outlets(listener: socket.socket, on_outlet: Callable[[Outlet], None], on_closed: Callable[[Outlet], None]) -> None:
    """Take processes' hand-off connections on ``listener`` (a listening Unix socket) until cancelled."""
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    while True:
        sock, _ = await loop.sock_accept(listener)
        try:
            async with asyncio.timeout(HELLO_TIMEOUT_S):
                hello = await loop.sock_recv(sock, 32)
            index = int(hello.decode("ascii").strip())
        except (TimeoutError, ValueError, UnicodeDecodeError, OSError) as exc:
            log.warning("a hand-off connection did not say which process it is (%s); closed", exc or type(exc).__name__)
            sock.close()
            continue
        on_outlet(Outlet(index, sock, on_closed))


class Inlet:
    """A gateway process's end: connections from the supervisor, each passed to ``adopt``."""

    def __init__(self, path: str, index: int, adopt: Callable[[socket.socket], None]) -> None:
        self.path = path
        self.index = index
        self._adopt = adopt
        self._sock: socket.socket | None = None

    async def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_connect(sock, self.path)
            await loop.sock_sendall(sock, f"{self.index}\n".encode())
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self._sock, FDS_PER_READ, FDS_PER_READ)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            for fd in fds:
                self._adopt(socket.socket(fileno=fd))
            if not data and not fds:  # the supervisor is gone (its link says so too)
                self.close()
                return

    def close(self) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
