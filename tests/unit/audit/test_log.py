"""AuditLog: ordering, envelope fields, durability classes, restart, backpressure."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from audit.errors import AuditError, AuditUnavailable, UnknownEventType
from audit.merkle import leaf_hash
from audit.schema import ZERO_HASH
from audit.store import Store
from tests.unit.audit.conftest import session_events


def read_all(path: Path) -> list[Any]:
    with Store(path) as store:
        return list(store.iter_records())


def test_records_get_seq_host_session_index_and_chain(new_log: Any, audit_dir: Path) -> None:
    """Records are numbered, stamped, indexed per session and linked to the previous leaf hash."""
    log = new_log()
    session_events(log, "s1", statements=2)
    log.emit("agent.stop", {"reason": "test"})
    log.close()
    recs = [r for r in read_all(audit_dir) if r.type != "checkpoint"]
    assert [r.seq for r in recs] == list(range(len(recs)))
    assert [r.index for r in recs[:6]] == [0, 1, 2, 3, 4, 5]
    assert recs[-1].session_id is None and recs[-1].index is None
    assert all(r.host == "test.host" for r in recs)
    assert recs[0].prev == ZERO_HASH
    for a, b in zip(recs, recs[1:], strict=False):
        assert b.prev == leaf_hash(a.raw)
        assert b.ts_ns >= a.ts_ns - 10**9


def test_session_index_restarts_after_session_end(new_log: Any, audit_dir: Path) -> None:
    """A session id reused after its session.end starts again at index 0."""
    log = new_log()
    session_events(log, "s1", statements=1)
    session_events(log, "s1", statements=1)
    log.close()
    idx = [r.index for r in read_all(audit_dir) if r.session_id == "s1"]
    assert idx == [0, 1, 2, 3, 0, 1, 2, 3]


def test_emit_durable_returns_committed_seq(new_log: Any, audit_dir: Path) -> None:
    """emit_durable returns the record's seq only once the record can be read back."""
    log = new_log(batch_max_delay_ms=200.0)
    log.emit("agent.start", {"version": "t"})

    async def decide() -> int:
        return await log.emit_durable("policy.decision", {"action": "deny"}, session_id="s")

    seq = asyncio.run(decide())
    with Store(audit_dir) as store:
        rec = store.get(seq)
    assert rec is not None and rec.type == "policy.decision" and rec.event["action"] == "deny"
    assert seq == 1


def test_unknown_and_store_only_types_are_refused(new_log: Any) -> None:
    """Producers cannot emit undefined types nor the store's own checkpoint and loss records."""
    log = new_log()
    for bad in ("nope", "checkpoint", "audit.loss"):
        with pytest.raises(UnknownEventType):
            log.emit(bad, {})


def test_emit_after_close_is_refused(new_log: Any) -> None:
    """A closed log raises AuditUnavailable instead of dropping the record."""
    log = new_log()
    log.close()
    log.close()
    assert not log.healthy
    with pytest.raises(AuditUnavailable):
        log.emit("agent.stop", {"reason": "late"})


def test_restart_continues_chain(new_log: Any, audit_dir: Path) -> None:
    """A reopened log continues seq numbers and the hash chain where it stopped."""
    log = new_log()
    session_events(log, "a")
    log.close()
    before = read_all(audit_dir)
    log2 = new_log()
    log2.emit("agent.start", {"version": "2"})
    log2.close()
    after = read_all(audit_dir)
    first_new = after[len(before)]
    assert first_new.seq == before[-1].seq + 1
    assert first_new.prev == leaf_hash(before[-1].raw)


def test_full_queue_blocks_producer_until_writer_drains(new_log: Any, audit_dir: Path) -> None:
    """With a tiny queue a fast producer waits instead of losing records."""
    log = new_log(queue_size=16, batch_max_records=4)
    n = 2000
    for i in range(n):
        log.emit("query", {"text": f"q{i}"}, session_id="s")
    log.close()
    queries = [r for r in read_all(audit_dir) if r.type == "query"]
    assert [r.event["text"] for r in queries] == [f"q{i}" for i in range(n)]


