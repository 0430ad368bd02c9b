"""psql through the agent: output identical to a direct run, every statement recorded."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

from tests.integration.clients.conftest import Host, app_name, texts, wait_sessions


def run_script(pghost: Host, script: str, direct: bool, stop_on_error: bool = True,
               app: str | None = None) -> str:
    """Feed ``script`` to psql on stdin; returns psql's stdout and stderr, interleaved."""
    options = ["-v", f"ON_ERROR_STOP={int(stop_on_error)}", "-f", "-"]
    proc = pghost.popen(pghost.psql_argv(*options, direct=direct), app, stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(script, timeout=120)
    assert proc.returncode == 0, out
    return out


def test_copy_in_and_out_identical(pghost: Host, tmp_path: Path) -> None:
    """\\copy from a file and back out gives the same files and output as a direct run."""
    source = tmp_path / "in.csv"
    source.write_text("".join(f'{i},"row {i} with ""quotes"" and, commas"\n' for i in range(20000)))
    outputs = {}
    app = app_name("copy")
    for direct in (True, False):
        target = tmp_path / f"out-{direct}.csv"
        script = (
            "create temp table t (a int, b text);\n"
            f"\\copy t from '{source}' csv\n"
            f"\\copy (select * from t order by a) to '{target}' csv\n"
            "select count(*), sum(a), md5(string_agg(b, ',' order by a)) from t;\n"
        )
        out = run_script(pghost, script, direct, app=app)
        outputs[direct] = (out, target.read_bytes())
    assert outputs[False] == outputs[True]
    assert outputs[False][1] == source.read_bytes()
    recs = wait_sessions(pghost.agent, app)[0]
    assert any("FROM STDIN" in t for t in texts(recs)) and any("TO STDOUT" in t for t in texts(recs))
    results = [r for r in recs if r["type"] == "result"]
    assert any(r["command_tag"] == "COPY 20000" for r in results)


def test_large_objects_identical(pghost: Host, tmp_path: Path) -> None:
    """\\lo_import and \\lo_export (fast-path function calls) round-trip a file byte for byte."""
    source = tmp_path / "blob.bin"
    source.write_bytes(bytes(range(256)) * 4096 + b"tail")
    outputs = {}
    app = app_name("lo")
    for direct in (True, False):
        target = tmp_path / f"blob-{direct}.bin"
        script = (
            f"\\lo_import '{source}'\n"
            f"\\lo_export :LASTOID '{target}'\n"
            "select length(lo_get(:LASTOID)), md5(lo_get(:LASTOID));\n"
            "\\lo_unlink :LASTOID\n"
        )
        out = run_script(pghost, script, direct, app=app)
        assert target.read_bytes() == source.read_bytes()
        outputs[direct] = re.sub(r"\b\d{5,}\b", "<oid>", out)
    assert outputs[False] == outputs[True]
    recs = wait_sessions(pghost.agent, app)[0]
    recorded = texts(recs)
    assert any(t.startswith("-- function call oid") for t in recorded)
    assert any("md5(lo_get(" in t for t in recorded)


def test_watch_repeats_through_the_agent(pghost: Host) -> None:
    """\\watch 0.1 prints the same result block again and again, each run recorded."""
    query = "select 'tick' as t, 6 * 7 as answer"
    blocks = {}
    app = app_name("watch")
    for direct in (True, False):
        argv = ["timeout", "-s", "INT", "1.5", *pghost.psql_argv("-P", "pager=off", direct=direct)]
        proc = pghost.popen(argv, app, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(f"{query} \\watch 0.1\n", timeout=60)
        # Each repetition starts with a title line naming the time; compare the blocks.
        runs = [b.strip() for b in re.split(r"^.*\(every 0\.1s\)$", out, flags=re.M) if b.strip()]
        assert len(runs) >= 3, out + err
        assert len(set(runs)) == 1
        blocks[direct] = (runs[0], len(runs))
    assert blocks[False][0] == blocks[True][0]
    recs = wait_sessions(pghost.agent, app)[0]
    recorded = [t.strip() for t in texts(recs)]
    # The interrupt can come after psql sent one more run and before it printed the answer:
    # the server got that statement, so it is recorded too.
    assert recorded in ([query] * blocks[False][1], [query] * (blocks[False][1] + 1))


def test_multi_statement_string_identical(pghost: Host) -> None:
    """One Query with five statements shows every result as directly and records all tags."""
    sql = ("select 1 as a; select 'two' as b; create temp table m (x int); "
           "insert into m values (1), (2), (3); select x, x * x as sq from m order by x")
    app = app_name("multi")
    direct = pghost.psql("-c", sql, direct=True)
    _, out = pghost.run_client(pghost.psql_argv("-c", sql), app)
    assert out == direct.stdout
    recs = wait_sessions(pghost.agent, app)[0]
    assert texts(recs) == [sql]
    result = next(r for r in recs if r["type"] == "result")
    assert result["commands"] == ["SELECT 1", "SELECT 1", "CREATE TABLE", "INSERT 0 3", "SELECT 3"]
    assert result["outcome"] == "success"


def test_error_inside_transaction_block_identical(pghost: Host) -> None:
    """BEGIN; 1/0; select 1; ROLLBACK prints the same errors as directly; both failures recorded."""
    script = "BEGIN;\nselect 1/0;\nselect 1;\nROLLBACK;\nselect 'after' as state;\n"
    app = app_name("txerror")
    direct = run_script(pghost, script, True, stop_on_error=False)
    through = run_script(pghost, script, False, stop_on_error=False, app=app)
    assert through == direct
    assert "division by zero" in through and "current transaction is aborted" in through
    recs = wait_sessions(pghost.agent, app)[0]
    assert texts(recs) == ["BEGIN;", "select 1/0;", "select 1;", "ROLLBACK;",
                           "select 'after' as state;"]
    errors = [r["error"]["sqlstate"] for r in recs if r["type"] == "result" and r.get("error")]
    assert errors == ["22012", "25P02"]


def test_interrupted_query_is_cancelled(pghost: Host) -> None:
    """Ctrl-C on a long query cancels it through the agent as it would directly."""
    outputs = {}
    app = app_name("cancel")
    for direct in (True, False):
        proc = pghost.popen(pghost.psql_argv("-c", "select pg_sleep(30)", direct=direct), app,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
        outputs[direct] = (proc.returncode, err.strip())
    assert outputs[False] == outputs[True]
    assert "canceling statement due to user request" in outputs[False][1]
    session, cancel = wait_sessions(pghost.agent, app, count=2)
    assert any(r.get("error", {}).get("sqlstate") == "57014" for r in session)
    assert cancel[0]["cancel"]["target_session_id"] == session[0]["session_id"]
