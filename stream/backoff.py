"""Retry delays: one exponential backoff for every reconnecting link (SDK sessions, the gateway's worker links, ``up``'s restarts)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential delays with jitter: how a session retries after losing the gateway, and how the pool re-dials a worker.

    Attempt ``n`` (from 1) waits ``min(max_s, initial_s * factor ** (n - 1))``,
    scaled by a random factor in ``[1 - jitter, 1 + jitter]`` so that many
    clients cut off together do not all come back in the same instant.
    """

    initial_s: float = 0.5
    max_s: float = 10.0
    factor: float = 2.0
    jitter: float = 0.2
    max_attempts: int | None = None
    """Give up after this many failed attempts in a row (``None``: never)."""

    def delay(self, attempt: int) -> float:
        # The exponent is capped: a link down for hours counts thousands of attempts, and factor ** 1024 overflows.
        base = min(self.max_s, self.initial_s * self.factor ** min(attempt - 1, 64))
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)
