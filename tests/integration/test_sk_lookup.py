"""``[redirect] method = "sk_lookup"``: protected ports steered to the agent by a BPF program
at the kernel's socket lookup, with no address translated and no connection tracked.

A network namespace plays the database host, as in test_postgres_interception.py: a real
PostgreSQL server on 5432, the real agent with two event loops in front of it, and real
psql and pgbench connecting to 5432 as they would without it.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import bpfsys
from agent.sklookup import (
    BPF_MAP_TYPE_HASH,
    Exemptions,
    SkLookup,
    SkLookupError,
    exemption_key,
)
from tests.conftest import require
from tests.support.agent import REPO, RINGFENCE, AgentProcess, session_of_pid, sessions
from tests.support.netns import NetNS, connect_veth, netns
from tests.support.pgserver import (
    NOBODY,
    PgServer,
    as_nobody,
    pgserver,
    psql_argv,
    psql_as_nobody_matches_direct,
)

SERVICES = ('[[protect]]\nname = "postgres"\nprotocol = "postgres"\nport = 5432\n'
            '[protect.tls]\ncert_file = ""\nkey_file = ""\n')
ENV = dict(os.environ, PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def host() -> Iterator[tuple[NetNS, PgServer]]:
    require(os.geteuid() == 0, "root")
    for tool in ("ip", "iptables-save", "ip6tables-save", "setpriv"):
        require(shutil.which(tool) is not None, f"the {tool} command")
    require(Path("/usr/lib/postgresql").is_dir(), "a PostgreSQL server (postgresql package)")
    with netns("rfsk") as ns, pgserver(ns) as server:
        yield ns, server


def _agent(ns: NetNS, workdir: Path, redirect: str = "") -> AgentProcess:
    policy = workdir / "policy.toml"
    workdir.mkdir(parents=True, exist_ok=True)
    policy.write_text('[defaults]\nunidentified = "allow"\nrecord = "statements"\n')
    return AgentProcess(ns, workdir, policy=policy, services=SERVICES,
                        agent_settings="workers = 2",
                        extra=f'[redirect]\nmethod = "sk_lookup"\n{redirect}')


@pytest.fixture(scope="module")
def agent(host: tuple[NetNS, PgServer]) -> Iterator[AgentProcess]:
    ns, _ = host
    workdir = Path(tempfile.mkdtemp(prefix="ringfence-agent-"))
    agent = _agent(ns, workdir)
    agent.start()
    yield agent
    if agent.running:
        agent.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def nat_tables(ns: NetNS) -> list[str]:
    """The nat tables in the namespace, either family: none means nothing is tracked for
    address translation."""
    return [f"{save}: {line}" for save in ("iptables-save", "ip6tables-save")
            for line in ns.run([save]).stdout.splitlines() if line.strip() == "*nat"]


def redirect_status(ns: NetNS) -> str:
    return ns.run([*RINGFENCE, "redirect", "status"], env=ENV).stdout


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_local_client_is_intercepted_without_address_translation(
    host: tuple[NetNS, PgServer], agent: AgentProcess, address: str
) -> None:
    """psql dialling 5432 sees what it sees directly; the session is recorded with the
    address it dialled and its process, and the namespace has no nat table."""
    ns, server = host
    pid = psql_as_nobody_matches_direct(ns, server, "select 42", host=address)

    recs = agent.wait_for(lambda rs: session_of_pid(rs, pid))
    start = next(r for r in recs if r["type"] == "session.start")
    assert start["destination"] == {"ip": address, "port": 5432}
    assert start["attribution"]["source"] == "bpf" and start["attribution"]["verified"] is True
    assert start["process"]["uid"] == NOBODY
    assert next(r for r in recs if r["type"] == "query")["text"] == "select 42"
    assert nat_tables(ns) == []
    agent_start = next(r for r in agent.records() if r["type"] == "agent.start")
    assert agent_start["redirect_method"] == "sk_lookup"
    assert agent_start["redirect_families"] == ["ipv4", "ipv6"]
    assert "sk_lookup: program" in redirect_status(ns)


def test_pgbench_over_both_event_loops(host: tuple[NetNS, PgServer], agent: AgentProcess) -> None:
    """pgbench's clients are spread over the agent and its session worker, whose own
    connections to the server pass the program: no failure, every session recorded."""
    ns, server = host
    ns.run([server.tool("pgbench"), "-i", "-q", "-s", "1", "-h", str(server.sockdir),
            "-U", "postgres", "postgres"], timeout=120)
    before = set(sessions(agent.records()))
    done = ns.run([server.tool("pgbench"), "-h", "127.0.0.1", "-p", "5432", "-U", "postgres",
                   "-S", "-n", "-c", "4", "-j", "2", "-t", "200", "postgres"], timeout=120)
    assert "number of failed transactions: 0" in done.stdout, done.stdout
    agent_start = next(r for r in agent.records() if r["type"] == "agent.start")
    loops = {agent.process.pid if agent.process else 0, *agent_start["worker_pids"]}
    assert len(loops) == 2

    def pgbench_sessions(rs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        # Its four clients, 200 transactions each (not the connection it opens first).
        starts = [recs[0] for sid, recs in sessions(rs).items() if sid not in before
                  and recs[0]["type"] == "session.start" and recs[-1]["type"] == "session.end"
                  and recs[-1]["statements"] == 200]
        return starts if len(starts) == 4 else None

    starts = agent.wait_for(pgbench_sessions)
    assert {s["agent_pid"] for s in starts} == loops


def test_the_agents_upstream_ports_are_not_left_in_time_wait(
    host: tuple[NetNS, PgServer], agent: AgentProcess
) -> None:
    """Sessions ended by the client's Terminate leave no TIME_WAIT on the agent's upstream
    ports (bound, not chosen at connect, so one held would be unusable for a minute): the
    server closes first. The only TIME_WAITs toward port 5432 are the clients' own."""
    ns, server = host
    for n in range(5):
        ns.run(as_nobody(psql_argv(server, f"select {n}")))
    assert_no_agent_port_waits(ns, agent)


