"""When ``edgestream up`` restarts a process that exited (policy, no I/O; ``gateway/up.py`` acts on it).

A process that exits is started again after a backoff (``stream/backoff.py``)
that grows with the exits in a row. A run that lasted ``stable_s`` resets
the count: a worker killed once an hour comes back at once each time. Two
exits are never restarted:

- exit status 2, a usage or config mistake (the commands' convention):
  the same command would fail the same way;
- ``max_quick_exits`` exits in a row, each within ``stable_s`` of its
  start: a model that cannot load, a port another program holds. The
  rest of the system goes on without that process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stream.backoff import Backoff

USAGE_ERROR = 2


@dataclass
class Restarts:
    """The exits of one supervised process, and what to do after the next one."""

    backoff: Backoff = field(default_factory=lambda: Backoff(initial_s=0.5, max_s=10.0, jitter=0.1))
    stable_s: float = 30.0
    max_quick_exits: int = 5
    quick_exits: int = 0
    """Exits in a row, each before the run was stable."""
    restarts: int = 0

    def after_exit(self, status: int | None, ran_s: float) -> float | None:
        """Seconds to wait before starting it again; ``None``: do not (see the module docstring)."""
        if status == USAGE_ERROR:
            return None
        self.quick_exits = 1 if ran_s >= self.stable_s else self.quick_exits + 1
        if self.quick_exits > self.max_quick_exits:
            return None
        self.restarts += 1
        return self.backoff.delay(self.quick_exits)

    def why_not(self, status: int | None) -> str:
        """Why :meth:`after_exit` said ``None``, as a person reads it."""
        if status == USAGE_ERROR:
            return "it refused its command line or config (exit 2); fix that and start edgestream up again"
        return f"it exited {self.quick_exits} times in a row, each within {self.stable_s:g} s of starting; see its lines above"
