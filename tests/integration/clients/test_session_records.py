"""What the agent records for row counts and for a burst of connections."""

from __future__ import annotations

import subprocess

from tests.integration.clients.conftest import Host, app_name, wait_sessions


def test_returning_rows_counted_once(pghost: Host) -> None:
    """INSERT ... RETURNING of 25 rows is recorded with rows == 25, not the DataRows plus the tag."""
    app = app_name("returning")
    sql = ("create temp table n (id serial, b text); "
           "insert into n (b) select 'x' from generate_series(1, 25) returning id")
    pghost.run_client(pghost.psql_argv("-c", sql), app)
    result = next(r for r in wait_sessions(pghost.agent, app)[0] if r["type"] == "result")
    assert result["command_tag"] == "INSERT 0 25"
    assert result["rows"] == 25


def test_burst_of_connections_all_answered_and_attributed(pghost: Host) -> None:
    """30 psql connections started at once all finish within 20 s, each session attributed."""
    app = app_name("burst")
    procs = [pghost.popen(pghost.psql_argv("-c", f"select {i}"), app, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) for i in range(30)]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=20)
            assert proc.returncode == 0, err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    sessions = wait_sessions(pghost.agent, app, count=30)
    starts = [next(r for r in recs if r["type"] == "session.start") for recs in sessions]
    assert all(s["attribution"]["source"] == "bpf" and s["process"] for s in starts)
