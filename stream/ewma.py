"""The one moving average: the gateway's per-worker estimates and a worker's measured service rate both learn with it."""

from __future__ import annotations

import math


class Ewma:
    """Exponentially weighted moving average; ``alpha`` weighs the newest sample."""

    def __init__(self, alpha: float) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self.value: float | None = None
        self.at: float = -math.inf
        """When the last sample was taken (the caller's clock)."""

    def observe(self, sample: float, at: float) -> None:
        self.value = sample if self.value is None else self.alpha * sample + (1 - self.alpha) * self.value
        self.at = at
