"""A worker's measured service rate: work per second of compute, learned online."""

from __future__ import annotations

from stream.ewma import Ewma


class ServiceRate:
    """Exponentially weighted moving average of ``units / seconds`` per job.

    ``alpha`` weighs the newest job; 0.3 forgets a slowdown's past within a few
    jobs, which is what a selector needs to move traffic off a throttled box.
    """

    def __init__(self, alpha: float = 0.3) -> None:
        self._average = Ewma(alpha)

    @property
    def value(self) -> float:
        """Units per compute second; 0.0 before the first job."""
        return self._average.value or 0.0

    def observe(self, units: float, seconds: float, at: float = 0.0) -> None:
        if units <= 0 or seconds <= 0:
            return
        self._average.observe(units / seconds, at)
