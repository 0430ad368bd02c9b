"""``ringfence audit tail``: last records, filters, JSON shape, and --follow."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from agent.cli import main
from tests.unit.audit.conftest import session_events


def run(audit_dir: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["audit", "--path", str(audit_dir), *args])


def test_tail_json_flattens_envelope_and_event(new_log: Any, audit_dir: Path) -> None:
    """tail --json prints one object per line with envelope fields next to event fields."""
    log = new_log()
    log.emit("query", {"text": "select 1", "blob": b"\x01\xff"}, session_id="s9")
    log.close()
    result = run(audit_dir, "tail", "--json", "--type", "query")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["seq"] == 0 and obj["type"] == "query" and obj["session_id"] == "s9"
    assert obj["index"] == 0 and obj["host"] == "test.host" and obj["text"] == "select 1"
    assert obj["blob"] == "01ff"
    assert obj["ts"].endswith("Z") and "T" in obj["ts"]


def test_tail_type_result_includes_query_records_carrying_their_result(
        new_log: Any, audit_dir: Path) -> None:
    """--type result lists every statement's result: result records and the query records
    that carry theirs (audit/SCHEMA.md); --type query lists every statement."""
    log = new_log()
    log.emit("query", {"text": "select 1"}, session_id="s1")
    log.emit("result", {"rows": 1, "outcome": "success"}, session_id="s1")
    log.emit("query", {"text": "select 2", "result": {"rows": 2, "outcome": "success"}},
             session_id="s1")
    log.emit("session.end", {"reason": "client closed"}, session_id="s1")
    log.close()
    results = [json.loads(line) for line in
               run(audit_dir, "tail", "--json", "--type", "result").output.splitlines()]
    assert [(r["type"], r.get("rows", r.get("result", {}).get("rows"))) for r in results] == [
        ("result", 1), ("query", 2)]
    queries = run(audit_dir, "tail", "--json", "--type", "query").output.splitlines()
    assert [json.loads(line)["text"] for line in queries] == ["select 1", "select 2"]


def test_tail_shows_last_n_and_filters_session(new_log: Any, audit_dir: Path) -> None:
    """tail -n N shows the last N records; --session keeps only that session's records."""
    log = new_log()
    session_events(log, "a", statements=5)
    session_events(log, "b", statements=1)
    log.close()
    out = run(audit_dir, "tail", "--json", "-n", "3").output.strip().splitlines()
    seqs = [json.loads(x)["seq"] for x in out]
    assert len(seqs) == 3 and seqs == sorted(seqs)
    out = run(audit_dir, "tail", "--json", "-n", "100", "--session", "a").output.splitlines()
    recs = [json.loads(x) for x in out]
    assert {r["session_id"] for r in recs} == {"a"} and len(recs) == 12


def test_tail_follow_prints_new_records(new_log: Any, audit_dir: Path) -> None:
    """tail --follow prints a record committed after it started."""
    from audit import reader
    from audit.store import Store

    log = new_log()
    log.emit("agent.start", {"version": "t"})
    log.flush(5)
    seen: list[str] = []
    stop = threading.Event()

    def follow() -> None:
        with Store(audit_dir) as store:
            for rec in reader.follow(store, store.next_seq(), stop=stop.is_set):
                seen.append(rec.type)
                if rec.type == "query":
                    stop.set()

    th = threading.Thread(target=follow)
    th.start()
    time.sleep(0.05)
    log.emit("query", {"text": "select now()"}, session_id="x")
    th.join(10)
    stop.set()
    assert "query" in seen


def test_tail_on_missing_store_exits_2(tmp_path: Path) -> None:
    """tail on a directory without an audit trail says so and exits 2."""
    result = run(tmp_path / "nothing", "tail")
    assert result.exit_code == 2
    assert "no audit trail" in result.output


def test_cli_tail_follow_sees_a_statement_live(new_log: Any, audit_dir: Path) -> None:
    """`ringfence audit tail --follow --json` in its own process prints a record emitted later."""
    import os
    import subprocess
    import sys

    from tests.unit.audit.conftest import ROOT_DIR

    log = new_log()
    log.emit("agent.start", {"version": "t"})
    log.flush(5)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "audit",
            "--path",
            str(audit_dir),
            "tail",
            "--follow",
            "--json",
            "-n",
            "0",
            "--type",
            "query",
        ],
        cwd=ROOT_DIR,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT_DIR)},
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 20
        line = ""
        # Emit until the follower (which needs a moment to start) prints one.
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not line and time.monotonic() < deadline:
            log.emit("query", {"text": "select 42"}, session_id="live")
            if sel.select(timeout=0.2):
                line = proc.stdout.readline()
        obj = json.loads(line)
        assert obj["type"] == "query" and obj["text"] == "select 42"
        assert obj["session_id"] == "live"
    finally:
        proc.terminate()
        proc.wait(10)
