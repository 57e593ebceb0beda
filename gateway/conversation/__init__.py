"""The conversation, without I/O: turn events, job results and the clock in; commands out.

- :mod:`.inputs`: what happens (small frozen dataclasses).
- :mod:`.commands`: what to do about it.
- :mod:`.core`: :class:`Conversation`, the state machine: turns, speculation,
  barge-in, the answer's pieces, failover per kind, latency marks.
- :mod:`.history`: what is remembered, and the prompt.

``gateway/runner.py`` runs it for a session.
"""

from .core import STAGES, Conversation

__all__ = ["STAGES", "Conversation"]
