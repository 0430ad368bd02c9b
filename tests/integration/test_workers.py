"""Session workers: several event loops carry sessions, and nothing a client or the audit
trail sees depends on which one carries a session."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.support.agent import REPO, AgentProcess, sessions
from tests.support.netns import NetNS, netns
from tests.support.pgserver import PgServer, pgserver

POLICY = '[defaults]\nunidentified = "allow"\nrecord = "statements"\n'
BLOCK_READS = POLICY + textwrap.dedent("""
    [[rule]]
    id = "no-reads-of-ledger"
    effect = "block"
    objects = ["ledger"]
    classes = ["read"]
    reason = "the ledger is off limits"
""")
CONNECTIONS = 16  # spread over two event loops: all on one has odds of 2 in 65,536
CONNINFO = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"

# Holds CONNECTIONS sessions: says "ready", waits for a line, then reads the ledger in each.
HOLD = textwrap.dedent(f"""
    import json, sys, psycopg
    conns = [psycopg.connect({CONNINFO!r}, autocommit=True,
                             application_name=sys.argv[1] + str(i)) for i in range({CONNECTIONS})]
    for c in conns:
        c.execute("select count(*) from ledger").fetchall()
    print("ready", flush=True)
    sys.stdin.readline()
    out = []
    for c in conns:
        try:
            c.execute("select count(*) from ledger").fetchall()
            out.append("ok")
        except psycopg.Error as e:
            out.append(e.sqlstate)
    print(json.dumps(out), flush=True)
""")

# Opens ("open PREFIX COUNT", one after another, each past a statement) and closes ("close
# NAME...") sessions named by application_name as told on stdin; "ok" after each command.
CONTROL = textwrap.dedent(f"""
    import sys, psycopg
    conns = {{}}
    for line in sys.stdin:
        command, *args = line.split()
        if command == "open":
            for i in range(int(args[1])):
                name = args[0] + str(i)
                conns[name] = psycopg.connect({CONNINFO!r}, autocommit=True,
                                              application_name=name)
                conns[name].execute("select 1")
        else:
            for name in args:
                conns.pop(name).close()
        print("ok", flush=True)
""")

# Cancels a pg_sleep in each of CONNECTIONS sessions, each by a connection of its own.
CANCEL = textwrap.dedent(f"""
    import json, threading, time, psycopg
    out = []
    for i in range({CONNECTIONS}):
        conn = psycopg.connect({CONNINFO!r}, autocommit=True, application_name="sleep%d" % i)
        timer = threading.Timer(0.3, conn.cancel)
        timer.start()
        try:
            conn.execute("select pg_sleep(30)")
            out.append(None)
        except psycopg.Error as e:
            out.append(e.sqlstate)
        timer.join()
        conn.close()
    print(json.dumps(out), flush=True)
