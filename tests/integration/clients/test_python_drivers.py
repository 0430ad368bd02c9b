"""psycopg 3 and asyncpg through the agent: results identical to a direct run, statements recorded."""

from __future__ import annotations

import json
import re
from typing import Any

from tests.conftest import require
from tests.integration.clients.conftest import HERE, PYTHON, Host, app_name, wait_sessions

SCRIPTS = HERE / "scripts"


def both_ways(pghost: Host, script: str, direct_arg: str, agent_arg: str, app: str) -> Any:
    """Run a client script directly, then through the agent; returns the output, checked equal."""
    _, direct = pghost.run_client([PYTHON, str(SCRIPTS / script), direct_arg, app])
    _, through = pghost.run_client([PYTHON, str(SCRIPTS / script), agent_arg, app])
    assert json.loads(through) == json.loads(direct)
    return json.loads(through)


def merged(sessions: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [r for recs in sessions for r in recs]


def test_psycopg_identical_and_recorded(pghost: Host) -> None:
    """Prepared, pipelined, COPY, named-cursor, binary, LISTEN/NOTIFY and cancel all behave as
    directly, and the audit trail has each execution."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        require(False, "psycopg (pip install 'psycopg[binary]')")
    app = app_name("psycopg")
    out = both_ways(pghost, "psycopg_client.py", pghost.dsn(direct=True), pghost.dsn(), app)
    assert out["cancel"] == ["57014", True]
    assert out["notify"] == [["ringfence_events", "hello from psycopg"], ["ringfence_events", "second"]]
    assert out["server_cursor"][0] == 5000
    # Five connections plus the cancel request's own.
    records = merged(wait_sessions(pghost.agent, app, count=6))
    queries = [r for r in records if r["type"] == "query"]
    prepared = [q for q in queries if q.get("text") == "select name, price from items where id = $1"]
    assert len(prepared) == 5 and all(q["protocol"] == "extended" for q in prepared)
    # psycopg sends ints in binary with their type (int2) in Parse: decoded for the record.
    assert [q["parameters"] for q in prepared] == [[i] for i in range(1, 6)]
    names = [q for q in queries if q.get("text", "").startswith("insert into items")]
    assert [q["parameters"][1] for q in names] == [f"item {i}" for i in range(1, 6)]
    assert sum(q.get("text") == "select $1::int * 2, $2::text" for q in queries) == 10
    results = [r for r in records if r["type"] == "result"]
    assert any(r["command_tag"] == "COPY 1000" for r in results)
    assert any(r["command_tag"] == "COPY 500" for r in results)
    assert any(r.get("error", {}).get("sqlstate") == "57014" for r in results)
    starts = [r for r in records if r["type"] == "session.start"]
    assert any((s.get("cancel") or {}).get("target_session_id") for s in starts)


def test_asyncpg_identical_and_recorded(pghost: Host) -> None:
    """Binary extended protocol, prepared statements, COPY and a timeout's cancel behave as
    directly; executions and COPY counts are recorded."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        require(False, "asyncpg (pip install asyncpg)")
    app = app_name("asyncpg")
    out = both_ways(pghost, "asyncpg_client.py", str(pghost.server.sockdir), "127.0.0.1", app)
    assert out["timeout"] == "cancelled" and out["error"] == "22012"
    assert out["copy_out"][1] == 3000
    records = merged(wait_sessions(pghost.agent, app, count=2))
    queries = [r for r in records if r["type"] == "query"]
    insert = [q for q in queries if q.get("text", "").startswith("insert into readings values ($1")]
    assert len(insert) == 50
    # asyncpg leaves parameter types to the server; the server's ParameterDescription names
    # them, so binary values are decoded where the type is simple, else kept as type and length.
    assert insert[7]["parameters"] == [7, "s1", 7 / 3, {"format": "binary", "type_oid": 17,
                                                         "length": 8}]
    results = [r for r in records if r["type"] == "result"]
    assert any(r["command_tag"] == "COPY 3000" for r in results)
    assert any(r.get("error", {}).get("sqlstate") == "57014" for r in results)


def test_every_statement_is_recorded_with_its_own_result(pghost: Host) -> None:
    """Statements whose row counts name them, sent every way psycopg sends them (simple and
    extended protocol, a pipeline, errors in between): each query record's result is its
    own statement's, whether stored apart or carried in the query record, and most of the
    one-step statements are one record."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        require(False, "psycopg (pip install 'psycopg[binary]')")
    app = app_name("statement-results")
    out = both_ways(pghost, "statement_results_client.py", pghost.dsn(direct=True), pghost.dsn(), app)
    (session,) = wait_sessions(pghost.agent, app)
    def answers(query: dict[str, Any], result: dict[str, Any]) -> int | str:
        """What ``result`` says ``query`` gave, checked against what its text asks."""
        counted = re.fullmatch(r"select generate_series\(1, (\d+)\)", query["text"])
        if counted is None:
            assert query["text"] == "select 1/0", query
            assert result["outcome"] == "failure" and result["error"]["sqlstate"] == "22012"
            return "22012"
        rows = int(counted.group(1))
        assert result["outcome"] == "success" and result["command_tag"] == f"SELECT {rows}"
        assert result["rows"] == rows, (query, result)
        return rows

    # In session order, the n-th result answers the n-th statement (pipelined ones too).
    queries = [r for r in session if r["type"] == "query"]
    results = [r for r in session if r["type"] == "result"]
    assert [answers(q, r) for q, r in zip(queries, results, strict=True)] == out
    # As stored: the results carried in query records are their own statements' too.
    stored = [r for r in pghost.agent.records(joined=True)
              if r["session_id"] == session[0]["session_id"]]
    joined = [r for r in stored if r["type"] == "query" and "result" in r]
    assert joined
    for query in joined:
        answers(query, query["result"])
