"""Accepted connections handed from a gateway's supervisor to its processes (transport).

The supervisor of a gateway of several processes (``gateway/processes.py``)
accepts every TCP connection on the gateway's port and passes the socket
itself to one process over a Unix socket (``SCM_RIGHTS``): the process owns
the connection from then on (its TLS, its WebSocket, the session's WebRTC),
and the supervisor closes its copy. Nothing is proxied; the supervisor's cost
is one ``accept`` and one ``sendmsg`` a connection.

Each message is one byte with one descriptor. The hand-off socket's send
buffer is kept small (``SEND_BUFFER_BYTES``: about 40 messages), so a
process that stops reading (stuck) holds at most that many connections
unanswered; then :meth:`Outlet.give` says "not now" instead of waiting, and
the supervisor hands the connection to another process. If the stuck
process dies, the kernel closes what it never took (those clients see a
reset; the SDKs reconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable

from .limits import TokenBucket

log = logging.getLogger("edgestream.gateway")

HELLO_TIMEOUT_S = 5.0
"""How long a process that connected may take to say which one it is."""
FDS_PER_READ = 16
SEND_BUFFER_BYTES = 16 * 1024
"""The hand-off socket's send buffer (Linux doubles it; each message takes about 770 bytes of it)."""
ACCEPT_RETRY_S = 0.5
"""How long an accept loop waits after an error of the box (out of descriptors, of memory) before it tries again."""
_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF})
"""Errors of ``sendmsg`` that mean the process's end is closed; any other is "not now"."""


class Outlet:
    """The supervisor's end of one process's hand-off socket."""

    def __init__(self, index: int, sock: socket.socket, on_closed: Callable[[Outlet], None]) -> None:
        self.index = index
        self.sock = sock
        self.closed = False
        self._on_closed = on_closed
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def give(self, connection: socket.socket) -> bool:
        """Pass ``connection`` to the process (the caller closes its own copy); ``False`` if it could not be passed now."""
        if self.closed:
            return False
        try:
            socket.send_fds(self.sock, [b"c"], [connection.fileno()])
        except OSError as exc:
            if exc.errno in _GONE:
                self.close()
            # Otherwise: the process is not reading (a full buffer), or the box is short of
            # memory or of descriptors in flight; someone else takes this one.
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


class AcceptErrors:
    """What an accept loop does when ``accept`` fails: log it (at most once a second, the rest
    counted) and wait ``ACCEPT_RETRY_S`` before the next try, as asyncio's own servers do."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._logged = TokenBucket(1.0, 1.0)

    async def failed(self, exc: OSError) -> None:
        if self._logged.allow():
            log.error("accepting %s failed: %s; trying again in %g s", self.what, exc, ACCEPT_RETRY_S)
        await asyncio.sleep(ACCEPT_RETRY_S)


async def accept_outlets(listener: socket.socket, on_outlet: Callable[[Outlet], None], on_closed: Callable[[Outlet], None]) -> None:
    """Take processes' hand-off connections on ``listener`` (a listening Unix socket) until cancelled;
    each one's hello (its index) is read on its own, so one slow process delays no other."""
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    errors = AcceptErrors("a gateway process's hand-off connection")
    hellos: set[asyncio.Task[None]] = set()

    async def hello(sock: socket.socket) -> None:
        try:
            async with asyncio.timeout(HELLO_TIMEOUT_S):
                said = await loop.sock_recv(sock, 32)
            index = int(said.decode("ascii").strip())
        except (TimeoutError, ValueError, UnicodeDecodeError, OSError) as exc:
            log.warning("a hand-off connection did not say which process it is (%s); closed", exc or type(exc).__name__)
            sock.close()
            return
        except BaseException:
            sock.close()
            raise
        on_outlet(Outlet(index, sock, on_closed))

    try:
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:
                await errors.failed(exc)
                continue
            task = asyncio.create_task(hello(sock))
            hellos.add(task)
            task.add_done_callback(hellos.discard)
    finally:
        for task in hellos:
            task.cancel()


class Inlet:
    """A gateway process's end: connections from the supervisor, each passed to ``adopt``.

    :attr:`closed` is set when the supervisor closes its end (it stopped, or
    it is gone): the process then stops too, as when its link is lost.
    """

    def __init__(self, path: str, index: int, adopt: Callable[[socket.socket], None]) -> None:
        self.path = path
        self.index = index
        self._adopt = adopt
        self._sock: socket.socket | None = None
        self.closed = asyncio.Event()

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
                data, fds, _, _ = socket.recv_fds(self._sock, FDS_PER_READ, FDS_PER_READ, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            for fd in fds:
                os.set_inheritable(fd, False)  # not passed on to a child process (the flag above is not honoured everywhere)
                connection = socket.socket(fileno=fd)
                try:
                    self._adopt(connection)
                except Exception:  # that connection only
                    log.exception("a connection handed to this process could not be taken")
                    connection.close()
            if not data and not fds:
                self.close()
                return

    def close(self) -> None:
        self.closed.set()
        if self._sock is None:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
