"""Policy enforcement through the agent, with real psql and psycopg sessions."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.support.agent import REPO, AgentProcess
from tests.support.netns import NetNS, netns
from tests.support.pgserver import PgServer, pgserver

DEFAULT_POLICY = (REPO / "packaging" / "policy.toml").read_text()


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[NetNS, PgServer, AgentProcess, Path]]:
    require(os.geteuid() == 0, "root")
    require(Path("/usr/lib/postgresql").is_dir(), "a PostgreSQL server (postgresql package)")
    workdir = Path(tempfile.mkdtemp(prefix="ringfence-policy-"))
    policy = workdir / "policy.toml"
    policy.write_text(DEFAULT_POLICY)
    with netns("rfpol") as ns, pgserver(ns) as server:
        ns.run(["runuser", "-u", "postgres", "--", server.tool("psql"), "-h", str(server.sockdir),
                "-c", "CREATE TABLE accounts (id int, owner text); INSERT INTO accounts VALUES (1, 'a');"
                      "GRANT ALL ON accounts TO nobody"])
        agent = AgentProcess(ns, workdir / "agent", policy=policy)
        agent.start()
        try:
            yield ns, server, agent, policy
        finally:
            if agent.running:
                agent.stop()
            shutil.rmtree(workdir, ignore_errors=True)


def psql(ns: NetNS, server: PgServer, *commands: str) -> subprocess.CompletedProcess[str]:
    argv = [server.tool("psql"), "-X", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"]
    for c in commands:
        argv += ["-c", c]
    return subprocess.run(ns.argv(argv), capture_output=True, text=True, timeout=60)


def table_exists(ns: NetNS, server: PgServer) -> bool:
    done = ns.run(["runuser", "-u", "postgres", "--", server.tool("psql"), "-h", str(server.sockdir),
                   "-tAc", "select to_regclass('public.accounts') is not null"])
    return done.stdout.strip() == "t"


FROZEN_ACCOUNTS = DEFAULT_POLICY + """
[[rule]]
id = "accounts-frozen"
effect = "block"
objects = ["accounts"]
classes = ["write"]
reason = "accounts are frozen"
"""


def reload_policy(agent: AgentProcess, policy: Path, text: str) -> None:
    """Write ``text`` as the policy, signal the agent, and wait for a new record of its
    loading exactly that file."""
    version = hashlib.sha256(text.encode()).hexdigest()

    def loaded(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in records if r["type"] == "policy.decision"
                and r.get("effect") == "reload" and r.get("policy_version") == version]

    before = len(loaded(agent.records()))
    policy.write_text(text)
    agent.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    agent.wait_for(lambda rs: len(loaded(rs)) > before or None)


class Driver:
    """A psycopg session inside the namespace, one statement at a time."""

    def __init__(self, ns: NetNS) -> None:
        self.proc = ns.popen(
            [sys.executable, "-m", "tests.support.pgdriver",
             "host=127.0.0.1 port=5432 user=postgres dbname=postgres"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)),
        )

    def __call__(self, sql: str) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(sql.replace("\n", " ") + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"driver died: {self.proc.stderr.read() if self.proc.stderr else ''}")
        result: dict[str, Any] = json.loads(line)
        return result

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(30)


def test_psql_blocked_drop_then_safe_query_in_same_session(stack: Any) -> None:
    """psql gets 42501 naming the rule for DROP TABLE, the next query in the session works,
    and the table still exists."""
    ns, server, agent, _ = stack
    done = psql(ns, server, "DROP TABLE accounts", "select count(*) as n from accounts")
    assert "ERROR:  ringfence: statement blocked by policy rule block-drop" in done.stderr
    assert " n \n---\n 1\n(1 row)" in done.stdout
    assert table_exists(ns, server)
    decisions = agent.wait_for(lambda rs: [r for r in rs if r["type"] == "policy.decision"
                                           and r.get("effect") == "block"])
    assert decisions[-1]["rule_id"] == "block-drop"
    assert decisions[-1]["policy_version"]


def test_block_inside_transaction_fails_it_like_a_server_error(stack: Any) -> None:
    """Inside BEGIN, a blocked statement leaves the transaction failed, exactly as an error would."""
    ns, server, _, _ = stack
    done = psql(ns, server, "BEGIN", "TRUNCATE accounts", "select 1", "ROLLBACK")
    assert "ringfence: statement blocked by policy rule block-truncate" in done.stderr
    assert "current transaction is aborted, commands ignored until end of transaction block" in done.stderr
    assert "ROLLBACK" in done.stdout
    assert table_exists(ns, server)


def test_psycopg_session_survives_blocks(stack: Any) -> None:
    """psycopg: blocked DROP gets 42501 with the rule's message; then a safe query succeeds;
    in a transaction the block leaves it in the failed state."""
    ns, server, _, _ = stack
    drive = Driver(ns)
    try:
        blocked = drive("DROP TABLE accounts")
        assert blocked["ok"] is False and blocked["sqlstate"] == "42501"
        assert "block-drop" in blocked["message"]
        assert drive("select owner from accounts") == {"ok": True, "rows": [["a"]], "status": "SELECT 1",
                                                       "transaction": "IDLE"}
        assert drive("BEGIN")["transaction"] == "INTRANS"
        failed = drive("DELETE FROM accounts")
        assert failed["sqlstate"] == "42501" and failed["transaction"] == "INERROR"
        assert drive("select 1")["sqlstate"] == "25P02"
        assert drive("ROLLBACK")["transaction"] == "IDLE"
    finally:
        drive.close()
    assert table_exists(ns, server)


def test_hot_reload_applies_to_open_session_and_keeps_old_policy_on_error(stack: Any) -> None:
    """A changed policy file reaches an open session's next statement without a signal; a broken
    file sent with SIGHUP keeps the old policy in force and the rejection is recorded."""
    ns, server, agent, policy = stack
    drive = Driver(ns)
    try:
        assert drive("select id from accounts")["ok"] is True
        policy.write_text(DEFAULT_POLICY + """
