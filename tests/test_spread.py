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


def burst(spread: Spread, sessions: dict[int, int], connections: int, now: float) -> list[int]:
    """Where ``connections`` arriving at once go, none of them a session yet."""
    picks = []
    for _ in range(connections):
        index = spread.choose(sessions, now)
        assert index is not None
        spread.handed(index, now)
        picks.append(index)
    return picks


def test_a_burst_of_connections_alternates_before_any_becomes_a_session():
    assert burst(Spread(), {0: 0, 1: 0}, 6, now=0.0) == [0, 1, 0, 1, 0, 1]


def test_a_burst_fills_the_emptier_process_first():
    # 3 + 0 on its way against 0 + 3, then the tie goes to the one handed least recently
    assert burst(Spread(), {0: 3, 1: 0}, 4, now=1.0) == [1, 1, 1, 0]


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


async def test_a_process_whose_end_is_gone_is_dropped_when_a_connection_cannot_be_sent():
    supervisor = Supervisor(GatewaySettings(), 2)
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        for index, (ours, _) in enumerate(pairs):
            supervisor.outlet_opened(Outlet(index, ours, supervisor.outlet_closed))
        pairs[0][1].close()  # process 0 exited; the supervisor has not read the end of file yet
        client, accepted = socket.socketpair()
        with client, accepted:
            assert supervisor.hand(accepted, now=0.0) == 1  # 0 failed with EPIPE, 1 took it
        assert list(supervisor.outlets) == [1]
        assert _received(pairs[1][1]) == 1
    finally:
        for outlet in list(supervisor.outlets.values()):
            outlet.close()
        pairs[1][1].close()


async def test_a_hand_off_of_an_index_not_in_the_gateway_is_refused():
    supervisor = Supervisor(GatewaySettings(), 2)
    ours, theirs = socket.socketpair()
    with theirs:
        supervisor.outlet_opened(Outlet(7, ours, supervisor.outlet_closed))
        assert supervisor.outlets == {} and not supervisor.can_hand.is_set()
        assert theirs.recv(1) == b""  # closed


async def test_a_connection_accepted_by_the_supervisor_reaches_the_process_and_still_works(tmp_path):
    from gateway.handoff import Inlet, accept_outlets

    path = str(tmp_path / "handoff.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    supervisor = Supervisor(GatewaySettings(), 1)
    outlets = asyncio.create_task(accept_outlets(listener, supervisor.outlet_opened, supervisor.outlet_closed))
    adopted: asyncio.Queue[socket.socket] = asyncio.Queue()
    inlet = Inlet(path, 0, adopted.put_nowait)
    try:
        await inlet.connect()
        async with asyncio.timeout(5):
            await supervisor.can_hand.wait()
        client, accepted = socket.socketpair()
        with client:
            with accepted:
                assert supervisor.hand(accepted, now=0.0) == 0
            async with asyncio.timeout(5):
                taken = await adopted.get()
            with taken:  # the supervisor's copy is closed; the process's copy is the connection
                assert not taken.get_inheritable()
                client.sendall(b"hello")
                taken.settimeout(5)
                assert taken.recv(5) == b"hello"
        supervisor.outlets[0].close()  # the supervisor stops: the process hears it
        async with asyncio.timeout(5):
            await inlet.closed.wait()
    finally:
        inlet.close()
        outlets.cancel()
        listener.close()
