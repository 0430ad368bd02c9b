"""Verification: the untouched log verifies; every kind of tampering is found at the right seq."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import pytest

from audit.checkpoint import Checkpoint, Signer, open_checkpoint
from audit.log import AuditLog
from audit.merkle import leaf_hash, stored_hash_count, stored_hash_index
from audit.schema import decode_record, encode_envelope, encode_event
from audit.store import DB_CHECKPOINTS, DB_META, DB_NODES, DB_RECORDS, Store, list_segments, node_chunk, u64
from audit.verify import VerifyReport, verify
from tests.unit.audit.conftest import ORIGIN, make_log, session_events


def build(audit_dir: Path, signer: Signer, sessions: int = 4, **kw: Any) -> list[Any]:
    """A closed log with a few sessions and checkpoints every 7 records; returns its records."""
    kw.setdefault("checkpoint_every_records", 7)
    log = make_log(audit_dir, signer, **kw)
    for s in range(sessions):
        session_events(log, f"s{s}")
        log.flush(5)
    log.close()
    with Store(audit_dir) as store:
        return list(store.iter_records())


def check(audit_dir: Path, signer: Signer, witness: str | None = None) -> VerifyReport:
    with Store(audit_dir) as store:
        return verify(store, signer.verifier, origin=ORIGIN, witness=witness)


@contextmanager
def raw_env(audit_dir: Path) -> Iterator[tuple[lmdb.Environment, dict[bytes, Any]]]:
    """The (only) segment's environment opened directly, as an attacker with file access would."""
    (_, path), *_ = list_segments(audit_dir)
    env = lmdb.open(str(path), max_dbs=8, map_size=1 << 28)
    dbs = {n: env.open_db(n) for n in (DB_RECORDS, DB_NODES, DB_META)}
    try:
        yield env, dbs
    finally:
        env.close()


def flip_stored_hash(audit_dir: Path, si: int, byte: int) -> None:
    """Flip one byte of stored hash ``si`` in place."""
    with raw_env(audit_dir) as (env, dbs), env.begin(write=True) as txn:
        found = node_chunk(txn, dbs[DB_NODES], si)
        assert found is not None
        start, value = found
        chunk = bytearray(value)
        chunk[(si - start) * 32 + byte] ^= 0x80
        txn.put(u64(start), bytes(chunk), db=dbs[DB_NODES])


def get_raw(audit_dir: Path, seq: int) -> bytes:
    with Store(audit_dir) as store:
        raw = store.get_raw(seq)
    assert raw is not None
    return raw


def put_raw(audit_dir: Path, seq: int, raw: bytes) -> None:
    with raw_env(audit_dir) as (env, dbs), env.begin(write=True) as txn:
        txn.put(u64(seq), raw, db=dbs[DB_RECORDS])


def first_non_checkpoint(records: list[Any], at_least: int) -> int:
    return next(r.seq for r in records if r.seq >= at_least and r.type != "checkpoint")


def assert_bad(report: VerifyReport, seq: int | None, words: str) -> None:
    assert not report.ok, "tampering was not detected"
    assert report.problem is not None
    assert report.problem.seq == seq, str(report.problem)
    assert words in report.problem.what, str(report.problem)


def test_untouched_log_verifies(audit_dir: Path, signer: Signer) -> None:
    """A log written and closed normally verifies, with its checkpoints counted."""
    records = build(audit_dir, signer)
    report = check(audit_dir, signer)
    assert report.ok, str(report.problem)
    assert report.records == len(records)
    assert report.checkpoints == sum(r.type == "checkpoint" for r in records) >= 3
    assert report.latest is not None and report.latest.size == records[-1].seq


def test_flipped_byte_in_record_body(audit_dir: Path, signer: Signer) -> None:
    """A changed byte inside a record's event is found at that record's seq."""
    records = build(audit_dir, signer)
    seq = first_non_checkpoint(records, 10)
    raw = bytearray(get_raw(audit_dir, seq))
    pos = raw.rindex(b"select")
    raw[pos] ^= 0x01
    put_raw(audit_dir, seq, bytes(raw))
    assert_bad(check(audit_dir, signer), seq, "leaf hash does not match")


def test_flipped_byte_in_stored_hash(audit_dir: Path, signer: Signer) -> None:
    """A changed byte in a stored Merkle node is found at the record that completes that node."""
    build(audit_dir, signer)
    flip_stored_hash(audit_dir, stored_hash_index(1, 6), 0)  # the node over leaves 12 and 13
    assert_bad(check(audit_dir, signer), 13, "tree node (level 1)")


