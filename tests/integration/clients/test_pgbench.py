"""pgbench through the agent in every query mode: no failed transaction, every statement recorded."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.integration.clients.conftest import Host, app_name, wait_sessions

CLIENTS = 4
TRANSACTIONS = 150  # per client
SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = "


@pytest.fixture(scope="module")
def pgbench_tables(pghost: Host) -> None:
    """pgbench's tables, created directly (pgbench -i drops and truncates, which the policy blocks)."""
    pghost.ns.run([pghost.server.tool("pgbench"), "-i", "-s", "1", "-q", "-h",
                   str(pghost.server.sockdir), "-p", "5432", "-U", "postgres", "postgres"],
                  timeout=300)


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_mode(pghost: Host, pgbench_tables: None, mode: str) -> None:
    """The TPC-B-like script with 4 clients finishes with 0 failures, and each transaction's
    statements are recorded once per execution."""
    app = app_name(f"pgbench-{mode}")
    argv = [pghost.server.tool("pgbench"), "-h", "127.0.0.1", "-p", "5432", "-U", "postgres",
            "-M", mode, "-n", "-c", str(CLIENTS), "-j", "2", "-t", str(TRANSACTIONS), "postgres"]
    _, out = pghost.run_client(argv, app, timeout=300)
    assert "number of failed transactions: 0" in out, out
    processed = int(re.search(r"actually processed: (\d+)", out).group(1))  # type: ignore[union-attr]
    assert processed == CLIENTS * TRANSACTIONS
    sessions = wait_sessions(pghost.agent, app, count=CLIENTS, timeout=60)
    records: list[dict[str, Any]] = [r for recs in sessions for r in recs]
    queries = [r for r in records if r["type"] == "query"]
    selects = [q for q in queries if q.get("text", "").startswith(SELECT)]
    assert len(selects) == processed
    # Each names the policy's verdict (for an execution, the one its statement's Parse got).
    assert all(q["policy"]["effect"] == "allow" and q["policy"]["classes"] == ["read"]
               for q in selects)
    if mode == "simple":
        assert all(q["protocol"] == "simple" and q["text"][len(SELECT):].rstrip(";").isdigit()
                   for q in selects)
    else:
        # The text comes from the Parse message, the value from each Bind.
        assert {q["text"] for q in selects} == {SELECT + "$1;"}
        assert all(q["protocol"] == "extended" and q["parameters"][0].isdigit() for q in selects)
    results = [r for r in records if r["type"] == "result"]
    assert len(results) == len(queries)
    # As stored, most statements are one record, the query carrying its result
    # (audit/SCHEMA.md); the rest have a result record of their own. None is doubled.
    mine = {recs[0]["session_id"] for recs in sessions}
    stored = [r for r in pghost.agent.records(joined=True) if r["session_id"] in mine]
    joined = [r for r in stored if r["type"] == "query" and "result" in r]
    apart = [r for r in stored if r["type"] == "result"]
    assert joined and len(joined) + len(apart) == len(queries)
    assert all(r["outcome"] == "success" for r in results)
    assert sum(r["command_tag"] == "UPDATE 1" for r in results) == 3 * processed
