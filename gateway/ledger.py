"""Which sessions the gateway holds, for whom and in which process: the limits that count sessions (policy, no I/O).

``max_sessions`` and ``max_sessions_per_client`` are limits of the whole
gateway, however many processes serve it (``gateway/processes.py``). One
:class:`SessionLedger` holds every session of the gateway: in the gateway
process itself when there is one, in the supervisor when there are several
(each process asks it over its link, ``gateway/process_link.py``). A session
is claimed before its offer is parsed and released when it ends; when a
process dies, :meth:`SessionLedger.drop` releases everything it held, so a
crash cannot leave places taken. Worst case held: ``max_sessions`` entries.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a session was not admitted: the code and message the client is told."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class _Claim:
    owner: int
    client: str


class SessionLedger:
    """Sessions held, by id: their owner (a process index) and client (a token's name or an address)."""

    def __init__(self, max_sessions: int, max_sessions_per_client: int) -> None:
        self.max_sessions = max_sessions
        self.max_sessions_per_client = max_sessions_per_client
        self._claims: dict[str, _Claim] = {}
        self._of_client: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._claims)

    def held_by(self, owner: int) -> int:
        return sum(1 for claim in self._claims.values() if claim.owner == owner)

    def claim(self, owner: int, session_id: str, client: str) -> Refusal | None:
        """Admit ``session_id`` of ``client`` in ``owner``, or say why not (admitting nothing)."""
        if session_id in self._claims:
            return Refusal("malformed", f"session {session_id} is held already")
        if len(self._claims) >= self.max_sessions:
            return Refusal("too_many_sessions", f"the gateway holds {self.max_sessions} sessions at most")
        if self._of_client[client] >= self.max_sessions_per_client:
            return Refusal("too_many_client_sessions", f"client {client} holds {self.max_sessions_per_client} sessions already (the most per client)")
        self._claims[session_id] = _Claim(owner, client)
        self._of_client[client] += 1
        return None

    def release(self, session_id: str) -> None:
        """``session_id`` ended (again, or never claimed: nothing)."""
        claim = self._claims.pop(session_id, None)
        if claim is None:
            return
        self._of_client[claim.client] -= 1
        if self._of_client[claim.client] <= 0:
            del self._of_client[claim.client]

    def drop(self, owner: int) -> list[str]:
        """Release every session ``owner`` held (it exited); their ids."""
        gone = [session_id for session_id, claim in self._claims.items() if claim.owner == owner]
        for session_id in gone:
            self.release(session_id)
        return gone
