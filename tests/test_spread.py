"""Which gateway process takes the next connection (``gateway/spread.py``, ``gateway/handoff.py``).

The policy is tested on constructed states with a fake clock; the hand-off on
real Unix socket pairs in this process (no gateway processes: those are
``tests/test_processes.py``).
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from gateway.handoff import Outlet
from gateway.processes import Supervisor
from gateway.spread import MAX_PENDING, Spread
from stream.config import GatewaySettings


def test_the_process_with_the_fewest_sessions_takes_the_connection():
    spread = Spread()
    assert spread.choose({0: 5, 1: 2, 2: 3}, now=0.0) == 1
    assert spread.choose({}, now=0.0) is None


def test_a_burst_of_connections_alternates_before_any_becomes_a_session():
    spread = Spread()
    picks = []
    for _ in range(6):
        index = spread.choose({0: 0, 1: 0}, now=0.0)
        assert index is not None
        spread.handed(index, now=0.0)
        picks.append(index)
    assert picks == [0, 1, 0, 1, 0, 1]


def test_a_burst_fills_the_emptier_process_first():
    spread = Spread()
    picks = []
    for _ in range(4):
        index = spread.choose({0: 3, 1: 0}, now=1.0)
        assert index is not None
        spread.handed(index, now=1.0)
        picks.append(index)
    assert picks == [1, 1, 1, 0]  # 3 + 0 pending against 0 + 3, then the tie goes to the one handed least recently


def test_a_claimed_session_stops_counting_as_on_its_way():
    spread = Spread()
    spread.handed(0, now=0.0)
    spread.handed(0, now=0.0)
    assert spread.pending(0, now=0.1) == 2
    spread.claimed(0)  # the ledger now counts it as a session of 0
    assert spread.pending(0, now=0.1) == 1
    spread.claimed(0)
    spread.claimed(0)  # a claim with nothing on its way (never below nothing)
    assert spread.pending(0, now=0.1) == 0


def test_a_connection_that_never_becomes_a_session_stops_counting_after_settle_s():
    spread = Spread(settle_s=5.0)
    spread.handed(0, now=10.0)  # a /healthz request, say
    assert spread.pending(0, now=14.9) == 1
    assert spread.choose({0: 0, 1: 0}, now=14.9) == 1
    assert spread.pending(0, now=15.0) == 0
    assert spread.choose({0: 0, 1: 1}, now=15.0) == 0


def test_a_restarted_process_starts_with_nothing_on_its_way():
    spread = Spread()
    for _ in range(3):
        spread.handed(1, now=0.0)
    spread.forget([1])
    assert spread.pending(1, now=0.0) == 0


def test_what_is_remembered_per_process_is_bounded():
    spread = Spread(settle_s=1e9)
    for _ in range(MAX_PENDING + 10):
        spread.handed(0, now=0.0)
    assert spread.pending(0, now=0.0) == MAX_PENDING


# -- the hand-off, on real sockets --------------------------------------------------------


def _received(end: socket.socket) -> int:
    """How many descriptors arrived at a process's end of its hand-off socket (closing each)."""
    count = 0
    end.setblocking(False)
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(end, 16, 16)
        except BlockingIOError:
            return count
        for fd in fds:
            os.close(fd)
        count += len(fds)


async def test_connections_are_handed_evenly_and_a_process_that_stops_reading_is_passed_over():
    supervisor = Supervisor(GatewaySettings(), 2)
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        for index, (ours, _) in enumerate(pairs):
            supervisor.outlet_opened(Outlet(index, ours, supervisor.outlet_closed))
        assert supervisor.can_hand.is_set()
        client, accepted = socket.socketpair()  # stands for a connection accepted on the gateway's port
        with client, accepted:
            picks = [supervisor.hand(accepted, now=0.0) for _ in range(4)]
            assert picks == [0, 1, 0, 1]
            assert [_received(theirs) for _, theirs in pairs] == [2, 2]

            # Process 0 stops reading: its socket's buffer fills, and the connections go to 1.
            stuck, other = 0, 0
            for _ in range(10_000):
                index = supervisor.hand(accepted, now=0.0)
                if index == 0:
                    stuck += 1
                else:
                    other += 1
                    _received(pairs[1][1])
                if other > stuck + 50:
                    break
            assert other > stuck + 50, (stuck, other)
            assert 0 in supervisor.outlets  # full is not gone
            _received(pairs[0][1])
    finally:
        for outlet in list(supervisor.outlets.values()):
            outlet.close()
        for _, theirs in pairs:
            theirs.close()


async def test_a_process_that_closed_its_end_is_dropped_and_none_left_means_none_is_accepted():
    supervisor = Supervisor(GatewaySettings(), 2)
    ours, theirs = socket.socketpair()
    supervisor.outlet_opened(Outlet(0, ours, supervisor.outlet_closed))
    theirs.close()  # the process exited
    async with asyncio.timeout(5):
        while supervisor.outlets:
            await asyncio.sleep(0.01)
    assert not supervisor.can_hand.is_set()
    client, accepted = socket.socketpair()
    with client, accepted:
        assert supervisor.hand(accepted, now=0.0) is None


@pytest.mark.parametrize("hello", [b"", b"not a number\n"])
async def test_a_hand_off_connection_that_does_not_say_which_process_it_is_is_closed(tmp_path, hello):
    from gateway.handoff import accept_outlets

    path = str(tmp_path / "handoff.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    opened: list[Outlet] = []
    task = asyncio.create_task(accept_outlets(listener, opened.append, lambda outlet: None))
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(hello)
        writer.write_eof()
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # closed by the supervisor
        writer.close()
        assert opened == []
    finally:
        task.cancel()
        listener.close()
