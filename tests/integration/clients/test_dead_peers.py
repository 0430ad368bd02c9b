"""A client that vanishes without a word (power loss, a network cut) is noticed through the
agent: TCP keepalive, which PostgreSQL turns on for its own clients, ends the session, and the
client's backend and locks go with it."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from agent.protocols import postgres as pg
from tests.integration.clients.conftest import Host, app_name, wait_sessions
from tests.support.netns import call_in
from tests.support.pgwire import until_ready

# Fast keepalive timing for this namespace only (sysctls are per network namespace).
KEEPALIVE = {"tcp_keepalive_time": "2", "tcp_keepalive_intvl": "1", "tcp_keepalive_probes": "2"}


@pytest.fixture
def fast_keepalive(pghost: Host) -> Iterator[None]:
    def sysctl(name: str, value: str | None = None) -> str:
        argv = ["sysctl", "-n", f"net.ipv4.{name}"] if value is None else \
            ["sysctl", "-q", "-w", f"net.ipv4.{name}={value}"]
        return pghost.ns.run(argv).stdout.strip()

    saved = {name: sysctl(name) for name in KEEPALIVE}
    for name, value in KEEPALIVE.items():
        sysctl(name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            sysctl(name, value)


def open_transaction(address: str | tuple[str, int], app: str) -> socket.socket:
    """A client that took a lock in an open transaction and then went silent."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(address)
    sock.sendall(pg.startup_message({"user": "postgres", "database": "postgres",
                                     "application_name": app}))
    until_ready(sock)
    for sql in ("create table if not exists vanish (id int)",
                "begin; lock table vanish in access exclusive mode"):
        sock.sendall(pg.query_message(sql))
        until_ready(sock)
    return sock


def backends(host: Host, app: str) -> int:
    done = host.psql(
        "-Atc", f"select count(*) from pg_stat_activity where application_name = '{app}'",
        direct=True)
    return int(done.stdout.strip())


def test_a_vanished_client_loses_its_backend_and_locks(pghost: Host, fast_keepalive: None) -> None:
    app = app_name("vanished")
    client = call_in(pghost.ns, lambda: open_transaction(("127.0.0.1", 5432), app))
    port = client.getsockname()[1]
    time.sleep(0.5)  # the client's last (delayed) ACK goes out: nothing is left unacknowledged
    cut = [["iptables", "-w", "-I", "OUTPUT", "-p", "tcp", flag, str(port), "-j", "DROP"]
           for flag in ("--sport", "--dport")]
    try:
        for rule in cut:
            pghost.ns.run(rule)  # nothing reaches the client, nothing leaves it: it is gone
        assert backends(pghost, app) == 1
        deadline = time.monotonic() + 30
        while backends(pghost, app) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert backends(pghost, app) == 0
        # The lock went with it: another session takes it at once.
        pghost.psql("-c", "begin; set local lock_timeout = '2s'; lock table vanish; commit",
                    direct=True)
    finally:
        for rule in cut:
            pghost.ns.run([arg if arg != "-I" else "-D" for arg in rule])
        client.close()
    end = next(r for r in wait_sessions(pghost.agent, app)[0] if r["type"] == "session.end")
    assert end["outcome"] == "failure"
