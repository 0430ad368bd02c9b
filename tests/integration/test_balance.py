"""The program that balances new connections over a group of SO_REUSEPORT listeners by
their event loops' session counts (agent.balance), against the kernel itself."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import pytest

from agent import bpfsys
from agent.balance import (
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
    BPF_PROG_TYPE_SK_REUSEPORT,
    BPF_SK_REUSEPORT_SELECT,
    Balancer,
    SessionCount,
    program,
)
from tests.conftest import require
from tests.support.netns import NetNS, call_in, netns


@pytest.fixture
def ns() -> Iterator[NetNS]:
    """A namespace of its own (loopback up) for each test's sockets, so the port is free."""
    require(os.geteuid() == 0, "root")
    with netns("rflb") as namespace:
        yield namespace


def listeners(count: int, port: int = 5999) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        sock.setblocking(False)
        socks.append(sock)
    return socks


def spread(socks: list[socket.socket], connections: int, port: int = 5999) -> list[int]:
    """Open ``connections`` connections; how many each listener accepted."""
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    accepted = [0] * len(socks)
    for index, sock in enumerate(socks):
        while True:
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                break
            conn.close()
            accepted[index] += 1
    for client in clients:
        client.close()
    return accepted


@contextlib.contextmanager
def balanced(sockets: int, loops: int) -> Iterator[tuple[list[socket.socket], Balancer]]:
    """``sockets`` listeners and a balancer for ``loops`` event loops, closed afterwards."""
    socks = listeners(sockets)
    balancer = Balancer(loops)
    try:
        yield socks, balancer
    finally:
        balancer.close()
        for sock in socks:
            sock.close()


def test_each_connection_goes_to_the_loop_with_the_fewest_sessions(ns: NetNS) -> None:
    call_in(ns, fewest)


def fewest() -> None:
    with balanced(3, 3) as (socks, balancer):
        balancer.attach(socks)
        counts = [SessionCount(balancer.counts_fd, slot) for slot in range(3)]
        for loads, expected in (((5, 0, 5), [0, 6, 0]), ((0, 5, 5), [6, 0, 0]),
                                ((7, 7, 2), [0, 0, 6])):
            for count, load in zip(counts, loads, strict=True):
                count.set(load)
            assert spread(socks, 6) == expected, loads
        # Equal counts: the connection's hash picks where the scan starts, so a burst that
        # no loop has counted yet still spreads (all 60 on one socket: odds of 3 in 3^60).
        for count in counts:
            count.set(1)
        assert all(accepted > 0 for accepted in spread(socks, 60))


@pytest.mark.parametrize("loops", [2, 3, 4, 8, 64])
def test_the_kernel_accepts_the_program_for_any_number_of_loops(loops: int) -> None:
    """[agent] workers goes up to 64: the program for each size passes the verifier."""
    require(os.geteuid() == 0, "root")
    counts = bpfsys.map_create(BPF_MAP_TYPE_ARRAY, 4, 8, loops, "rf_sessions")
    sockets = bpfsys.map_create(BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, loops, "rf_listeners")
    try:
        prog = bpfsys.prog_load(BPF_PROG_TYPE_SK_REUSEPORT, program(loops, counts, sockets),
                                "ringfence_lb", BPF_SK_REUSEPORT_SELECT, verifier_log=True)
        os.close(prog)
    finally:
        os.close(counts)
        os.close(sockets)


def test_a_group_of_the_wrong_size_is_refused(ns: NetNS) -> None:
    call_in(ns, wrong_size)


def wrong_size() -> None:
    with balanced(2, 3) as (socks, balancer), pytest.raises(
            ValueError, match="2 sockets for 3 event loops"):
        balancer.attach(socks)


def test_doctor_says_whether_new_sessions_are_balanced() -> None:
    """`ringfence doctor` tries the program on a scratch group of listeners when there are
    several event loops, and says nothing of balancing when there is one or it is off."""
    from agent.config import parse_config
    from agent.doctor import _balance_check

    require(os.geteuid() == 0, "root")
    check = _balance_check(parse_config({"agent": {"workers": 3}}))
    assert check is not None and check.ok, check
    assert check.detail == "new sessions go to the event loop with the fewest (3 loops)"
    assert _balance_check(parse_config({"agent": {"workers": 1}})) is None
    assert _balance_check(parse_config({"agent": {"workers": 3, "balance": "hash"}})) is None
    assert _balance_check(parse_config({"agent": {"workers": 3},
                                        "bpf": {"mode": "off"}})) is None
