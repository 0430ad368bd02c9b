"""The audit trail as the agent writes it: live tail, crash safety, a full disk."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.integration.test_policy_enforcement import Driver
from tests.support.agent import REPO, RINGFENCE, AgentProcess, ringfence
from tests.support.netns import NetNS, netns
from tests.support.pgserver import PgServer, pgserver


@pytest.fixture(scope="module")
def host() -> Iterator[tuple[NetNS, PgServer]]:
    require(os.geteuid() == 0, "root")
    require(Path("/usr/lib/postgresql").is_dir(), "a PostgreSQL server (postgresql package)")
    with netns("rfaud") as ns, pgserver(ns) as server:
        yield ns, server


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ringfence-audit-"))
    yield path
    subprocess.run(["umount", "-l", str(path / "agent" / "audit")], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


def record_everything(workdir: Path) -> Path:
    policy = workdir / "policy.toml"
    policy.write_text('[defaults]\nunidentified = "allow"\nrecord = "statements"\n')
    return policy


def verify(agent: AgentProcess) -> subprocess.CompletedProcess[str]:
    return ringfence("audit", "verify", config=agent.config)


def test_tail_follow_sees_a_statement_while_the_session_is_open(
    host: tuple[NetNS, PgServer], workdir: Path
) -> None:
    """`ringfence audit tail --follow --json` in another process prints a statement's record
    while the psql session that ran it is still open."""
    ns, _ = host
    agent = AgentProcess(ns, workdir / "agent", policy=record_everything(workdir))
    agent.start()
    tail = subprocess.Popen(
        [*RINGFENCE, "audit", "--config", str(agent.config), "tail", "--follow", "--json",
         "--type", "query"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in tail.stdout], daemon=True).start()  # type: ignore[union-attr]
    drive = Driver(ns)
    try:
        assert drive("select 'live-marker-4711'")["ok"]
        deadline = time.monotonic() + 10
        seen = None
        while time.monotonic() < deadline and seen is None:
            try:
                record = json.loads(lines.get(timeout=0.5))
            except queue.Empty:
                continue
            if "live-marker-4711" in record.get("text", ""):
                seen = record
        assert seen is not None, "tail --follow did not show the statement while the session was open"
        assert drive.proc.poll() is None, "the session is still open"
    finally:
        drive.close()
        tail.terminate()
        tail.wait(10)
        agent.stop()


def test_kill_9_during_pgbench_loses_no_committed_record(
    host: tuple[NetNS, PgServer], workdir: Path
) -> None:
    """kill -9 in the middle of pgbench: after restart the log verifies, every record committed
    before the kill is still there unchanged, and the chain continues."""
    ns, server = host
    agent = AgentProcess(ns, workdir / "agent", policy=record_everything(workdir))
    agent.start()
    base = [server.tool("pgbench"), "-h", "127.0.0.1", "-U", "postgres"]
    ns.run([*base, "-i", "-s", "1", "postgres"], timeout=300)
    bench = ns.popen([*base, "-S", "-c", "4", "-T", "20", "postgres"], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    try:
        agent.wait_for(lambda rs: sum(1 for r in rs if r["type"] == "query") > 2000, timeout=60)
        before = agent.records(joined=True)  # as stored: one record a seq
        agent.kill()
    finally:
        bench.kill()
        bench.wait()
    agent.start()
    after = agent.records(joined=True)
    assert verify(agent).returncode == 0, verify(agent).stdout + verify(agent).stderr
    by_seq = {r["seq"]: r for r in after}
    assert all(by_seq.get(r["seq"]) == r for r in before), "a committed record changed or vanished"
    assert [r["seq"] for r in after] == list(range(len(after))), "sequence is contiguous"
    restarts = [r for r in after if r["type"] == "agent.start"]
    assert len(restarts) == 2 and restarts[1]["seq"] > before[-1]["seq"]
    agent.stop()
    assert verify(agent).returncode == 0


def test_full_audit_disk_refuses_sessions_then_recovers_without_restart(
    host: tuple[NetNS, PgServer], workdir: Path
) -> None:
    """With the audit disk full, a new psql session gets a clear error and nothing recorded is
    lost; once space returns the same agent serves again and the whole log verifies."""
    ns, server = host
    audit_dir = workdir / "agent" / "audit"
    audit_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(audit_dir)], check=True)
    agent = AgentProcess(ns, workdir / "agent", policy=record_everything(workdir))
    agent.start()
    psql = [server.tool("psql"), "-X", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-tAc"]
    assert ns.run([*psql, "select 'before'"]).stdout.strip() == "before"
    committed = agent.records(joined=True)
    filler = audit_dir / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True, check=False)
    try:
        refused = None
        for _ in range(50):
            done = subprocess.run(ns.argv([*psql, "select 'during'"]), capture_output=True, text=True,
                                  timeout=60)
            if done.returncode != 0:
                refused = done
                break
        assert refused is not None, "sessions kept working with the audit disk full"
        assert "ringfence: the audit trail cannot be written" in refused.stderr
        assert agent.running
    finally:
        filler.unlink()
    deadline = time.monotonic() + 30
    while True:
        done = subprocess.run(ns.argv([*psql, "select 'after'"]), capture_output=True, text=True,
                              timeout=60)
        if done.returncode == 0:
            break
        assert time.monotonic() < deadline, f"the agent did not recover: {done.stderr}"
        time.sleep(0.5)
    assert done.stdout.strip() == "after"
    records = agent.records(joined=True)
    by_seq = {r["seq"]: r for r in records}
    assert all(by_seq.get(r["seq"]) == r for r in committed), "nothing recorded before was lost"
    losses = [r for r in records if r["type"] == "audit.loss"]
    assert losses, "what could not be written is counted"
    agent.stop(signal.SIGTERM)
    result = verify(agent)
    assert result.returncode == 0, result.stdout + result.stderr


def _writer_pid(agent: AgentProcess) -> int:
    """The agent's audit writer process (its one child running audit.process)."""
    assert agent.process is not None
    for task in Path(f"/proc/{agent.process.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"audit.process" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise AssertionError("the agent has no audit writer process")


def _redirect_rules(ns: NetNS) -> list[str]:
    return [line for line in ns.run(["iptables-save"]).stdout.splitlines() if "RINGFENCE" in line]


@pytest.mark.parametrize("fail_closed", [False, True])
def test_losing_the_audit_writer_stops_the_agent_with_an_error(
    host: tuple[NetNS, PgServer], workdir: Path, fail_closed: bool
) -> None:
    """If the writer process is killed, the agent exits non-zero saying why (so the service
    manager restarts both), keeping the redirect rules when fail_closed is set; records it
    committed before stay and the trail verifies after a restart."""
    ns, server = host
    agent = AgentProcess(ns, workdir / "agent", policy=record_everything(workdir))
    setting = f"[agent]\nfail_closed = {str(fail_closed).lower()}\n"
    agent.config.write_text(agent.config.read_text().replace("[agent]\n", setting, 1))
    agent.start()
    psql = [server.tool("psql"), "-X", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-tAc"]
    assert ns.run([*psql, "select 'kept'"]).stdout.strip() == "kept"
    agent.wait_for(lambda rs: any(r["type"] == "session.end" for r in rs))
    os.kill(_writer_pid(agent), signal.SIGKILL)
    assert agent.process is not None
    assert agent.process.wait(timeout=60) == 1
    assert "audit writer process ended" in agent.log_text()
    assert bool(_redirect_rules(ns)) == fail_closed
    ns.run([*RINGFENCE, "cleanup", "--config", str(agent.config)],
           env=dict(os.environ, PYTHONPATH=str(REPO)))
    agent.start()
    records = agent.records()
    assert any(r["type"] == "query" and "'kept'" in r.get("text", "") for r in records)
    agent.stop()
    assert verify(agent).returncode == 0
