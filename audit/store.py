"""The on-disk layout: segments (one LMDB environment each) and short read transactions.

``<path>/seg-NNNNNN/`` is one LMDB environment holding, in named databases:

``records``      seq (8 bytes big-endian) -> the stored envelope bytes
``nodes``        index of the first stored hash a commit appended (8 bytes big-endian)
                 -> those 32-byte Merkle hashes, concatenated (one entry per commit)
``sessions``     session_id (utf-8) -> seq of its ``session.start``
``checkpoints``  tree size (8 bytes big-endian) -> seq of the checkpoint record
``meta``         format, segment number, first_seq, created_ns, next_seq,
                 and for segments after the first: the previous segment's final
                 checkpoint note and the tree frontier at first_seq

Records, their hashes and ``next_seq`` are written in one transaction.
Environments are opened without ``writemap`` (a full disk then fails a commit
with ENOSPC instead of killing the process with SIGBUS) and with ``sync`` and
``metasync`` on (every commit is fsync'd; group commit amortises it).

Only the writer opens an environment for writing. Readers (``audit tail``,
``audit verify``, any ``Store`` not made by the writer) open it read-only, so
nothing they do takes LMDB's writer lock: a reader that is stopped or slow can
never hold up the agent's commits.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import msgpack

from audit.errors import AuditError, StoreCorrupt
from audit.merkle import Frontier, stored_hash_count, stored_hash_index
from audit.schema import Record, decode_record

FORMAT = b"ringfence-audit 1"
SEGMENT_PREFIX = "seg-"
MAX_DBS = 8
INITIAL_MAP_BYTES = 32 * 1024 * 1024
READ_BATCH = 1024

T = TypeVar("T")

DB_RECORDS = b"records"
DB_NODES = b"nodes"
DB_SESSIONS = b"sessions"
DB_CHECKPOINTS = b"checkpoints"
DB_META = b"meta"


def u64(n: int) -> bytes:
    """An unsigned 64-bit big-endian key."""
    return n.to_bytes(8, "big")


def from_u64(b: bytes | memoryview) -> int:
    """Decode an unsigned 64-bit big-endian key."""
    return int.from_bytes(b, "big")


class SharedEnv:
    """One open LMDB environment, shared within the process (LMDB forbids opening it twice)."""

    def __init__(self, path: Path, env: lmdb.Environment, *, writable: bool) -> None:
        self.path = path
        self.env = env
        self.writable = writable
        self.refs = 0
        # Held by same-process readers for the length of a read transaction and by
        # the writer while it grows the map (LMDB forbids resizing under live txns).
        self.resize_lock = threading.Lock()
        self.dbs = _open_dbs(env, path, writable=writable)


_DB_NAMES = (DB_RECORDS, DB_NODES, DB_SESSIONS, DB_CHECKPOINTS, DB_META)


def _open_dbs(env: lmdb.Environment, path: Path, *, writable: bool) -> dict[bytes, Any]:
    """The segment's named databases. Opening them takes a transaction: a write
    transaction (which creates them) for the writer, a read transaction for a reader."""
    try:
        return _adopting_growth(env, lambda: {name: env.open_db(name, create=writable)
                                              for name in _DB_NAMES})
    except lmdb.NotFoundError:  # (a reader's)
        # The writer has created the environment and not yet its databases.
        raise StoreCorrupt(f"{path}: not a ringfence audit segment (its databases are "
                           "missing)") from None


def _adopting_growth(env: lmdb.Environment, start: Callable[[], T]) -> T:
    """``start()``, which begins a transaction. LMDB refuses one (MDB_MAP_RESIZED) when
    another process grew the map since this one last adopted its size, as the agent's
    writer does while a reader runs: the new size is adopted and it is tried again, a few
    times, since the writer may grow the map again meanwhile."""
    for _ in range(8):
        try:
            return start()
        except lmdb.MapResizedError:
            env.set_mapsize(0)
    raise AuditError(f"{env.path()}: the audit store kept growing while it was being read; "
                     "try again")


_registry: dict[str, SharedEnv] = {}
_registry_lock = threading.Lock()


def acquire_env(path: Path, *, create: bool, writable: bool) -> SharedEnv:
    """Open (or share the already open) LMDB environment at ``path``: for writing (the
    writer; ``create`` makes it), or read-only. A reader shares an environment this
    process opened for writing; the writer cannot share one opened read-only."""
    key = os.path.realpath(path)
    with _registry_lock:
        shared = _registry.get(key)
        if shared is not None and writable and not shared.writable:
            raise AuditError(f"{path}: this process has the segment open read-only; "
                             "close its readers before writing to it")
        if shared is None:
            if not create and not (path / "data.mdb").exists():
                raise StoreCorrupt(f"{path}: no LMDB environment")
            if create:
                path.mkdir(parents=True, exist_ok=True, mode=0o700)
            env = lmdb.open(
                str(path),
                map_size=INITIAL_MAP_BYTES,
                max_dbs=MAX_DBS,
                subdir=True,
                create=create,
                readonly=not writable,
                writemap=False,
                sync=True,
                metasync=True,
                readahead=False,
                max_readers=256,
                mode=0o600,
            )
            try:
                shared = SharedEnv(path, env, writable=writable)
            except BaseException:
                env.close()
                raise
            _registry[key] = shared
        shared.refs += 1
        return shared


def release_env(shared: SharedEnv) -> None:
    """Drop one reference; the environment is closed with the last one."""
    key = os.path.realpath(shared.path)
    with _registry_lock:
        shared.refs -= 1
        if shared.refs <= 0:
            _registry.pop(key, None)
            shared.env.close()


def list_segments(root: Path) -> list[tuple[int, Path]]:
    """The segment directories under ``root``, oldest first."""
    out: list[tuple[int, Path]] = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return out
    for entry in entries:
        name = entry.name
        if name.startswith(SEGMENT_PREFIX) and name[len(SEGMENT_PREFIX) :].isdigit():
            out.append((int(name[len(SEGMENT_PREFIX) :]), Path(entry.path)))
    out.sort()
    return out


def segment_path(root: Path, number: int) -> Path:
    """The directory of segment ``number``."""
    return root / f"{SEGMENT_PREFIX}{number:06d}"


@dataclass(slots=True)
class Segment:
    """One segment environment and what its meta database says about it."""

    number: int
    shared: SharedEnv
    first_seq: int
    created_ns: int
    prev_checkpoint: str | None = None
    frontier: list[bytes] = field(default_factory=list)

    @property
    def env(self) -> lmdb.Environment:
        """The LMDB environment."""
        return self.shared.env

    def db(self, name: bytes) -> Any:
        """A named database handle."""
        return self.shared.dbs[name]

    def read(self) -> ReadTxn:
        """A short read transaction (context manager)."""
        return ReadTxn(self.shared)

    def next_seq(self) -> int:
        """The seq after the last committed record, as recorded in meta."""
        with self.read() as txn:
            raw = txn.get(b"next_seq", db=self.db(DB_META))
        return from_u64(raw) if raw else self.first_seq

    def size_bytes(self) -> int:
        """Bytes used by the environment's data pages."""
        info = self.env.info()
        stat = self.env.stat()
        return int((info["last_pgno"] + 1) * stat["psize"])