""")


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[NetNS, PgServer, AgentProcess, Path]]:
    require(os.geteuid() == 0, "root")
    require(Path("/usr/lib/postgresql").is_dir(), "a PostgreSQL server (postgresql package)")
    workdir = Path(tempfile.mkdtemp(prefix="ringfence-workers-"))
    policy = workdir / "policy.toml"
    policy.write_text(POLICY)
    with netns("rfwk") as ns, pgserver(ns) as server:
        ns.run(["runuser", "-u", "postgres", "--", server.tool("psql"), "-h", str(server.sockdir),
                "-c", "CREATE TABLE ledger (id int); INSERT INTO ledger VALUES (1)"])
        agent = AgentProcess(ns, workdir / "agent", policy=policy, agent_settings="workers = 2")
        agent.start()
        try:
            yield ns, server, agent, policy
        finally:
            if agent.running:
                agent.stop()
            shutil.rmtree(workdir, ignore_errors=True)


def python_in(ns: NetNS, script: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return ns.popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True, cwd=str(REPO), **kwargs)


@contextlib.contextmanager
def holding(ns: NetNS, prefix: str) -> Iterator[subprocess.Popen[str]]:
    """HOLD's CONNECTIONS sessions (application names ``prefix0``...), each past its first
    statement; the script is killed afterwards."""
    hold = python_in(ns, HOLD, prefix)
    try:
        assert hold.stdout is not None and hold.stdin is not None
        assert hold.stdout.readline().strip() == "ready"
        yield hold
    finally:
        hold.kill()
        hold.wait()


def go(hold: subprocess.Popen[str]) -> Any:
    """Each held session reads the ledger once more: "ok" or the SQLSTATE, in order."""
    assert hold.stdin is not None and hold.stdout is not None
    hold.stdin.write("go\n")
    hold.stdin.flush()
    return json.loads(hold.stdout.readline())


def starts(records: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    found = []
    for recs in sessions(records).values():
        start = next((r for r in recs if r["type"] == "session.start"), None)
        if start and ((start.get("target") or {}).get("application_name") or "").startswith(prefix):
            found.append(start)
    return found


def started(agent: AgentProcess, prefix: str, count: int) -> list[dict[str, Any]]:
    """The session.start records of the ``count`` sessions named ``prefix...``, once all are in
    the trail."""
    found: list[dict[str, Any]] = agent.wait_for(
        lambda rs: (lambda s: s if len(s) == count else None)(starts(rs, prefix)))
    return found


def test_the_agent_runs_a_worker_and_sessions_land_on_both(stack: Any) -> None:
    """With workers = 2 the agent starts one session worker, says so in agent.start, and
    connections are spread over both processes, each recording the sessions it carries."""
    ns, _, agent, _ = stack
    pids = agent.session_pids()
    assert len(pids) == 2
    start = agent.wait_for(lambda rs: [r for r in rs if r["type"] == "agent.start"])[-1]
    assert start["worker_pids"] == pids[1:]
    assert start["balance"] == "least-sessions"
    with holding(ns, "spread") as hold:
        held = started(agent, "spread", CONNECTIONS)
        assert {s["agent_pid"] for s in held} == set(pids)
        assert all(s["attribution"]["source"] == "bpf" for s in held)
        # Attributed by the agent's probes, whichever process carries the session.
        assert all(s["process"]["pid"] == hold.pid for s in held)


def no_open_sessions(records: list[dict[str, Any]]) -> bool:
    return all(any(r["type"] == "session.end" for r in recs)
               for recs in sessions(records).values()
               if any(r["type"] == "session.start" for r in recs))


def test_new_sessions_go_to_the_event_loop_carrying_the_fewest(stack: Any) -> None:
    """With the default [agent] balance, each new connection goes to the event loop carrying
    the fewest sessions: eight opened one after another split 4/4, and once the worker's four
    have ended, the next four all go to the worker. (By the kernel's hash of addresses both
    would happen together about once in sixty tries.)"""
    ns, _, agent, _ = stack
    main, worker = agent.session_pids()
    agent.wait_for(no_open_sessions)  # earlier tests' sessions all counted out
    control = python_in(ns, CONTROL)
    stdin, stdout = control.stdin, control.stdout
    assert stdin is not None and stdout is not None

    def command(line: str) -> None:
        stdin.write(line + "\n")
        stdin.flush()
        assert stdout.readline().strip() == "ok"

    try:
        command("open even 8")
        even = started(agent, "even", 8)
        assert Counter(s["agent_pid"] for s in even) == {main: 4, worker: 4}
        gone = [s for s in even if s["agent_pid"] == worker]
        command("close " + " ".join(s["target"]["application_name"] for s in gone))
        ids = {s["session_id"] for s in gone}
        agent.wait_for(lambda rs: len([r for r in rs if r["type"] == "session.end"
                                       and r["session_id"] in ids]) == len(ids))
        command("open next 4")
        after = started(agent, "next", 4)
        assert [s["agent_pid"] for s in after] == [worker] * 4
    finally:
        control.kill()
        control.wait()


def test_cancel_requests_find_their_session_on_any_event_loop(stack: Any) -> None:
    """A cancel request arrives on a connection of its own, which may land on another process
    than its session: each still cancels its statement, and its record names its session."""
    ns, _, agent, _ = stack
    cancel = python_in(ns, CANCEL)
    out, err = cancel.communicate(timeout=300)
    assert json.loads(out) == ["57014"] * CONNECTIONS, err

    def cancels(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in records if r["type"] == "session.start" and r.get("cancel")]

    records = agent.wait_for(lambda rs: len(cancels(rs)) >= CONNECTIONS and rs)
    sleepers = {s["session_id"]: s for s in starts(records, "sleep")}
    assert len(sleepers) == CONNECTIONS
    requests = cancels(records)
    targets = [r["cancel"]["target_session_id"] for r in requests]
    assert sorted(targets) == sorted(sleepers)  # each found, each once
    crossed = [r for r in requests
               if r["agent_pid"] != sleepers[r["cancel"]["target_session_id"]]["agent_pid"]]
    assert crossed, "no cancel request landed on another process than its session"


def test_a_policy_reload_reaches_sessions_on_every_event_loop(stack: Any) -> None:
    """After SIGHUP to the agent, open sessions on the agent and on its worker alike get the new
    policy at their next statement."""
    ns, _, agent, policy = stack
    try:
        with holding(ns, "reload") as hold:
            before = len([r for r in agent.records() if r.get("effect") == "reload"])
            policy.write_text(BLOCK_READS)
            assert agent.process is not None
            agent.process.send_signal(signal.SIGHUP)
            agent.wait_for(lambda rs: len([r for r in rs if r.get("effect") == "reload"]) > before)
            assert go(hold) == ["42501"] * CONNECTIONS
    finally:
        policy.write_text(POLICY)
        if agent.process is not None:
            agent.process.send_signal(signal.SIGHUP)
        time.sleep(0.5)


def test_a_stop_ends_every_loops_sessions_with_the_agents_message(stack: Any) -> None:
    """On SIGTERM the sessions on the worker end as the agent's do: the client reads 57P01
    (its connection was not reset by the redirect rules going), a session.end record says
    why, the worker exits, and the trail holds agent.stop after all of them."""
    ns, _, agent, _ = stack
    pids = agent.session_pids()
    with holding(ns, "stop") as hold:
        assert agent.stop() == 0
        for pid in pids[1:]:
            assert not Path(f"/proc/{pid}").exists()
        # An orderly stop: no worker reported as failed (the exit status of each is 0).
        assert "agent.worker_failed" not in agent.log_text()
        # Each client got the agent's message, not a reset, wherever its session was.
        assert go(hold) == ["57P01"] * CONNECTIONS
    records = agent.records()
    held = starts(records, "stop")
    assert {s["agent_pid"] for s in held} == set(pids)
    stop = next(r["seq"] for r in records if r["type"] == "agent.stop")
    by_session = sessions(records)
    for start in held:
        end = [r for r in by_session[start["session_id"]] if r["type"] == "session.end"]
        assert end and end[0]["reason"] == "agent stopping", end[0]["reason"]
        assert end[0]["seq"] < stop


def test_a_worker_that_dies_stops_the_agent_and_the_agent_takes_its_workers_along(
    tmp_path: Path,
) -> None:
    """A session worker killed: the agent stops with an error naming it, after recording why.
    The agent killed: its workers die with it, so nothing is left listening."""
    require(os.geteuid() == 0, "root")
    with netns("rfwk2") as ns, pgserver(ns):
        policy = tmp_path / "policy.toml"
        policy.write_text(POLICY)
        agent = AgentProcess(ns, tmp_path / "a", policy=policy, agent_settings="workers = 2")
        agent.start()
        worker = agent.session_pids()[1]
        os.kill(worker, signal.SIGKILL)
        assert agent.process is not None
        assert agent.process.wait(60) == 1
        assert f"session worker {worker} ended" in agent.log_text()
        stop = [r for r in agent.records() if r["type"] == "agent.stop"]
        assert stop and f"session worker {worker} ended" in stop[-1]["reason"]

        agent = AgentProcess(ns, tmp_path / "b", policy=policy, agent_settings="workers = 2")
        agent.start()
        worker = agent.session_pids()[1]
        agent.kill()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{worker}").exists()
