"""Loopback-only ICE, for tests and machines whose only interface is ``lo``.

aioice leaves 127.0.0.1 out of its host candidates, so on such a machine ICE
never completes. This adds it. A gateway option (``loopback_ice``), never the
default: on a real network, a loopback candidate is useless to the peer.
"""

from __future__ import annotations

import aioice.ice

_original = aioice.ice.get_host_addresses


def _with_loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    addresses = _original(use_ipv4, use_ipv6)
    if use_ipv4 and "127.0.0.1" not in addresses:
        addresses.append("127.0.0.1")
    return addresses


def allow_loopback_ice() -> None:
    aioice.ice.get_host_addresses = _with_loopback