def test_flipped_byte_in_stored_leaf_hash(audit_dir: Path, signer: Signer) -> None:
    """A changed stored leaf hash is found at its record."""
    build(audit_dir, signer)
    flip_stored_hash(audit_dir, stored_hash_index(0, 5), 31)
    assert_bad(check(audit_dir, signer), 5, "leaf hash")


def test_flipped_byte_in_checkpoint(audit_dir: Path, signer: Signer) -> None:
    """A changed byte in a checkpoint record's signed note is reported at that checkpoint."""
    records = build(audit_dir, signer)
    cp = next(r for r in records if r.type == "checkpoint" and r.seq > 5)
    raw = bytearray(get_raw(audit_dir, cp.seq))
    note = cp.event["note"].encode()
    pos = raw.index(note) + len(note) - 10  # inside the base64 signature
    raw[pos] = ord("A") if raw[pos] != ord("A") else ord("B")
    put_raw(audit_dir, cp.seq, bytes(raw))
    assert_bad(check(audit_dir, signer), cp.seq, "signature does not verify")


def test_deleted_middle_record(audit_dir: Path, signer: Signer) -> None:
    """A record removed from the middle is reported as missing at its seq."""
    build(audit_dir, signer)
    with raw_env(audit_dir) as (env, dbs), env.begin(write=True) as txn:
        txn.delete(u64(11), db=dbs[DB_RECORDS])
    assert_bad(check(audit_dir, signer), 11, "record is missing")


def test_truncated_tail(audit_dir: Path, signer: Signer) -> None:
    """Records cut from the end are reported from the first one missing."""
    records = build(audit_dir, signer)
    n = len(records)
    with raw_env(audit_dir) as (env, dbs), env.begin(write=True) as txn:
        for seq in range(n - 5, n):
            txn.delete(u64(seq), db=dbs[DB_RECORDS])
    assert_bad(check(audit_dir, signer), n - 5, "missing")


def test_truncated_tail_with_counters_rewritten_is_caught_by_witness(audit_dir: Path, signer: Signer) -> None:
    """A careful truncation (records, hashes and counter) is caught by a later witness checkpoint."""
    build(audit_dir, signer)
    with Store(audit_dir) as store:
        witness = make_witness(store, signer)
        n = store.next_seq()
    with raw_env(audit_dir) as (env, dbs), env.begin(write=True) as txn:
        cut = n - 6
        for seq in range(cut, n):
            txn.delete(u64(seq), db=dbs[DB_RECORDS])
        keep = stored_hash_count(cut)
        found = node_chunk(txn, dbs[DB_NODES], keep)
        assert found is not None
        start, value = found
        txn.put(u64(start), value[: (keep - start) * 32], db=dbs[DB_NODES])
        cur = txn.cursor(db=dbs[DB_NODES])
        if cur.set_range(u64(start + 1)):
            while cur.delete():
                pass
        txn.put(b"next_seq", u64(cut), db=dbs[DB_META])
        cps = env.open_db(DB_CHECKPOINTS, txn=txn)
        for size, seq in list(txn.cursor(db=cps)):
            if int.from_bytes(seq, "big") >= cut:
                txn.delete(size, db=cps)
    assert check(audit_dir, signer).ok
    assert_bad(check(audit_dir, signer, witness), n - 6, "rolled back")


def make_witness(store: Store, signer: Signer) -> str:
    """A checkpoint of the whole current log, as an off-host witness would have kept it."""
    from audit.merkle import tree_root

    size = store.next_seq()
    return Checkpoint(ORIGIN, size, tree_root(size, store.read_hash)).sign(signer).note


def test_two_records_swapped(audit_dir: Path, signer: Signer) -> None:
    """Two records exchanged are reported at the first of them."""
    build(audit_dir, signer)
    a, b = get_raw(audit_dir, 8), get_raw(audit_dir, 9)
    put_raw(audit_dir, 8, b)
    put_raw(audit_dir, 9, a)
    assert_bad(check(audit_dir, signer), 8, "says it is seq 9")


def test_duplicated_record(audit_dir: Path, signer: Signer) -> None:
    """A record copied over its successor is reported at the copy."""
    build(audit_dir, signer)
    put_raw(audit_dir, 10, get_raw(audit_dir, 9))
    assert_bad(check(audit_dir, signer), 10, "says it is seq 9")


def test_duplicated_record_appended(audit_dir: Path, signer: Signer) -> None:
    """A record replayed after the end is reported at the position it was appended to."""
    records = build(audit_dir, signer)
    n = len(records)
    put_raw(audit_dir, n, get_raw(audit_dir, 3))
    assert_bad(check(audit_dir, signer), n, "says it is seq 3")


