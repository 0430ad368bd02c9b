"""``ringfence audit`` show/replay/verify/prove/consistency/export/key through click's CliRunner."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import lmdb
import pytest
from click.testing import CliRunner

from agent.cli import main
from audit.checkpoint import Signer, Verifier
from audit.errors import AuditError
from audit.merkle import leaf_hash, verify_consistency
from audit.store import DB_RECORDS, list_segments, u64
from audit.verify import check_inclusion_bundle
from tests.unit.audit.conftest import make_log, session_events


def run(audit_dir: Path, key_path: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["audit", "--path", str(audit_dir), "--key-path", str(key_path), *args])


def build(audit_dir: Path, signer: Signer, export: Path | None = None) -> None:
    log = make_log(audit_dir, signer, checkpoint_every_records=5, checkpoint_export=str(export or ""))
    log.emit(
        "session.start",
        {
            "service": "postgres",
            "protocol": "postgres",
            "source": {"ip": "10.0.0.7", "port": 40000},
            "destination": {"ip": "10.0.0.5", "port": 5432},
            "process": {
                "pid": 4242,
                "uid": 1001,
                "comm": "psql",
                "cmdline": ["psql", "-h", "db"],
                "exe": "/usr/bin/psql",
                "loginuid": 1000,
            },
            "attribution": {"source": "bpf", "verified": True},
            "target": {"database": "app", "user": "alice", "application_name": "psql"},
        },
        session_id="sess-1",
    )
    log.emit(
        "query", {"text": "select * from t", "protocol": "simple", "truncated": False}, session_id="sess-1"
    )
    log.emit(
        "result",
        {"rows": 3, "command_tag": "SELECT 3", "outcome": "success", "duration_ms": 1.25},
        session_id="sess-1",
    )
    log.emit("query", {"text": "drop table t", "protocol": "simple"}, session_id="sess-1")
    log.emit(
        "policy.decision",
        {"scope": "statement", "effect": "block", "rule_id": "block-drop",
         "reason": "DROP is not allowed", "policy_version": "ab" * 32},
        session_id="sess-1",
    )
    log.emit(
        "result",
        {
            "rows": 0,
            "command_tag": None,
            "outcome": "blocked",
            "duration_ms": 0.1,
            "error": {"sqlstate": "42501", "message": "blocked"},
        },
        session_id="sess-1",
    )
    # A statement whose answer came before its record was written: one record.
    log.emit("query", {"text": "select $1", "protocol": "extended", "parameters": ["7"],
                       "result": {"rows": 1, "command_tag": "SELECT 1", "outcome": "failure",
                                  "duration_ms": 2500.0,
                                  "error": {"sqlstate": "22012", "message": "division by zero"}}},
             session_id="sess-1")
    log.emit(
        "session.end",
        {
            "reason": "client terminated",
            "outcome": "success",
            "statements": 2,
            "bytes_from_client": 50,
            "bytes_from_server": 90,
            "duration_ms": 12.0,
        },
        session_id="sess-1",
    )
    session_events(log, "sess-2")
    log.close()


def test_show_lists_one_session(audit_dir: Path, signer: Signer, key_path: Path) -> None:
    """show prints exactly the records of the named session, in order."""
    build(audit_dir, signer)
    result = run(audit_dir, key_path, "show", "sess-1", "--json")
    assert result.exit_code == 0, result.output
    recs = [json.loads(line) for line in result.output.splitlines()]
    assert [r["type"] for r in recs] == ["session.start", "query", "result", "query",
                                         "policy.decision", "result", "query", "session.end"]
    assert [r["index"] for r in recs] == list(range(8))
    assert run(audit_dir, key_path, "show", "nope").exit_code == 1


def test_replay_tells_the_session(audit_dir: Path, signer: Signer, key_path: Path) -> None:
    """replay shows who connected, each statement with its result, and the end, with timings."""
    build(audit_dir, signer)
    result = run(audit_dir, key_path, "replay", "sess-1")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "psql -h db" in out and "as alice to app" in out
    assert out.index("select * from t") < out.index("SELECT 3") < out.index("drop table t")
    assert "42501" in out and "client terminated" in out
    assert "policy: block statement (block-drop): DROP is not allowed" in out
    assert "extended query: select $1 with parameters ['7']" in out
    # The result a query record carries is told as any other.
    # ... at the time it ended: the statement's start and its duration.
    assert re.search(r"\+ {4}2\.5\d\ds {4}-> failure SELECT 1 rows=1 in 2500.0 ms error 22012: "
                     r"division by zero", out), out
    assert out.index("select $1") < out.index("22012") < out.index("client terminated")
    assert "+    0.000s" in out


def test_verify_ok_and_failure_exit_codes(audit_dir: Path, signer: Signer, key_path: Path) -> None:
    """verify exits 0 on an intact log and 1 naming the first bad seq after tampering."""
    build(audit_dir, signer)
    result = run(audit_dir, key_path, "verify")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok:")
    (_, seg), *_ = list_segments(audit_dir)
    env = lmdb.open(str(seg), max_dbs=8)
    with env.begin(write=True) as txn:
        db = env.open_db(DB_RECORDS, txn=txn)
        raw = bytearray(txn.get(u64(3), db=db))
        raw[-2] ^= 0x20
        txn.put(u64(3), bytes(raw), db=db)
    env.close()
    result = run(audit_dir, key_path, "verify")
    assert result.exit_code == 1
    assert "FAILED seq 3:" in result.output


def test_verify_with_witness_file(audit_dir: Path, signer: Signer, key_path: Path, tmp_path: Path) -> None:
    """verify --witness accepts the exported checkpoints and rejects a witness from the future."""
    export = tmp_path / "cp.jsonl"
    build(audit_dir, signer, export)
    result = run(audit_dir, key_path, "verify", "--witness", str(export))
    assert result.exit_code == 0, result.output
    assert "witness: size" in result.output
    from audit.checkpoint import Checkpoint

    future = tmp_path / "future.note"
    future.write_text(Checkpoint("test.host/ringfence/audit", 10**6, bytes(32)).sign(signer).note)
    result = run(audit_dir, key_path, "verify", "--witness", str(future))
    assert result.exit_code == 1
    assert "rolled back" in result.output


def test_prove_bundle_checks_out_for_a_third_party(audit_dir: Path, signer: Signer, key_path: Path) -> None:
    """prove emits a record, its proof and a signed checkpoint that verify with only the public key."""
    build(audit_dir, signer)
    result = run(audit_dir, key_path, "prove", "2")
    assert result.exit_code == 0, result.output
    bundle = json.loads(result.output)
    verifier = Verifier.parse(run(audit_dir, key_path, "key").output)
    check_inclusion_bundle(bundle, verifier)
    assert bundle["leaf_hash"] == leaf_hash(bytes.fromhex(bundle["record"])).hex()
    raw = bytearray.fromhex(bundle["record"])
    raw[-1] ^= 0x01
    bundle["record"] = raw.hex()

    with pytest.raises(AuditError):
        check_inclusion_bundle(bundle, verifier)


def test_consistency_command(audit_dir: Path, signer: Signer, key_path: Path) -> None:
    """consistency prints a proof that verifies; old > new is refused."""
    build(audit_dir, signer)
    result = run(audit_dir, key_path, "consistency", "3", "11")
    assert result.exit_code == 0, result.output
    c = json.loads(result.output)
    verify_consistency(
        3,
        11,
        bytes.fromhex(c["old_root"]),
        bytes.fromhex(c["new_root"]),
        [bytes.fromhex(h) for h in c["proof"]],
    )
    assert run(audit_dir, key_path, "consistency", "11", "3").exit_code == 1


def test_export_jsonl_and_ocsf(audit_dir: Path, signer: Signer, key_path: Path) -> None:
    """export writes every record as JSONL, or as OCSF events with class and query text."""
    build(audit_dir, signer)
    jsonl = run(audit_dir, key_path, "export", "--format", "jsonl")
    assert jsonl.exit_code == 0, jsonl.output
    rows = [json.loads(x) for x in jsonl.output.splitlines()]
    assert [r["seq"] for r in rows] == list(range(len(rows)))
    ocsf = run(audit_dir, key_path, "export", "--format", "ocsf")
    events = [json.loads(x) for x in ocsf.output.splitlines()]
    q = next(e for e in events if e["metadata"]["event_code"] == "query")
    assert q["class_uid"] == 6005 and q["query_info"]["query_string"] == "select * from t"
    # A query carrying its result is the whole activity: its status is the result's.
    last = next(e for e in events if e["metadata"]["event_code"] == "query"
                and e["query_info"]["query_string"] == "select $1")
    assert last["status"] == "Failure" and last["status_code"] == "22012"
    assert last["unmapped"]["command_tag"] == "SELECT 1" and "result" not in last["unmapped"]
    assert "status" not in q
    start = next(e for e in events if e["metadata"]["event_code"] == "session.start")
    assert start["src_endpoint"] == {"ip": "10.0.0.7", "port": 40000}
    assert start["actor"]["process"]["pid"] == 4242


def test_export_time_window(audit_dir: Path, signer: Signer, key_path: Path) -> None:
    """--since/--until keep only records inside the window."""
    build(audit_dir, signer)
    rows = [json.loads(x) for x in run(audit_dir, key_path, "export").output.splitlines()]
    mid = rows[len(rows) // 2]["ts"]
    after = run(audit_dir, key_path, "export", "--since", mid).output.splitlines()
    before = run(audit_dir, key_path, "export", "--until", mid).output.splitlines()
    assert 0 < len(after) < len(rows) and len(after) + len(before) == len(rows)
    assert run(audit_dir, key_path, "export", "--since", "yesterday").exit_code == 2


def test_key_prints_verifier(signer: Signer, key_path: Path, audit_dir: Path) -> None:
    """key prints the verifier key matching the private key, and the private key is mode 0600."""
    result = run(audit_dir, key_path, "key")
    assert result.exit_code == 0
    assert Verifier.parse(result.output) == signer.verifier
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert "PRIVATE" not in result.output
