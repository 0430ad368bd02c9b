"""Attribution of real connections in a fresh network namespace, through the
BPF programs and through the procfs/sock_diag fallback."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.attribution import AttributionRecord, Attributor, netns_cookie
from agent.config import BpfSettings
from tests.integration.attribution.conftest import PORT
from tests.integration.attribution.nsutil import CLIENT_PYTHON, NOBODY, Client, NetNS


@contextmanager
def listener(ns: NetNS, host: str, port: int = PORT) -> Iterator[socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with ns.entered():
        srv = socket.socket(family, socket.SOCK_STREAM)
    try:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, port))
        srv.listen(16)
        srv.settimeout(10)
        yield srv
    finally:
        srv.close()


@contextmanager
def connected(ns: NetNS, srv: socket.socket, host: str) -> Iterator[tuple[Client, socket.socket]]:
    client = Client(ns, host, srv.getsockname()[1])
    try:
        conn, _ = srv.accept()
        with conn:
            yield client, conn
    finally:
        client.finish()


def lookup_in(ns: NetNS, attributor: Attributor, conn: socket.socket, dst: tuple[str, int]
              ) -> AttributionRecord:
    """lookup() from a thread inside ``ns``, as the agent's worker threads are."""
    with ns.entered():
        return attributor.lookup(conn, dst)


def assert_is_client(record: AttributionRecord, client: Client) -> None:
    assert record.process is not None, record
    process = record.process
    assert process["pid"] == client.pid == client.process.pid
    assert process["uid"] == process["euid"] == NOBODY
    assert process["gid"] == NOBODY
    assert process["comm"] == "python3"
    assert process["exe"] == os.path.realpath(CLIENT_PYTHON)
    assert process["cmdline"][:2] == [CLIENT_PYTHON, "-c"]
    ancestors = [a["pid"] for a in process["ancestry"]]
    assert os.getpid() in ancestors
    assert ancestors[-1] == 1
    assert process["start_time"] is not None


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_bpf_names_the_unprivileged_client(
    netns: NetNS, bpf_attributor: Attributor, host: str
) -> None:
    """A client running as nobody is named by the BPF map: pid, uid, comm, exe, ancestry."""
    assert bpf_attributor.mode == "bpf"
    with listener(netns, host) as srv, connected(netns, srv, host) as (client, conn):
        with netns.entered():
            record = bpf_attributor.lookup(conn, (host, PORT))
        assert record.source == "bpf", record
        assert record.verified, record
        assert record.reason is None
        assert record.netns_cookie == netns_cookie(conn)
        assert record.socket_cookie
        assert_is_client(record, client)
        process, attribution = record.to_record()
        assert process is record.process
        assert attribution["source"] == "bpf" and attribution["verified"] is True


def test_ipv4_client_on_dual_stack_listener(netns: NetNS, bpf_attributor: Attributor) -> None:
    """An IPv4 client accepted by an IPv6 socket (peer ::ffff:a.b.c.d) is found by its IPv4 key."""
    with listener(netns, "::") as srv, connected(netns, srv, "127.0.0.1") as (client, conn):
        assert conn.getpeername()[0] == "::ffff:127.0.0.1"
        with netns.entered():
            record = bpf_attributor.lookup(conn, ("::ffff:127.0.0.1", PORT))
        assert record.source == "bpf" and record.verified, record
        assert_is_client(record, client)


def test_destination_mismatch_is_not_verified(netns: NetNS, bpf_attributor: Attributor) -> None:
    """An original destination other than the one the client dialled leaves the record unverified."""
    with listener(netns, "127.0.0.1") as srv, connected(netns, srv, "127.0.0.1") as (client, conn):
        with netns.entered():
            record = bpf_attributor.lookup(conn, ("127.0.0.2", PORT))
        assert record.source == "bpf"
        assert not record.verified
        assert record.reason and "differs from the original destination" in record.reason
        assert_is_client(record, client)


def test_map_entry_is_deleted_when_the_client_closes(
    netns: NetNS, bpf_attributor: Attributor
) -> None:
    """The sock_ops state callback removes the entry once the client socket closes."""
    with listener(netns, "127.0.0.1") as srv, connected(netns, srv, "127.0.0.1") as (client, conn):
        cookie = netns_cookie(conn)
        entry = bpf_attributor.kernel_entry(cookie, client.address)
        assert entry is not None and entry.pid == client.pid and entry.uid == NOBODY
        assert entry.destination == ("127.0.0.1", PORT)
        client.close_socket()
        deadline = time.monotonic() + 5
        while bpf_attributor.kernel_entry(cookie, client.address) is not None:
            assert time.monotonic() < deadline, "entry still present 5 s after close"
            time.sleep(0.05)


