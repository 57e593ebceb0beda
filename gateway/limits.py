"""Rate limits on what a client sends the gateway (policy, no I/O)."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """Allows ``rate`` events per second on average, and bursts of up to ``burst``.

    ``allow()`` spends one token if there is one. A caller that refuses what
    is over the limit can tell the first refusal of a flood (to answer it
    once) from the rest (to drop them quietly) with :attr:`refusing`.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = burst
        self.refusing = False
        """Whether the last call was refused (a new flood starts on the first refusal after an allowed call)."""
        self.refused = 0
        self._last = clock()

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.refusing = False
            return True
        self.refusing = True
        self.refused += 1
        return False