def test_forged_record_inserted(audit_dir: Path, signer: Signer) -> None:
    """A well-formed forged record spliced in (later records shifted) is found where it sits."""
    records = build(audit_dir, signer)
    n = len(records)
    k = first_non_checkpoint(records, 12)
    prev = leaf_hash(get_raw(audit_dir, k - 1))
    forged = encode_envelope(
        k, records[k].ts_ns, prev, "query", "test.host", "s1", 3, encode_event({"text": "forged"})
    )
    shifted = [get_raw(audit_dir, s) for s in range(k, n)]
    with raw_env(audit_dir) as (env, dbs), env.begin(write=True) as txn:
        txn.put(u64(k), forged, db=dbs[DB_RECORDS])
        for i, raw in enumerate(shifted):
            txn.put(u64(k + 1 + i), raw, db=dbs[DB_RECORDS])
        txn.put(b"next_seq", u64(n + 1), db=dbs[DB_META])
    assert decode_record(forged).prev == prev
    assert_bad(check(audit_dir, signer), k, "leaf hash does not match")


def test_rollback_to_older_copy_is_caught_by_witness(audit_dir: Path, signer: Signer, tmp_path: Path) -> None:
    """Restoring an older copy of the store verifies alone but fails against a newer witness."""
    build(audit_dir, signer, sessions=2)
    old_copy = tmp_path / "old"
    shutil.copytree(audit_dir, old_copy)
    with Store(audit_dir) as store:
        old_size = store.next_seq()
    log = make_log(audit_dir, signer, checkpoint_every_records=5)
    session_events(log, "later")
    log.close()
    with Store(audit_dir) as store:
        witness = make_witness(store, signer)
    shutil.rmtree(audit_dir)
    shutil.copytree(old_copy, audit_dir)
    assert check(audit_dir, signer).ok
    assert_bad(check(audit_dir, signer, witness), old_size, "rolled back")


def test_witness_from_export_file_verifies(audit_dir: Path, signer: Signer, tmp_path: Path) -> None:
    """The exported checkpoint file, used as witness, verifies against the untouched log."""
    export = tmp_path / "checkpoints.jsonl"
    build(audit_dir, signer, checkpoint_export=str(export))
    text = export.read_text()
    assert text.count("\n") >= 3
    report = check(audit_dir, signer, text)
    assert report.ok, str(report.problem)
    assert report.witness is not None and report.witness.size > 0


def test_witness_with_bad_signature(audit_dir: Path, signer: Signer) -> None:
    """A witness whose signature was altered is refused."""
    build(audit_dir, signer)
    with Store(audit_dir) as store:
        note = make_witness(store, signer)
    i = len(note) - 12  # inside the signature, after the key ID
    bad = note[:i] + ("B" if note[i] != "B" else "C") + note[i + 1 :]
    assert_bad(check(audit_dir, signer, bad), None, "signature does not verify")


def test_witness_signed_by_unknown_key(audit_dir: Path, signer: Signer) -> None:
    """A witness signed by another key is refused as unknown."""
    build(audit_dir, signer)
    with Store(audit_dir) as store:
        other = Signer.generate(ORIGIN)
        from audit.merkle import tree_root

        n = store.next_seq()
        note = Checkpoint(ORIGIN, n, tree_root(n, store.read_hash)).sign(other).note
    assert_bad(check(audit_dir, signer, note), None, "not signed by a known key")


def test_witness_of_another_origin(audit_dir: Path, signer: Signer) -> None:
    """A checkpoint of another log (other origin line) is refused."""
    build(audit_dir, signer)
    with Store(audit_dir) as store:
        cp = open_checkpoint(make_witness(store, signer), signer.verifier)
    note = Checkpoint("elsewhere.example/log", cp.size, cp.root).sign(signer).note
    assert_bad(check(audit_dir, signer, note), None, "origin")


def test_fork_same_size_other_root(audit_dir: Path, signer: Signer) -> None:
    """A witness of the same size but another root is reported as a fork."""
    build(audit_dir, signer)
    with Store(audit_dir) as store:
        n = store.next_seq()
    note = Checkpoint(ORIGIN, n, leaf_hash(b"other history")).sign(signer).note
    assert_bad(check(audit_dir, signer, note), n - 1, "fork")


def test_log_smaller_than_witness(audit_dir: Path, signer: Signer) -> None:
    """A log whose checkpoints are all smaller than the witness's is reported at its end."""
    build(audit_dir, signer)
    with Store(audit_dir) as store:
        n = store.next_seq()
    note = Checkpoint(ORIGIN, n + 10, leaf_hash(b"future")).sign(signer).note
    assert_bad(check(audit_dir, signer, note), n, f"covers {n + 10}")