def node_chunk(txn: lmdb.Transaction, db: Any, si: int) -> tuple[int, bytes] | None:
    """The nodes entry (first index, concatenated hashes) holding stored hash ``si``."""
    cur = txn.cursor(db=db)
    if cur.set_range(u64(si)) and from_u64(cur.key()) == si:
        return si, bytes(cur.value())
    if not (cur.prev() if cur.key() else cur.last()):
        return None
    start = from_u64(cur.key())
    value = bytes(cur.value())
    if start <= si < start + len(value) // 32:
        return start, value
    return None


class ReadTxn:
    """A read transaction that adopts a map grown by another process and excludes resizes."""

    def __init__(self, shared: SharedEnv) -> None:
        self.shared = shared
        self.txn: lmdb.Transaction | None = None

    def __enter__(self) -> lmdb.Transaction:
        self.shared.resize_lock.acquire()
        try:
            env = self.shared.env
            self.txn = _adopting_growth(env, lambda: env.begin(buffers=False))
        except BaseException:
            self.shared.resize_lock.release()
            raise
        return self.txn

    def __exit__(self, *exc: object) -> None:
        try:
            if self.txn is not None:
                self.txn.abort()
        finally:
            self.shared.resize_lock.release()


def open_segment(path: Path, number: int, *, writable: bool = False) -> Segment:
    """Open an existing segment (read-only unless ``writable``) and read its meta database."""
    shared = acquire_env(path, create=False, writable=writable)
    try:
        with ReadTxn(shared) as txn:
            meta = shared.dbs[DB_META]
            fmt = txn.get(b"format", db=meta)
            first = txn.get(b"first_seq", db=meta)
            created = txn.get(b"created_ns", db=meta)
            prev = txn.get(b"prev_checkpoint", db=meta)
            frontier = txn.get(b"frontier", db=meta)
    except BaseException:
        release_env(shared)
        raise
    if fmt != FORMAT or first is None or created is None:
        release_env(shared)
        raise StoreCorrupt(f"{path}: not a ringfence audit segment (meta is missing)")
    return Segment(
        number,
        shared,
        from_u64(first),
        from_u64(created),
        bytes(prev).decode() if prev else None,
        list(msgpack.unpackb(frontier)) if frontier else [],
    )


def create_segment(
    root: Path,
    number: int,
    first_seq: int,
    created_ns: int,
    prev_checkpoint: str | None,
    frontier: list[bytes],
) -> Segment:
    """Create a new segment environment and write its meta database."""
    path = segment_path(root, number)
    shared = acquire_env(path, create=True, writable=True)
    meta = shared.dbs[DB_META]
    with shared.env.begin(write=True) as txn:
        txn.put(b"format", FORMAT, db=meta)
        txn.put(b"segment", u64(number), db=meta)
        txn.put(b"first_seq", u64(first_seq), db=meta)
        txn.put(b"created_ns", u64(created_ns), db=meta)
        txn.put(b"next_seq", u64(first_seq), db=meta)
        if prev_checkpoint is not None:
            txn.put(b"prev_checkpoint", prev_checkpoint.encode(), db=meta)
            txn.put(b"frontier", msgpack.packb(frontier), db=meta)
    return Segment(number, shared, first_seq, created_ns, prev_checkpoint, frontier)