def test_unprotected_port_is_not_tracked(netns: NetNS, bpf_attributor: Attributor) -> None:
    """Connections to ports outside the protected set never enter the map."""
    with listener(netns, "127.0.0.1", PORT + 1) as srv, connected(netns, srv, "127.0.0.1") as (
        client,
        conn,
    ):
        assert bpf_attributor.kernel_entry(netns_cookie(conn), client.address) is None
        with netns.entered():
            record = bpf_attributor.lookup(conn, ("127.0.0.1", PORT + 1))
        # Found anyway, through the fallback, and the record says why.
        assert record.source == "procfs", record
        assert record.reason and "no BPF map entry" in record.reason
        assert record.process is not None and record.process["pid"] == client.pid


def test_concurrent_lookups_from_worker_threads(netns: NetNS, bpf_attributor: Attributor) -> None:
    """lookup() is safe from several executor threads at once, as the proxy calls it."""
    with listener(netns, "127.0.0.1") as srv:
        clients = []
        try:
            conns = []
            for _ in range(6):
                clients.append(Client(netns, "127.0.0.1", PORT))
                conns.append(srv.accept()[0])
            with netns.entered(), ThreadPoolExecutor(4) as pool:
                records = list(
                    pool.map(lambda c: bpf_attributor.lookup(c, ("127.0.0.1", PORT)), conns * 5)
                )
            for conn in conns:
                conn.close()
        finally:
            for client in clients:
                client.finish()
    pids = {c.pid for c in clients}
    assert all(r.source == "bpf" and r.verified for r in records)
    assert {r.process["pid"] for r in records if r.process} == pids


def test_lookup_is_cheap(netns: NetNS, bpf_attributor: Attributor) -> None:
    """No compile per lookup: a lookup (map read + /proc enrichment) takes milliseconds."""
    with (
        listener(netns, "127.0.0.1") as srv,
        connected(netns, srv, "127.0.0.1") as (_, conn),
        netns.entered(),
    ):
        record = bpf_attributor.lookup(conn, ("127.0.0.1", PORT))
        started = time.perf_counter()
        for _ in range(50):
            record = bpf_attributor.lookup(conn, ("127.0.0.1", PORT))
        per_lookup = (time.perf_counter() - started) / 50
    assert record.source == "bpf"
    assert per_lookup < 0.02, f"{per_lookup * 1000:.1f} ms per lookup"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_procfs_fallback_names_the_client(netns: NetNS, tmp_path: Path, host: str) -> None:
    """With [bpf] mode = "off", sock_diag + the /proc fd scan find the same client."""
    attributor = Attributor(BpfSettings(mode="off"), [PORT], tmp_path)
    attributor.start()
    try:
        assert attributor.mode == "procfs"
        assert attributor.degraded_reason and "off" in attributor.degraded_reason
        with listener(netns, host) as srv, connected(netns, srv, host) as (client, conn):
            record = lookup_in(netns, attributor, conn, (host, PORT))
        assert record.source == "procfs", record
        assert record.verified
        assert record.socket_cookie is None
        assert record.reason == attributor.degraded_reason
        assert_is_client(record, client)
    finally:
        attributor.stop()


def test_client_in_another_namespace_is_remote(netns: NetNS, bpf_attributor: Attributor) -> None:
    """A peer whose address is not local to the agent's namespace is recorded as remote."""
    from tests.integration.attribution.nsutil import network_namespace

    with network_namespace() as other:
        veth_a, veth_b = f"rfa{other.name[-6:]}", f"rfb{other.name[-6:]}"
        netns.run("ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b,
                  "netns", other.name)
        netns.run("ip", "addr", "add", "192.0.2.1/24", "dev", veth_a)
        netns.run("ip", "link", "set", veth_a, "up")
        other.run("ip", "addr", "add", "192.0.2.2/24", "dev", veth_b)
        other.run("ip", "link", "set", veth_b, "up")
        with listener(netns, "192.0.2.1") as srv, connected(other, srv, "192.0.2.1") as (_, conn):
            record = lookup_in(netns, bpf_attributor, conn, ("192.0.2.1", PORT))
    assert record.source == "remote", record
    assert record.process is None
    assert record.reason and "192.0.2.2" in record.reason