def test_flush_waits_for_commit(new_log: Any, audit_dir: Path) -> None:
    """flush returns only after everything emitted before it is readable."""
    log = new_log(batch_max_delay_ms=50.0)
    for i in range(10):
        log.emit("query", {"text": str(i)})
    assert log.flush(5.0)
    with Store(audit_dir) as store:
        assert store.next_seq() >= 10


def test_emit_from_many_threads_keeps_every_record(new_log: Any, audit_dir: Path) -> None:
    """Concurrent producers each see all their records stored, in their own order."""
    log = new_log(queue_size=64)

    def produce(t: int) -> None:
        for i in range(300):
            log.emit("query", {"text": f"{t}:{i}"}, session_id=f"s{t}")

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    log.close()
    recs = read_all(audit_dir)
    for t in range(4):
        mine = [r for r in recs if r.session_id == f"s{t}"]
        assert [r.event["text"] for r in mine] == [f"{t}:{i}" for i in range(300)]
        assert [r.index for r in mine] == list(range(300))


def test_time_based_checkpoint_is_written(new_log: Any, audit_dir: Path) -> None:
    """A checkpoint record appears after checkpoint_every_seconds even without more records."""
    log = new_log(checkpoint_every_seconds=0.05)
    log.emit("agent.start", {"version": "t"})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if any(r.type == "checkpoint" for r in read_all(audit_dir)):
            break
        time.sleep(0.02)
    cps = [r for r in read_all(audit_dir) if r.type == "checkpoint"]
    assert cps and cps[0].event["size"] == 1


def test_unencodable_event_is_refused_and_next_one_is_clean(new_log: Any, audit_dir: Path) -> None:
    """An event msgpack cannot encode raises at emit and leaves no trace in the next record."""
    from audit.errors import AuditError

    log = new_log()
    with pytest.raises(AuditError):
        log.emit("query", {"text": "bad", "obj": object()})
    log.emit("query", {"text": "good"})
    log.close()
    recs = [r for r in read_all(audit_dir) if r.type == "query"]
    assert [dict(r.event) for r in recs] == [{"text": "good"}]


