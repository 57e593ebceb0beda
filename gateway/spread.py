"""Which gateway process takes the next connection (policy, no I/O).

A gateway of several processes (``gateway/processes.py``) accepts every
connection in its supervisor and hands it to one process; a session then
lives in that process. Left to the kernel (``SO_REUSEPORT`` hashes the
client's address and port), 40 connections split anywhere from 20/20 to
16/24 in five tries, and the busier process sets the p99. Here the next connection goes to
the process holding the fewest sessions, counting the connections handed to
it lately that have not become sessions yet (a burst of offers spreads at
once, before any of them is admitted); ties go to the process handed one
least recently, so that requests which never become sessions (``/healthz``,
the page's files) take turns too.

A handed connection counts until a session of that process is claimed in the
ledger or ``settle_s`` passes (it was a plain HTTP request, or its offer was
refused). The claim names a session, not the connection it came on, so it
takes away the oldest connection on its way: while a plain request is among
them, a new session may count twice for up to ``settle_s``. The error only
ever sends the next connection elsewhere, and ends by itself. Worst case held: one timestamp per connection handed in the last
``settle_s`` seconds, and at most ``MAX_PENDING`` per process.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping

SETTLE_S = 5.0
"""How long a handed connection counts as a session on its way (a WebSocket handshake and an offer take well under a second)."""
MAX_PENDING = 1024
"""Handed connections remembered per process; older ones are forgotten first."""


class Spread:
    """The processes' loads as the supervisor sees them: sessions held (given) and connections handed (kept here)."""

    def __init__(self, settle_s: float = SETTLE_S) -> None:
        self.settle_s = settle_s
        self._pending: dict[int, collections.deque[float]] = {}
        self._last_handed: dict[int, int] = {}
        self._handed = 0

    def choose(self, sessions: Mapping[int, int], now: float) -> int | None:
        """The process to hand the next connection to, among the live ones (``sessions``: each one's
        sessions held); ``None`` when none is live."""
        if not sessions:
            return None
        return min(sessions, key=lambda index: (sessions[index] + self.pending(index, now), self._last_handed.get(index, -1), index))

    def handed(self, index: int, now: float) -> None:
        """A connection was handed to ``index``."""
        self._pending.setdefault(index, collections.deque(maxlen=MAX_PENDING)).append(now)
        self._handed += 1
        self._last_handed[index] = self._handed

    def claimed(self, index: int) -> None:
        """A session was claimed in ``index``: the oldest connection on its way there arrived."""
        pending = self._pending.get(index)
        if pending:
            pending.popleft()

    def pending(self, index: int, now: float) -> int:
        """Connections handed to ``index`` in the last ``settle_s`` that have not become sessions."""
        pending = self._pending.get(index)
        if not pending:
            return 0
        while pending and now - pending[0] >= self.settle_s:
            pending.popleft()
        return len(pending)

    def forget(self, indexes: Iterable[int]) -> None:
        """These processes are gone (a restarted one starts with nothing on its way)."""
        for index in indexes:
            self._pending.pop(index, None)
            self._last_handed.pop(index, None)