[[rule]]
id = "no-reads-of-accounts"
effect = "block"
objects = ["accounts"]
classes = ["read"]
reason = "accounts are off limits"
""")
        # No signal: the agent notices the changed file by itself.
        reload = agent.wait_for(lambda rs: [r for r in rs if r["type"] == "policy.decision"
                                            and r.get("effect") == "reload"])
        assert reload[-1]["trigger"] == "file change"
        blocked = drive("select id from accounts")
        assert blocked["sqlstate"] == "42501" and "no-reads-of-accounts" in blocked["message"]

        policy.write_text("[[rule]\nid = broken")
        agent.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        rejected = agent.wait_for(lambda rs: [r for r in rs if r["type"] == "policy.decision"
                                              and r.get("effect") == "reload_rejected"])
        assert "policy.toml:1" in rejected[-1]["reason"]
        still = drive("select id from accounts")
        assert still["sqlstate"] == "42501", "the previous policy stays in force"
    finally:
        drive.close()
        policy.write_text(DEFAULT_POLICY)
        agent.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        time.sleep(0.5)


_PREPARED_DRIVER = """
import json, sys
import psycopg

conn = psycopg.connect(sys.argv[1], autocommit=True)
for line in sys.stdin:
    try:
        conn.execute("UPDATE accounts SET owner = %s WHERE id = 1", (line.strip(),), prepare=True)
        out = {"ok": True}
    except psycopg.Error as e:
        out = {"ok": False, "sqlstate": e.sqlstate, "message": str(e.diag.message_primary)}
    out["prepared"] = [r[0] for r in conn.execute(
        "SELECT statement FROM pg_prepared_statements").fetchall()]
    print(json.dumps(out), flush=True)
