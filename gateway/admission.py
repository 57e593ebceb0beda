"""Jobs waiting for a worker with room: one line per kind, longest-waiting first (pure, no I/O).

A worker that is full refuses a job with ``busy``. The job does not fail:
the conversation keeps it (its audio, its text) and stands it in the
:class:`WaitingLine` of its kind, and the client hears ``waiting``. Whenever
one of this gateway's jobs of that kind ends, its slot goes to the job that
has waited longest: that job alone is woken (no herd of retries), and asks
again. It can still find the worker full (a job of another gateway, or one
starting at that moment, took the slot): it stands in line again at the place
its first refusal gave it. Each waiting job also asks again on its own timer
(``gateway/failover.py``), which is how room made by other gateways is found,
and gives up at its deadline (``busy_wait_s``).

The line is bounded (``max_waiting_jobs``): a job that finds it full fails
at once with ``busy``, so a flood of sessions cannot queue without end.
Worst case held: ``max_waiting`` entries of a few hundred bytes per kind; the
audio a waiting STT job keeps is the turn's own (``max_utterance_s``).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Hashable

log = logging.getLogger("edgestream.gateway")

Wake = Callable[[], bool]
"""Called when a slot may be free; ``False``: the job no longer waits (the slot goes to the next)."""


class WaitingLine:
    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._order: list[tuple[float, int, Hashable]] = []
        """(since, arrival, ticket), sorted: the longest waiting first."""
        self._wakes: dict[Hashable, tuple[tuple[float, int, Hashable], Wake]] = {}
        self._arrivals = 0

    def __len__(self) -> int:
        return len(self._wakes)

    def join(self, ticket: Hashable, since: float, wake: Wake) -> bool:
        """Stand ``ticket`` in line as waiting since ``since``; ``False``: the line is full."""
        self.leave(ticket)
        if len(self._wakes) >= self.max_waiting:
            return False
        self._arrivals += 1
        entry = (since, self._arrivals, ticket)
        bisect.insort(self._order, entry, key=lambda e: e[:2])
        self._wakes[ticket] = (entry, wake)
        return True

    def leave(self, ticket: Hashable) -> None:
        """``ticket`` stops waiting (it gave up, was cancelled, or went ahead on its own timer)."""
        held = self._wakes.pop(ticket, None)
        if held is not None:
            self._order.remove(held[0])

    def position(self, ticket: Hashable) -> int | None:
        """0 for the first in line; ``None``: not in line."""
        held = self._wakes.get(ticket)
        return None if held is None else self._order.index(held[0])

    def freed(self) -> Hashable | None:
        """A slot may be free: wake the longest-waiting job that still waits; which one, or ``None``."""
        while self._order:
            entry = self._order.pop(0)
            _, wake = self._wakes.pop(entry[2])
            try:
                if wake():
                    return entry[2]
            except Exception:  # one session's failure is not the line's
                log.exception("waking job %s failed", entry[2])
        return None
