"""A worker's measured service rate: work per second of compute, learned online."""

from __future__ import annotations


class ServiceRate:
    """Exponentially weighted moving average of ``units / seconds`` per job.

    ``alpha`` weighs the newest job; 0.3 forgets a slowdown's past within a few
    jobs, which is what a selector needs to move traffic off a throttled box.
    """

    def __init__(self, alpha: float = 0.3) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self.value = 0.0
        self.samples = 0

    def observe(self, units: float, seconds: float) -> None:
        if units <= 0 or seconds <= 0:
            return
        sample = units / seconds
        self.value = sample if self.samples == 0 else self.alpha * sample + (1 - self.alpha) * self.value
        self.samples += 1