def test_map_grows_instead_of_failing(new_log: Any, audit_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A segment whose LMDB map fills up is grown and every record is still written."""
    import audit.store

    monkeypatch.setattr(audit.store, "INITIAL_MAP_BYTES", 1 << 20)
    log = new_log(batch_max_records=64)
    for i in range(3000):
        log.emit("query", {"text": "z" * 1000, "i": i})
    log.close()
    assert log.failure is None
    with Store(audit_dir) as store:
        seg = store.segments[-1]
        assert seg.env.info()["map_size"] > 1 << 20
        assert [r.event["i"] for r in store.iter_records() if r.type == "query"] == list(range(3000))


def test_a_reader_opens_a_store_whose_map_another_process_just_grew(
        new_log: Any, audit_dir: Path) -> None:
    """`ringfence audit tail` opening the store while the agent's writer grows its map (LMDB
    says MDB_MAP_RESIZED to the reader's first transaction) reads it as usual."""
    import subprocess
    import sys

    import lmdb

    import audit.store

    log = new_log()
    session_events(log, "s1")
    log.close()
    segment = audit.store.list_segments(audit_dir)[-1][1]
    # The reader's environment is open; then another process grows the map and fills it.
    env = lmdb.open(str(segment), max_dbs=audit.store.MAX_DBS, subdir=True, create=False,
                    readahead=False, readonly=True)
    size = env.info()["map_size"]
    grow = ("import lmdb, sys\n"
            "env = lmdb.open(sys.argv[1], max_dbs=8, subdir=True, create=False,\n"
            "                map_size=int(sys.argv[2]) * 4)\n"
            "with env.begin(write=True) as txn:\n"
            "    txn.put(b'more', b'x' * int(sys.argv[2]) * 2, db=env.open_db(b'more', txn=txn))\n")
    subprocess.run([sys.executable, "-c", grow, str(segment), str(size)], check=True, timeout=120)
    with pytest.raises(lmdb.MapResizedError):
        env.begin().abort()  # what LMDB says to the reader
    shared = audit.store.SharedEnv(segment, env, writable=False)
    with audit.store.ReadTxn(shared) as txn:
        assert txn.get(b"next_seq", db=shared.dbs[audit.store.DB_META]) is not None
    env.close()


def test_a_reader_never_waits_for_the_writers_lock(new_log: Any, audit_dir: Path) -> None:
    """`ringfence audit tail` opens and reads the trail while the agent's writer holds
    LMDB's writer lock (a commit under way): opening takes no lock of the writer's, so a
    reader that is stopped or slow can never hold up the agent's commits either."""
    import subprocess
    import sys

    import audit.store

    log = new_log()
    session_events(log, "s1")
    log.close()
    segment = audit.store.list_segments(audit_dir)[-1][1]
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import lmdb, sys\n"
         "env = lmdb.open(sys.argv[1], max_dbs=8, subdir=True, create=False)\n"
         "txn = env.begin(write=True)\n"
         "print('held', flush=True)\n"
         "sys.stdin.read()\n", str(segment)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        # A reader of its own, as `audit tail` is (py-lmdb holds the GIL while it waits).
        try:
            reader = subprocess.run(
                [sys.executable, "-c",
                 "import sys\n"
                 "from pathlib import Path\n"
                 "from audit.store import Store\n"
                 "with Store(Path(sys.argv[1])) as store:\n"
                 "    print(' '.join(r.type for r in store.iter_records()))\n",
                 str(audit_dir)],
                cwd=Path(__file__).parents[3], capture_output=True, check=True, timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the reader waited for the writer's lock")
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(30)
    read = reader.stdout.decode().split()
    assert read[0] == "session.start" and "session.end" in read


def test_a_segment_whose_databases_are_not_made_yet_is_left_for_later(
        new_log: Any, audit_dir: Path) -> None:
    """The writer creates a new segment's environment, then its databases: a reader
    looking in between skips it (it is the newest) and finds it once it is made."""
    import lmdb

    import audit.store

    log = new_log()
    session_events(log, "s1")
    log.close()
    path = audit.store.segment_path(audit_dir, 2)
    path.mkdir(mode=0o700)
    lmdb.open(str(path), max_dbs=audit.store.MAX_DBS, subdir=True).close()
    with Store(audit_dir) as store:
        assert [s.number for s in store.segments] == [1]
        assert _named_databases(path) == []  # (the reader made none)
        seg = audit.store.create_segment(audit_dir, 2, store.next_seq(), time.time_ns(),
                                         None, [])
        audit.store.release_env(seg.shared)
        store.refresh()
        assert [s.number for s in store.segments] == [1, 2]


def _named_databases(path: Path) -> list[bytes]:
    import lmdb

    env = lmdb.open(str(path), max_dbs=8, subdir=True, readonly=True)
    try:
        with env.begin() as txn:
            return [key for key, _ in txn.cursor()]
    finally:
        env.close()


class _Growing:
    """An LMDB environment another process keeps growing: its first ``refusals``
    transactions are refused with MDB_MAP_RESIZED."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.adopted = 0

    def begin(self, **kwargs: Any) -> Any:
        import lmdb

        if self.refusals:
            self.refusals -= 1
            raise lmdb.MapResizedError("MDB_MAP_RESIZED")
        return mock.Mock()

    def set_mapsize(self, size: int) -> None:
        assert size == 0  # adopt the size the other process set
        self.adopted += 1

    def path(self) -> str:
        return "/var/lib/ringfence/audit/segment-1"


def test_a_reader_adopts_a_map_grown_several_times_while_it_starts() -> None:
    """The writer may grow the map again between a reader adopting the new size and its
    next try: the reader adopts each size and reads; when the store never settles, it
    says so and leaves nothing held."""
    import audit.store

    env = _Growing(3)
    shared = mock.Mock(env=env, resize_lock=threading.Lock())
    with audit.store.ReadTxn(shared):
        assert shared.resize_lock.locked()
    assert env.adopted == 3 and not shared.resize_lock.locked()

    shared.env = _Growing(1000)
    with pytest.raises(AuditError, match="kept growing while it was being read"), \
            audit.store.ReadTxn(shared):
        pass
    assert not shared.resize_lock.locked()