"""


def test_a_statement_prepared_before_a_reload_runs_under_the_new_policy(stack: Any) -> None:
    """A driver's server-side prepared UPDATE (psycopg, prepare=True: Bind and Execute
    only, after the first time) is blocked once a reload forbids writes to the table, the
    row stays as it was, and it runs again once the policy allows it."""
    ns, server, agent, policy = stack
    proc = ns.popen([sys.executable, "-c", _PREPARED_DRIVER,
                     "host=127.0.0.1 port=5432 user=postgres dbname=postgres"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True)

    def update(owner: str) -> dict[str, Any]:
        assert proc.stdin and proc.stdout
        proc.stdin.write(owner + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        result: dict[str, Any] = json.loads(line)
        return result

    def owner() -> str:
        return ns.run(["runuser", "-u", "postgres", "--", server.tool("psql"), "-h",
                       str(server.sockdir), "-tAc", "select owner from accounts where id = 1"]
                      ).stdout.strip()

    try:
        first = update("b")
        assert first["ok"] is True and owner() == "b"
        assert any("UPDATE accounts" in s for s in first["prepared"])
        reload_policy(agent, policy, FROZEN_ACCOUNTS)
        blocked = update("c")
        assert blocked["ok"] is False and blocked["sqlstate"] == "42501"
        assert "accounts-frozen" in blocked["message"]
        assert blocked["prepared"] == first["prepared"], "the statement was prepared before"
        assert owner() == "b"
        reload_policy(agent, policy, DEFAULT_POLICY)
        again = update("d")
        assert again["ok"] is True and owner() == "d"
    finally:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(30)
        policy.write_text(DEFAULT_POLICY)
        agent.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        time.sleep(0.5)
    records = agent.wait_for(lambda rs: [r for r in rs if r["type"] == "query"
                                         and r.get("text", "").startswith("UPDATE accounts")
                                         and r.get("parameters") == ["c"]] or None)
    assert records[-1]["protocol"] == "extended"
    assert records[-1]["policy"]["effect"] == "block"


def test_a_statement_prepared_in_sql_before_a_reload_runs_under_the_new_policy(
    stack: Any,
) -> None:
    """The same with SQL's PREPARE and EXECUTE in one open session: an UPDATE prepared
    while the policy allowed it is blocked once a reload freezes the table, with the rule
    named and the row left as it was; a prepared read still runs."""
    ns, server, agent, policy = stack
    drive = Driver(ns)
    try:
        assert drive("PREPARE touch (text) AS UPDATE accounts SET owner = $1 WHERE id = 1")["ok"]
        assert drive("PREPARE owners AS SELECT owner FROM accounts WHERE id = 1")["ok"]
        assert drive("EXECUTE touch('e')")["ok"] is True
        reload_policy(agent, policy, FROZEN_ACCOUNTS)
        blocked = drive("EXECUTE touch('f')")
        assert blocked["ok"] is False and blocked["sqlstate"] == "42501"
        assert "accounts-frozen" in blocked["message"]
        assert drive("EXECUTE owners") == {"ok": True, "rows": [["e"]], "status": "SELECT 1",
                                           "transaction": "IDLE"}
    finally:
        drive.close()
        policy.write_text(DEFAULT_POLICY)
        agent.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        time.sleep(0.5)
    decisions = agent.wait_for(lambda rs: [r for r in rs if r["type"] == "policy.decision"
                                           and r.get("rule_id") == "accounts-frozen"] or None)
    assert decisions[-1]["effect"] == "block"


_PIPELINE_DRIVER = """
import json, sys
import psycopg

conn = psycopg.connect(sys.argv[1], autocommit=True)
out = {}
try:
    with conn.pipeline():
        conn.execute("SELECT 1/0")
        conn.execute("DROP TABLE accounts")
except psycopg.Error as e:
    out["error"] = e.sqlstate
out["after"] = conn.execute("SELECT count(*) FROM accounts").fetchone()[0]
print(json.dumps(out), flush=True)
"""


def test_a_pipeline_failing_before_a_blocked_statement_answers_the_client(stack: Any) -> None:
    """psycopg's pipeline mode: a statement that fails on the server, then a DROP the
    policy blocks, in one pipeline. The server skips the DROP's substitute, so the client
    gets the server's error (not the policy's), the connection goes on, the table stays,
    and the DROP is recorded as blocked."""
    ns, server, agent, _ = stack
    done = subprocess.run(ns.argv([sys.executable, "-c", _PIPELINE_DRIVER,
                                   "host=127.0.0.1 port=5432 user=postgres dbname=postgres"]),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"error": "22012", "after": 1}
    assert table_exists(ns, server)

    def session(records: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        failing = [r for r in records if r["type"] == "query" and r.get("text") == "SELECT 1/0"]
        if not failing:
            return None
        mine = [r for r in records if r.get("session_id") == failing[-1]["session_id"]]
        return mine if any(r["type"] == "session.end" for r in mine) else None

    records = agent.wait_for(session)
    answered = [(r["type"], r["text"] if r["type"] == "query" else r["outcome"])
                for r in records if r["type"] in ("query", "result")]
    # Each statement is recorded once, as sent, then the answers in order: the failed
    # SELECT and the blocked DROP (whose Bind and Execute, skipped by the server, are part
    # of it and add no record of their own).
    assert answered == [("query", "SELECT 1/0"), ("query", "DROP TABLE accounts"),
                        ("result", "failure"), ("result", "blocked"),
                        ("query", "SELECT count(*) FROM accounts"), ("result", "success")]
