"""Rate limits on what a client sends the gateway (policy, no I/O)."""

from __future__ import annotations

import collections
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

    def empty(self) -> bool:
        """Whether :meth:`allow` would refuse now (spends nothing)."""
        self._refill()
        return self.tokens < 1

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now

    def allow(self) -> bool:
        self._refill()
        now = self._last
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self._last_refused = now
        self.refused += 1
        return False


class PendingConnections:
    """Signaling connections that are open but have not sent their offer yet, capped.

    Each costs a socket (a file descriptor) and a task for up to the offer
    timeout (10 s), so an address that opens them without ever offering could
    hold every descriptor the process has. :meth:`admit` refuses a connection
    above ``per_address`` pending from its address or ``total`` in all; what
    it admitted is counted until :meth:`done`. When all ``total`` places are
    taken, a newcomer from an address holding fewer than the biggest holder
    takes the oldest place of that holder (:meth:`evict_for`): a few
    addresses cannot lock everyone else out. Worst case held: ``total``
    sockets and tasks (tens of KB each).
    """

    def __init__(self, total: int, per_address: int) -> None:
        self.total = total
        self.per_address = per_address
        self._address_of: dict[object, str] = {}
        self._count: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._address_of)

    def refusal(self, address: str) -> str | None:
        """Why a new connection from ``address`` is refused now, or ``None`` if it is not."""
        if self._count[address] >= self.per_address:
            return f"{address} has {self.per_address} signaling connections waiting for their offer already (the most per address)"
        if len(self._address_of) >= self.total:
            return f"{self.total} signaling connections are waiting for their offer already (the most in all)"
        return None

    def admit(self, key: object, address: str) -> str | None:
        """Count ``key`` as pending from ``address``; or the refusal, counting nothing."""
        refusal = self.refusal(address)
        if refusal is None:
            self._address_of[key] = address
            self._count[address] += 1
        return refusal

    def done(self, key: object) -> None:
        """``key`` sent its offer or closed (again: nothing)."""
        address = self._address_of.pop(key, None)
        if address is None:
            return
        self._count[address] -= 1
        if self._count[address] <= 0:
            del self._count[address]

    def evict_for(self, address: str) -> object | None:
        """The pending connection to end so that one from ``address`` fits: the oldest of the
        address holding the most, if it holds more than ``address`` does; else ``None``."""
        if not self._count:
            return None
        holder, held = self._count.most_common(1)[0]
        if held <= self._count[address]:
            return None
        return next(key for key, a in self._address_of.items() if a == holder)

    def admit_or_evict(self, key: object, address: str) -> tuple[str | None, object | None]:
        """:meth:`admit`, and when every place is taken, make room by :meth:`evict_for`:
        (the refusal or ``None``, the key evicted for it or ``None``; the caller closes that one)."""
        refusal = self.admit(key, address)
        if refusal is None or len(self._address_of) < self.total:
            return refusal, None
        evicted = self.evict_for(address)
        if evicted is None:
            return refusal, None
        self.done(evicted)
        return self.admit(key, address), evicted

    def keys(self) -> list[object]:
        return list(self._address_of)


class ClientRates:
    """One :class:`TokenBucket` per client (a token's name or an address), for at most
    ``max_clients`` clients: the one heard from least recently is forgotten first (its
    bucket starts full again), so memory is bounded whatever the number of addresses."""

    def __init__(self, per_minute: float, max_clients: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()

    def exhausted(self, client: str) -> bool:
        """Whether ``client``'s next offer would be refused (spends nothing)."""
        bucket = self._buckets.get(client)
        return bucket is not None and bucket.empty()

    def allow(self, client: str) -> bool:
        bucket = self._buckets.pop(client, None)
        if bucket is None:
            bucket = TokenBucket(self.per_minute / 60, self.per_minute, self.clock)
        self._buckets[client] = bucket  # now the most recent
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return bucket.allow()