def test_checkpoint_record_signed_by_unknown_key(audit_dir: Path, signer: Signer) -> None:
    """A log whose checkpoints were signed by another key does not verify with ours."""
    records = build(audit_dir, signer)
    first_cp = next(r for r in records if r.type == "checkpoint")
    other = Signer.generate(ORIGIN)
    report = check(audit_dir, Signer.parse(other.text()))
    assert_bad(report, first_cp.seq, "not signed by a known key")


def test_checkpoint_record_with_other_origin(audit_dir: Path, signer: Signer) -> None:
    """Checkpoint records of another origin are reported when verifying this log's origin."""
    records = build(audit_dir, signer)
    first_cp = next(r for r in records if r.type == "checkpoint")
    with Store(audit_dir) as store:
        report = verify(store, signer.verifier, origin="another.host/ringfence/audit")
    assert_bad(report, first_cp.seq, "origin")


def test_restart_after_many_reopens_still_verifies(audit_dir: Path, signer: Signer) -> None:
    """Reopening the log repeatedly keeps one valid chain and tree."""
    for i in range(3):
        log: AuditLog = make_log(audit_dir, signer, checkpoint_every_records=3)
        session_events(log, f"r{i}")
        log.close()
    report = check(audit_dir, signer)
    assert report.ok, str(report.problem)


@pytest.mark.parametrize("segment_bytes", [1 << 20])
def test_segments_rotate_and_verify(audit_dir: Path, signer: Signer, segment_bytes: int) -> None:
    """Rotation by size starts segments with the previous final checkpoint; the log verifies."""
    log = make_log(audit_dir, signer, segment_max_bytes=segment_bytes, batch_max_records=256)
    blob = "x" * 2000
    for i in range(2000):
        log.emit("query", {"text": blob, "i": i}, session_id="big")
    log.close()
    segs = list_segments(audit_dir)
    assert len(segs) >= 2
    with Store(audit_dir) as store:
        second = store.segments[1]
        first_rec = store.get(second.first_seq)
        assert first_rec is not None and first_rec.type == "checkpoint"
        assert first_rec.event["size"] == second.first_seq
        assert second.prev_checkpoint == first_rec.event["note"]
        queries = [r.event["i"] for r in store.iter_records() if r.type == "query"]
    assert queries == list(range(2000))
    report = check(audit_dir, signer)
    assert report.ok, str(report.problem)


def test_archived_old_segment_still_verifies_from_carried_checkpoint(
    audit_dir: Path, signer: Signer, tmp_path: Path
) -> None:
    """With the first segment moved away, verification starts from the checkpoint the next carries."""
    log = make_log(audit_dir, signer, segment_max_bytes=1 << 20, batch_max_records=256)
    for i in range(1500):
        log.emit("query", {"text": "y" * 2000, "i": i})
    log.close()
    segs = list_segments(audit_dir)
    assert len(segs) >= 2
    shutil.move(str(segs[0][1]), str(tmp_path / "archive"))
    report = check(audit_dir, signer)
    assert report.ok, str(report.problem)
    assert report.first_seq > 0


def test_segments_rotate_by_age_without_spinning(audit_dir: Path, signer: Signer) -> None:
    """An old segment is closed after segment_max_age_seconds; an idle log does not keep rotating."""
    import time

    log = make_log(audit_dir, signer, segment_max_age_seconds=0.2)
    log.emit("agent.start", {"version": "t"})
    log.flush(5)
    cpu0 = time.process_time()
    time.sleep(1.0)
    busy = time.process_time() - cpu0
    log.emit("agent.stop", {"reason": "t"})
    log.close()
    segs = list_segments(audit_dir)
    assert 2 <= len(segs) <= 3, segs
    assert busy < 0.5, f"writer was busy for {busy:.2f}s of CPU while idle"
    assert check(audit_dir, signer).ok


def test_checkpoint_index_pointing_elsewhere(audit_dir: Path, signer: Signer) -> None:
    """A checkpoint index entry redirected to a record that is not that checkpoint is reported."""
    records = build(audit_dir, signer)
    cp = next(r for r in records if r.type == "checkpoint")
    with raw_env(audit_dir) as (env, _), env.begin(write=True) as txn:
        db = env.open_db(DB_CHECKPOINTS, txn=txn)
        txn.put(u64(cp.event["size"]), u64(cp.seq - 1), db=db)
    assert_bad(check(audit_dir, signer), cp.seq - 1, "checkpoint index")