def assert_no_agent_port_waits(ns: NetNS, agent: AgentProcess) -> None:
    """The only TIME_WAITs toward port 5432 in the namespace are the recorded clients'."""
    clients = {r["source"]["port"] for r in agent.records() if r["type"] == "session.start"}
    waiting = set()
    for line in ns.run(["ss", "-Htan", "state", "time-wait"]).stdout.splitlines():
        local, peer = line.split()[-2:]
        if peer.endswith(":5432"):
            waiting.add(int(local.rsplit(":", 1)[1]))
    assert waiting, "no TIME_WAIT at all: the clients' own connections should show"
    assert waiting <= clients, f"agent upstream ports in TIME_WAIT: {sorted(waiting - clients)}"


# A client that leaves without a Terminate: its process ends with the connection open and
# idle, the kernel closing the socket (with a reset when argv[1] is "reset").
_VANISHING_CLIENT = """
import os, socket, struct, sys
import psycopg
conn = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres",
                       autocommit=True)
conn.execute("select 1")
print(conn.info.backend_pid, flush=True)
if sys.argv[1] == "reset":
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
os._exit(0)
"""


@pytest.mark.parametrize("ending", ["close", "reset"])
def test_clients_gone_without_a_terminate_leave_the_agents_ports_free(
    host: tuple[NetNS, PgServer], agent: AgentProcess, ending: str
) -> None:
    """Clients that end an idle connection without a Terminate (a killed process, a pool
    dropping its sockets): the agent sends the server the Terminate in their place, so
    the server closes first again and no TIME_WAIT holds an upstream port the agent binds;
    the sessions end as the clients left them, and their backends are gone."""
    ns, server = host
    pids = []
    for _ in range(3):
        done = ns.run([sys.executable, "-c", _VANISHING_CLIENT, ending], cwd=str(REPO), env=ENV)
        pids.append(int(done.stdout))

    def ended(rs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        ends = [recs[-1] for recs in sessions(rs).values()
                if recs[-1]["type"] == "session.end" and recs[-1].get("backend_pid") in pids]
        return ends if len(ends) == len(pids) else None

    ends = agent.wait_for(ended)
    if ending == "close":
        assert {e["reason"] for e in ends} == {"client closed"}
        assert {e["outcome"] for e in ends} == {"success"}
    else:
        assert all(e["reason"].startswith("client connection error") for e in ends), ends
    assert_no_agent_port_waits(ns, agent)
    count = [*psql_argv(server, "select count(*) from pg_stat_activity where pid in "
                                f"({', '.join(map(str, pids))})", host=str(server.sockdir)), "-At"]
    deadline = time.monotonic() + 10
    while (alive := ns.run(as_nobody(count)).stdout.strip()) != "0":
        assert time.monotonic() < deadline, f"{alive} of the backends still running"
        time.sleep(0.1)


@pytest.mark.parametrize("local, remote, release", [(True, True, "5.9"), (True, False, "5.17"),
                                                     (False, True, "5.17")])
def test_a_kernel_that_refuses_the_program_is_told_which_release_it_needs(
    monkeypatch: pytest.MonkeyPatch, local: bool, remote: bool, release: str
) -> None:
    """Telling local clients from remote ones reads a field Linux 5.17 added: the error
    names the release the configured program needs."""
    require(os.geteuid() == 0, "root")

    def refuse(*args: Any, **kwargs: Any) -> int:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(bpfsys, "prog_load", refuse)
    steering = SkLookup(local=local, remote=remote)
    try:
        with pytest.raises(SkLookupError) as refused:
            steering.probe()
    finally:
        steering.close()
    assert str(refused.value) == (f"the kernel refused the sk_lookup program (Linux {release} "
                                  "or later is needed): Invalid argument")


def test_an_exempted_address_and_port_are_the_agents_alone() -> None:
    """While the agent's upstream socket connects, its address and port pass the program;
    no other socket can bind them meanwhile (SO_REUSEADDR included), and the exemption
    goes when the connection is made."""
    require(os.geteuid() == 0, "root")
    exempt = bpfsys.map_create(BPF_MAP_TYPE_HASH, 24, 1, 16, "rf_test_exempt")
    try:
        sock = socket.socket()
        with sock, Exemptions(exempt).connecting(sock, ("127.0.0.1", 5432)):
            address, port = sock.getsockname()
            key = exemption_key(socket.AF_INET, address, port)
            assert bpfsys.map_lookup(exempt, key, 1) == b"\1"
            with socket.socket() as other:
                other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                with pytest.raises(OSError) as refused:
                    other.bind((address, port))
                assert refused.value.errno == errno.EADDRINUSE
        assert bpfsys.map_lookup(exempt, key, 1) is None
    finally:
        os.close(exempt)


def test_remote_client_is_intercepted(host: tuple[NetNS, PgServer], agent: AgentProcess) -> None:
    """A client on another host (a namespace joined by veth) is steered to the agent too,
    and recorded with its own address and the one it dialled."""
    ns, server = host
    with netns("rfskc") as client:
        connect_veth(ns, "10.232.0.1", client, "10.232.0.2")
        done = client.run([server.tool("psql"), "-X", "-h", "10.232.0.1", "-p", "5432",
                           "-U", "postgres", "-d", "postgres", "-c", "select 'remote'"])
        assert "remote" in done.stdout

        def remote_session(rs: list[dict[str, Any]]) -> dict[str, Any] | None:
            return next((r for r in rs if r["type"] == "session.start"
                         and r["source"]["ip"] == "10.232.0.2"), None)

        start = agent.wait_for(remote_session)
        assert start["destination"] == {"ip": "10.232.0.1", "port": 5432}
        assert start["attribution"]["source"] == "remote"


def test_the_listener_port_itself_is_refused(
    host: tuple[NetNS, PgServer], agent: AgentProcess
) -> None:
    """Dialling the agent's listener directly is no way around the policy."""
    ns, server = host
    done = subprocess.run(ns.argv(as_nobody(psql_argv(server, "select 1", port=15432))),
                          capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    assert "only accepts redirected connections" in done.stderr



@pytest.mark.parametrize("method", ["sk_lookup", "nat"])
def test_a_second_agent_in_the_namespace_is_refused(
    host: tuple[NetNS, PgServer], agent: AgentProcess, tmp_path: Path, method: str
) -> None:
    """A second agent here, by either method, would take the first one's ports (and remove
    its rules when it stopped): it refuses to start, naming the first, which goes on
    protecting; `redirect clean` and `cleanup` refuse too while an agent runs."""
    ns, server = host
    assert agent.process is not None
    first = f"(pid {agent.process.pid})"
    second = AgentProcess(ns, tmp_path / "second", services=SERVICES,
                          extra=f'[redirect]\nmethod = "{method}"\n')
    with pytest.raises(RuntimeError) as refused:
        second.start()
    assert f"another ringfence agent {first} is running in this network namespace" \
        in str(refused.value)
    assert second.process is not None and second.process.returncode == 1
    for command in (["redirect", "clean"], ["cleanup", "--config", str(second.config)]):
        done = subprocess.run(ns.argv([*RINGFENCE, *command]), env=ENV, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 1, done.stdout
        assert f"a ringfence agent {first} is running in this network namespace" in done.stderr
    assert "sk_lookup: program" in redirect_status(ns)
    if method == "sk_lookup":  # (the running agent's own ports are no conflict to doctor)
        doctor = subprocess.run(ns.argv([*RINGFENCE, "doctor", "--config", str(agent.config)]),
                                capture_output=True, text=True, env=ENV, timeout=120)
        assert ("OK    listener ports: in use by the agent running in this network namespace "
                f"{first}: [0.0.0.0]:15432") in doctor.stdout, doctor.stdout
    pid = psql_as_nobody_matches_direct(ns, server, "select 'still protected'")
    recs = agent.wait_for(lambda rs: session_of_pid(rs, pid))
    assert any(r["type"] == "query" and r["text"] == "select 'still protected'" for r in recs)

@pytest.fixture
def alone(host: tuple[NetNS, PgServer], agent: AgentProcess) -> tuple[NetNS, PgServer]:
    """The host without the module's agent: one agent a host, as in production (a second
    one would share its listeners' port, and each program would claim the connections)."""
    if agent.running:
        agent.stop()
    return host


def test_local_only_leaves_remote_clients_alone(
    alone: tuple[NetNS, PgServer], tmp_path: Path
) -> None:
    """With ``remote = false`` a client on another host reaches the server itself, unrecorded,
    while a client on this host is still intercepted."""
    ns, server = alone
    local_only = _agent(ns, tmp_path / "agent", "local = true\nremote = false\n")
    local_only.start()
    try:
        with netns("rfskr") as client:
            connect_veth(ns, "10.233.0.1", client, "10.233.0.2")
            done = client.run([server.tool("psql"), "-X", "-h", "10.233.0.1", "-p", "5432",
                               "-U", "postgres", "-d", "postgres", "-c", "select 'remote'"])
            assert "remote" in done.stdout
        proc = ns.popen(as_nobody(psql_argv(server, "select 'local'")), stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        local_only.wait_for(lambda rs: session_of_pid(rs, proc.pid))
        assert not [r for r in local_only.records() if r["type"] == "session.start"
                    and r["source"]["ip"] == "10.233.0.2"]
    finally:
        local_only.stop()


@pytest.mark.parametrize("end", ["stop", "kill"])
def test_the_program_goes_with_the_agent(
    alone: tuple[NetNS, PgServer], tmp_path: Path, end: str
) -> None:
    """However the agent ends, its program goes with it and nothing is left to clean up:
    clients reach the server directly again (as with fail_closed = false)."""
    ns, server = alone
    short = _agent(ns, tmp_path / "agent")
    short.start()
    assert "sk_lookup: program" in redirect_status(ns)
    if end == "stop":
        assert short.stop() == 0
    else:
        short.kill()
    assert "sk_lookup" not in redirect_status(ns)
    done = ns.run(as_nobody(psql_argv(server, "select 'direct'")))
    assert "direct" in done.stdout
    assert not [r for r in short.records() if r["type"] == "query"]


def test_doctor_tries_the_program(alone: tuple[NetNS, PgServer], tmp_path: Path) -> None:
    """`ringfence doctor` with method = "sk_lookup" loads and attaches the program (and
    removes it) instead of trying iptables REDIRECT rules."""
    ns, _ = alone
    config = _agent(ns, tmp_path / "agent").config
    done = subprocess.run(ns.argv([*RINGFENCE, "doctor", "--config", str(config)]),
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert "OK    sk_lookup redirect: program loaded and attached" in done.stdout, done.stdout
    assert "nat REDIRECT" not in done.stdout
    assert "sk_lookup" not in redirect_status(ns)


@pytest.mark.parametrize("setting, method", [
    ("", "sk_lookup"), ("fail_closed", "nat"), ("bpf off", "nat"),
])
def test_auto_steers_unless_fail_closed_or_bpf_off(
    alone: tuple[NetNS, PgServer], tmp_path: Path, setting: str, method: str
) -> None:
    """The default method, "auto", steers with sk_lookup; with fail_closed = true (which only
    iptables rules can keep) or BPF turned off it redirects with iptables REDIRECT."""
    ns, server = alone
    workdir = tmp_path / "agent"
    workdir.mkdir()
    agent = AgentProcess(ns, workdir, services=SERVICES,
                         bpf_mode="off" if setting == "bpf off" else "required",
                         agent_settings=f"fail_closed = {str(setting == 'fail_closed').lower()}")
    agent.start()
    try:
        done = ns.run([server.tool("psql"), "-X", "-h", "127.0.0.1", "-U", "postgres",
                       "-d", "postgres", "-tAc", "select 'auto'"])
        assert done.stdout.strip() == "auto"
        agent.wait_for(lambda rs: any(r["type"] == "session.end" for r in rs))
        start = next(r for r in agent.records() if r["type"] == "agent.start")
        assert start["redirect_method"] == method
        assert bool(nat_tables(ns)) == (method == "nat")
        assert ("sk_lookup: program" in redirect_status(ns)) == (method == "sk_lookup")
    finally:
        agent.stop()