class Store:
    """Read access to every segment of an audit directory (short transactions only).
    ``writable``: the writer's, its segments open for writing (see the module's notes)."""

    def __init__(self, root: Path, *, writable: bool = False) -> None:
        self.root = root
        self.writable = writable
        self.segments: list[Segment] = []
        self.refresh()

    def refresh(self) -> None:
        """Open segments created since the last look."""
        known = {s.number for s in self.segments}
        for number, path in list_segments(self.root):
            if number not in known:
                try:
                    self.segments.append(open_segment(path, number, writable=self.writable))
                except StoreCorrupt:
                    # A segment being created right now has no databases or meta yet.
                    if number == max(n for n, _ in list_segments(self.root)):
                        continue
                    raise
        self.segments.sort(key=lambda s: s.number)

    def close(self) -> None:
        """Release every environment."""
        for seg in self.segments:
            release_env(seg.shared)
        self.segments = []

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def first_seq(self) -> int:
        """The first seq still held (0 unless old segments were archived)."""
        return self.segments[0].first_seq if self.segments else 0

    def next_seq(self) -> int:
        """The seq after the last committed record."""
        return self.segments[-1].next_seq() if self.segments else 0

    def segment_for_seq(self, seq: int) -> Segment | None:
        """The segment holding ``seq``."""
        found = None
        for seg in self.segments:
            if seg.first_seq <= seq:
                found = seg
        return found

    def get_raw(self, seq: int) -> bytes | None:
        """The stored bytes of record ``seq``."""
        seg = self.segment_for_seq(seq)
        if seg is None:
            return None
        with seg.read() as txn:
            value = txn.get(u64(seq), db=seg.db(DB_RECORDS))
        return bytes(value) if value is not None else None

    def get(self, seq: int) -> Record | None:
        """Record ``seq`` decoded."""
        raw = self.get_raw(seq)
        return decode_record(raw) if raw is not None else None

    def read_hash(self, level: int, index: int) -> bytes:
        """The stored Merkle hash of the complete subtree (level, index)."""
        si = stored_hash_index(level, index)
        seg = None
        for s in self.segments:
            if stored_hash_count(s.first_seq) <= si:
                seg = s
        if seg is None:
            raise StoreCorrupt(f"no segment holds tree hash ({level}, {index})")
        with seg.read() as txn:
            found = node_chunk(txn, seg.db(DB_NODES), si)
        if found is None:
            raise StoreCorrupt(f"tree hash ({level}, {index}) is missing")
        start, value = found
        return value[(si - start) * 32 : (si - start + 1) * 32]

    def frontier(self, size: int) -> Frontier:
        """The tree frontier at ``size`` from stored hashes (or a segment's saved frontier)."""
        for seg in self.segments:
            if seg.first_seq == size and seg.prev_checkpoint is not None:
                return Frontier(size, seg.frontier)
        return Frontier.load(size, self.read_hash)

    def iter_raw(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(key seq, stored bytes) in key order from ``start``, in short transactions."""
        for i, seg in enumerate(self.segments):
            end = self.segments[i + 1].first_seq if i + 1 < len(self.segments) else None
            if end is not None and end <= start:
                continue
            pos = max(start, seg.first_seq)
            while True:
                chunk: list[tuple[int, bytes]] = []
                with seg.read() as txn:
                    cur = txn.cursor(db=seg.db(DB_RECORDS))
                    if not cur.set_range(u64(pos)):
                        break
                    for key, value in cur:
                        chunk.append((from_u64(key), bytes(value)))
                        if len(chunk) >= READ_BATCH:
                            break
                for seq, raw in chunk:
                    if stop is not None and seq >= stop:
                        return
                    yield seq, raw
                if len(chunk) < READ_BATCH:
                    break
                pos = chunk[-1][0] + 1

    def iter_records(self, start: int = 0, stop: int | None = None) -> Iterator[Record]:
        """Decoded records from ``start``."""
        for _, raw in self.iter_raw(start, stop):
            yield decode_record(raw)

    def session_start(self, session_id: str) -> int | None:
        """The seq of a session's ``session.start`` record."""
        key = session_id.encode()
        for seg in reversed(self.segments):
            with seg.read() as txn:
                value = txn.get(key, db=seg.db(DB_SESSIONS))
            if value is not None:
                return from_u64(value)
        return None

    def checkpoint_seqs(self) -> list[tuple[int, int]]:
        """(tree size, seq of the checkpoint record) of every indexed checkpoint."""
        out: list[tuple[int, int]] = []
        for seg in self.segments:
            with seg.read() as txn:
                for key, value in txn.cursor(db=seg.db(DB_CHECKPOINTS)):
                    out.append((from_u64(key), from_u64(value)))
        return out
