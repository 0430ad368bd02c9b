"""Transparent PostgreSQL interception end to end.

A network namespace plays the database host: a real PostgreSQL server on
5432 and the real agent (iptables REDIRECT, ``[redirect] method = "nat"``; BPF
attribution) in front of it. test_sk_lookup.py does the same with the sk_lookup
method, which the rest of the suite runs on by default.
Real psql and pgbench connect to 127.0.0.1:5432 exactly as they would
without the agent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.support.agent import REPO, RINGFENCE, AgentProcess, session_of_pid
from tests.support.netns import NetNS, connect_veth, netns
from tests.support.pgserver import (
    NOBODY,
    PgServer,
    as_nobody,
    pgserver,
    psql_argv,
    psql_as_nobody_matches_direct,
)

NAT = '[redirect]\nmethod = "nat"\n'
PY = shutil.which("python3") or "/usr/bin/python3"


def _capabilities() -> None:
    require(os.geteuid() == 0, "root")
    for tool in ("ip", "iptables-save", "ip6tables-save", "runuser", "setpriv", "bpftool"):
        require(shutil.which(tool) is not None, f"the {tool} command")
    require(Path("/usr/lib/postgresql").is_dir(), "a PostgreSQL server (postgresql package)")


@pytest.fixture(scope="module")
def host() -> Iterator[tuple[NetNS, PgServer]]:
    _capabilities()
    with netns("rfdb") as ns, pgserver(ns) as server:
        yield ns, server


@pytest.fixture(scope="module")
def agent(host: tuple[NetNS, PgServer]) -> Iterator[AgentProcess]:
    ns, _ = host
    workdir = Path(tempfile.mkdtemp(prefix="ringfence-agent-"))
    # Interception records everything and blocks nothing (pgbench -i drops tables).
    policy = workdir / "policy.toml"
    policy.write_text('[defaults]\nunidentified = "allow"\nrecord = "statements"\n')
    # TLS off, so what a garbage first byte means does not depend on the host's PostgreSQL config.
    services = ('[[protect]]\nname = "postgres"\nprotocol = "postgres"\nport = 5432\n'
                '[protect.tls]\ncert_file = ""\nkey_file = ""\n')
    agent = AgentProcess(ns, workdir, policy=policy, services=services, extra=NAT)
    agent.start()
    yield agent
    if agent.running:
        agent.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def ringfence_programs() -> list[dict[str, Any]]:
    root = next(line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                if line.split()[2] == "cgroup2")
    done = subprocess.run(["bpftool", "-j", "cgroup", "show", root], capture_output=True,
                          text=True, check=True)
    return [p for p in json.loads(done.stdout.strip() or "[]") if p.get("name", "").startswith("ringfence")]


def ringfence_rules(ns: NetNS) -> list[str]:
    out = []
    for save in ("iptables-save", "ip6tables-save"):
        out += [line for line in ns.run([save]).stdout.splitlines() if "RINGFENCE" in line]
    return out


def test_psql_output_identical_and_attributed(host: tuple[NetNS, PgServer], agent: AgentProcess) -> None:
    """psql as uid 65534 sees byte-identical output; the record has its uid, pid, exe, ancestry,
    statement, 1 row and tag SELECT 1."""
    ns, server = host
    pid = psql_as_nobody_matches_direct(ns, server, "select 42")

    recs = agent.wait_for(lambda rs: session_of_pid(rs, pid))
    start = next(r for r in recs if r["type"] == "session.start")
    assert start["attribution"]["source"] == "bpf"
    assert start["attribution"]["verified"] is True
    process = start["process"]
    assert process["uid"] == NOBODY and process["pid"] == pid
    assert process["exe"].endswith("/psql")
    assert process["ancestry"][0]["pid"] == os.getpid(), "the parent chain starts at the test runner"
    assert process["ancestry"][-1]["pid"] == 1
    assert start["target"]["user"] == "nobody" and start["target"]["database"] == "postgres"
    assert start["destination"] == {"ip": "127.0.0.1", "port": 5432}
    query = next(r for r in recs if r["type"] == "query")
    assert query["text"] == "select 42"
    result = next(r for r in recs if r["type"] == "result")
    assert result["rows"] == 1 and result["command_tag"] == "SELECT 1"
    end = next(r for r in recs if r["type"] == "session.end")
    assert end["statements"] == 1 and end["bytes_from_server"] > 0


def test_ipv6_client_is_intercepted(host: tuple[NetNS, PgServer], agent: AgentProcess) -> None:
    """A client dialling [::1]:5432 goes through the agent (ip6tables) and is attributed."""
    ns, server = host
    proc = ns.popen(as_nobody(psql_argv(server, "select 6", host="::1")), stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    recs = agent.wait_for(lambda rs: session_of_pid(rs, proc.pid))
    start = next(r for r in recs if r["type"] == "session.start")
    assert start["destination"]["ip"] == "::1"
    assert start["attribution"]["source"] == "bpf" and start["process"]["uid"] == NOBODY


def test_login_session_then_runuser_keeps_loginuid(
    host: tuple[NetNS, PgServer], agent: AgentProcess, tmp_path: Path
) -> None:
    """After a login (loginuid 1000) and runuser to nobody, the record has uid 65534,
    loginuid 1000 and the login's audit session id."""
    ns, server = host
    sid_file = tmp_path / "sessionid"
    script = textwrap.dedent(f"""
        echo 1000 > /proc/self/loginuid
        cat /proc/self/sessionid > {sid_file}
        exec runuser -u nobody -- {' '.join(psql_argv(server, "'select 7'"))}
    """)
    proc = ns.popen(["sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    audit_session = int(sid_file.read_text())
    # runuser forks psql as its child.
    recs = agent.wait_for(lambda rs: session_of_pid(rs, proc.pid, parent=True))
    process = next(r for r in recs if r["type"] == "session.start")["process"]
    assert process["uid"] == NOBODY
    assert process["loginuid"] == 1000
    assert process["audit_session"] == audit_session
    assert next(r for r in recs if r["type"] == "query")["text"] == "select 7"


def test_remote_client_recorded_with_source_address(
    host: tuple[NetNS, PgServer], agent: AgentProcess
) -> None:
    """A client on another host (namespace joined by veth) is caught by PREROUTING and
    recorded with its own address and attribution source 'remote'."""
    ns, server = host
    with netns("rfcl") as client:
        connect_veth(ns, "10.231.0.1", client, "10.231.0.2")
        done = client.run(psql_argv(server, "select 'remote'", host="10.231.0.1"))
        assert "remote" in done.stdout

        def remote_session(rs: list[dict[str, Any]]) -> dict[str, Any] | None:
            return next((r for r in rs if r["type"] == "session.start"
                         and r["source"]["ip"] == "10.231.0.2"), None)

        start = agent.wait_for(remote_session)
        assert start["attribution"]["source"] == "remote"
        assert start["destination"] == {"ip": "10.231.0.1", "port": 5432}
        assert start["process"] is None


def test_malformed_clients_end_only_their_own_session(
    host: tuple[NetNS, PgServer], agent: AgentProcess
) -> None:
    """Garbage startup, a truncated message, a 2^31 length and an unexpected TLS ClientHello each
    end their session with a session.end naming the reason, while a concurrent psql session
    completes normally."""
    ns, server = host
    slow = ns.popen(as_nobody(psql_argv(server, "select pg_sleep(2), 'still fine'")),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sender = textwrap.dedent("""
        import socket, struct, sys, time
        def send(data, close_after=0.3):
            s = socket.create_connection(("127.0.0.1", 5432))
            s.sendall(data)
            time.sleep(close_after)
            s.close()
        startup = b"user\\x00nobody\\x00database\\x00postgres\\x00\\x00"
        startup = struct.pack("!ii", len(startup) + 8, 196608) + startup
        send(b"GARBAGE that is no startup packet")
        send(b"\\x16\\x03\\x01 looks like a TLS ClientHello")
        send(startup + b"Q" + struct.pack("!i", 100) + b"select")
        send(startup + b"Q" + struct.pack("!i", 2**31 - 1))
    """)
    ns.run([PY, "-c", sender])
    out, err = slow.communicate(timeout=60)
    assert slow.returncode == 0 and b"still fine" in out, err

    def reasons(rs: list[dict[str, Any]]) -> list[str] | None:
        found = [r["reason"] for r in rs if r["type"] == "session.end"]
        wanted = ["invalid startup packet length", "truncated message", "exceeds the limit"]
        if all(any(w in f for f in found) for w in wanted):
            return found
        return None

    found = agent.wait_for(reasons)
    assert any("invalid startup packet length" in f for f in found)
    assert any("exceeds the limit" in f for f in found)
    assert any("truncated message: 11 bytes" in f for f in found)
    assert any("direct TLS (sslnegotiation=direct) requested" in f for f in found)


def test_pgbench_through_the_agent_has_no_failures(
    host: tuple[NetNS, PgServer], agent: AgentProcess
) -> None:
    """pgbench -i, then -S with 4 clients for 5 s, finishes with 0 failed transactions."""
    ns, server = host
    base = [server.tool("pgbench"), "-h", "127.0.0.1", "-p", "5432", "-U", "postgres"]
    ns.run([*base, "-i", "-s", "1", "postgres"], timeout=300)
    done = ns.run([*base, "-S", "-c", "4", "-T", "5", "postgres"], timeout=300)
    assert "number of failed transactions: 0" in done.stdout, done.stdout
    processed = int(done.stdout.split("number of transactions actually processed: ")[1].split()[0])
    assert processed > 0
    records = agent.records()
    selects = [r for r in records if r["type"] == "result" and r.get("command_tag") == "SELECT 1"]
    assert len(selects) >= processed


def attached_ids(agent: AgentProcess) -> set[int]:
    """Ids of the BPF programs this agent's state directory says it attached."""
    state = json.loads((agent.workdir / "state" / "bpf-attachments.json").read_text())
    return {int(p["id"]) for p in state["programs"]}


def test_kill_restart_and_clean_stop(host: tuple[NetNS, PgServer], agent: AgentProcess) -> None:
    """kill -9 leaves the rules (for ExecStopPost) but no BPF program; after a restart there
    is one set of rules and programs; after SIGTERM there are none, and psql still reaches
    the server directly."""
    ns, server = host
    rules_running = ringfence_rules(ns)
    assert rules_running, "the running agent has installed its chains"
    first = attached_ids(agent)
    present = {p["id"] for p in ringfence_programs()}
    assert len(first) == 3 and first <= present
    # Programs a killed agent elsewhere on the host left attached are not this agent's to remove.
    others = present - first
    agent.kill()
    assert ringfence_rules(ns), "a killed agent cannot remove its rules"
    assert not first & {p["id"] for p in ringfence_programs()}, \
        "the kernel released a killed agent's links, and with them its programs"
    agent.start()
    assert sorted(ringfence_rules(ns)) == sorted(rules_running), "no duplicate rules after restart"
    second = attached_ids(agent)
    attached = {p["id"] for p in ringfence_programs()}
    assert not first & attached
    assert len(second) == 3 and second <= attached
    done = ns.run(as_nobody(psql_argv(server, "select 'after restart'")))
    assert "after restart" in done.stdout

    assert agent.stop(signal.SIGTERM) == 0
    assert ringfence_rules(ns) == []
    assert {p["id"] for p in ringfence_programs()} <= others, "nothing this agent attached remains"
    done = ns.run(as_nobody(psql_argv(server, "select 'direct'")))
    assert "direct" in done.stdout
    records = [r for r in agent.records() if r["type"] != "checkpoint"]
    assert records[-1]["type"] == "agent.stop"


def test_redirect_status_and_clean_commands(host: tuple[NetNS, PgServer], tmp_path: Path) -> None:
    """`ringfence redirect status` lists the chains a (killed) agent left; `redirect clean`
    removes them in both families, and status then says none are installed."""
    ns, _ = host
    left = AgentProcess(ns, tmp_path / "left", bpf_mode="off", extra=NAT)
    left.start()
    left.kill()
    status = ns.run([*RINGFENCE, "redirect", "status"], env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert "ipv4: -A OUTPUT -j RINGFENCE_OUTPUT" in status.stdout
    assert "ipv6: -A PREROUTING -j RINGFENCE_PREROUTING" in status.stdout
    clean = ns.run([*RINGFENCE, "redirect", "clean"], env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert "removed 4 ringfence chain(s)" in clean.stdout
    assert ringfence_rules(ns) == []
    after = ns.run([*RINGFENCE, "redirect", "status"], env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert after.stdout.strip() == "no ringfence redirect rules installed"
