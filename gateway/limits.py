"""Rate limits on what a client sends the gateway (policy, no I/O)."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """Allows ``rate`` events per second on average, and bursts of up to ``burst``.

    ``allow()`` spends one token if there is one. A caller that refuses what
    is over the limit can tell the first refusal of a flood (to answer it
    once) from the rest (to drop them quietly) with :attr:`refusing`: a flood
    lasts until ``quiet_s`` pass without a refusal, so the few events that a
    refilled token lets through in the middle of it do not start a new one.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic, quiet_s: float = 2.0) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.quiet_s = quiet_s
        self.tokens = burst
        self.refused = 0
        self._last = clock()
        self._last_refused: float | None = None

    @property
    def refusing(self) -> bool:
        """Whether a flood is going on (a refusal less than ``quiet_s`` ago)."""
        return self._last_refused is not None and self.clock() - self._last_refused < self.quiet_s

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self._last_refused = now
        self.refused += 1
        return False
