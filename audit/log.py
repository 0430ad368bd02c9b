"""AuditLog: the one way into the audit trail; a single writer thread owns LMDB.

In the agent it runs in a process of its own (see :mod:`audit.process`).

Producers put records on a bounded queue (``emit`` blocks while it is full);
the writer takes whatever is queued (up to ``batch_max_records``, waiting at
most ``batch_max_delay_ms`` for a batch to fill unless a strict record is
waiting), assigns seq, links each record to the previous leaf hash, computes
the Merkle hashes, and commits records, hashes and ``next_seq`` in one fsync'd
transaction. Checkpoints are signed only after the commit they cover returned.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import json
import logging
import os
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb
import msgpack

from audit.checkpoint import Checkpoint, Signer, load_or_create_key
from audit.errors import AuditUnavailable, InvalidEvent, StoreCorrupt, UnknownEventType
from audit.merkle import Frontier, leaf_hash, stored_hash_count
from audit.schema import (
    AUDIT_LOSS,
    CHECKPOINT,
    ENVELOPE_VERSION,
    EVENT_TYPES,
    SESSION_END,
    SESSION_START,
    STORE_EVENT_TYPES,
    ZERO_HASH,
    encode_event,
    with_result,
)
from audit.store import (
    DB_CHECKPOINTS,
    DB_META,
    DB_NODES,
    DB_RECORDS,
    DB_SESSIONS,
    Segment,
    Store,
    create_segment,
    u64,
)

if TYPE_CHECKING:
    from agent.config import AuditSettings

log = logging.getLogger("ringfence.audit")
_KEY = struct.Struct(">Q").pack
_PRODUCER_TYPES = EVENT_TYPES - STORE_EVENT_TYPES
_HEAD = struct.Struct(">BBBQBQBB").pack
_UINT = struct.Struct(">BQ").pack

# Free bytes on the store's filesystem before writing resumes after a failure (or 1 % of
# the filesystem when that is less): see AuditLog._room_to_resume.
RESUME_FREE = 16 * 1024 * 1024

# What a producer emits: an event, or the same already encoded as a msgpack map.
Event = Mapping[str, Any] | bytes

# (type, session_id, ts_ns, event bytes, waiter); the waiter is None (batched),
# a _Waiter (strict) or, for checkpoint records, the tree size they cover.
_Item = tuple[str, str | None, int, bytes, object]


def _link_py(
    batch: Sequence[_Item], seq: int, prev: bytes, stack: list[bytes], size: int, version: int,
    enc_type: dict[str, bytes], enc_sid: dict[str | None, bytes],
    encode_names: Callable[[str, str | None], bytes], counters: dict[str, int],
    session_start: str, session_end: str,
) -> tuple[list[tuple[bytes, bytes]], bytes, list[tuple[bytes, bytes]], list[tuple[int, int]],
           bytes, int]:
    """One batch's envelopes, hash chain and Merkle nodes, records ``seq`` onwards.

    Returns the records ``[(key, envelope)]``, the new leaves and nodes in the order made
    (one bytes), ``[(session id, key)]`` of session starts, ``[(position in batch, seq)]``
    of items with a waiter, the last leaf and the tree's new size; ``stack`` (the
    frontier's hashes) and ``counters`` (records so far by session) change in place.
    audit/_link.c does the same, compiled (see there for the layout).
    """
    records: list[tuple[bytes, bytes]] = []
    nodes: list[bytes] = []
    sessions: list[tuple[bytes, bytes]] = []
    marks: list[tuple[int, int]] = []
    key = _KEY
    head = _HEAD
    sha256 = hashlib.sha256
    for position, (type, sid, ts, data, waiter) in enumerate(batch):
        if sid is None:
            index = None
        else:
            index = counters.get(sid, 0)
            if type == session_end:
                counters.pop(sid, None)
            else:
                counters[sid] = index + 1
            if type == session_start:
                sessions.append((sid.encode(), key(seq)))
        if waiter is not None:
            marks.append((position, seq))
        # The envelope, assembled by hand: ints are written as msgpack uint64 so the
        # layout is fixed; strings are encoded once and cached.
        try:
            names = enc_type[type] + enc_sid[sid]
        except KeyError:
            names = encode_names(type, sid)
        raw = b"".join(
            (
                head(0x99, version, 0xCF, seq, 0xCF, ts, 0xC4, 32),
                prev,
                names,
                b"\xc0" if index is None else _UINT(0xCF, index),
                data,
            )
        )
        h = prev = sha256(b"\x00" + raw).digest()
        records.append((key(seq), raw))
        nodes.append(h)
        # Complete the subtrees this leaf closes (one per trailing 1 bit of size).
        m = size
        while m & 1:
            h = sha256(b"\x01" + stack.pop() + h).digest()
            nodes.append(h)
            m >>= 1
        stack.append(h)
        size += 1
        seq += 1
    return records, b"".join(nodes), sessions, marks, prev, size


# How an agent's batch frame begins: msgpack's array of two, then "b".
_BATCH_HEAD = b"\x92\xa1b"


def batch_frame_of(items: Sequence[bytes]) -> bytes:
    """The agent's batch frame (msgpack ``["b", [[type, session_id, ts, data], ...]]``) of
    records each already packed as ``[type, session_id, ts, data]``."""
    count = len(items)
    if count < 16:
        header = bytes((0x90 | count,))
    elif count < 0x10000:
        header = b"\xdc" + count.to_bytes(2, "big")
    else:
        header = b"\xdd" + count.to_bytes(4, "big")
    return _BATCH_HEAD + header + b"".join(items)


def _batch_frame_py(records: list[tuple[Any, ...]], pack: Callable[[Any], bytes], /) -> bytes:
    """The batch frame of ``records`` (type, session_id, ts, event), a result that joins its
    query with True after them (see :func:`joined_items`): data is the event when it is
    bytes (already encoded), else ``pack(event)`` (audit/_link.c has it compiled)."""
    frame = []
    for record in records:
        if not 4 <= len(record) <= 5 or (len(record) == 5 and record[4] is not True):
            raise TypeError("batch_frame: records are 4-tuples, or 5-tuples ending in True")
        event = record[3]
        data = event if event.__class__ is bytes else pack(event)
        frame.append(pack((record[0], record[1], record[2], data, *record[4:])))
    return batch_frame_of(frame)


# How far back in a frame a joining result looks for its session's query record.
JOIN_LOOKBACK = 64


def joined_items(records: Sequence[Sequence[Any]]) -> list[_Item]:
    """Queue items ``(type, session_id, ts, data, None)`` of a frame's records ``(type,
    session_id, ts, data[, joins])``. A ``result`` with ``joins`` true answers the query
    record its session sent last: when that record is in the same frame (within
    JOIN_LOOKBACK records), is a ``query`` that has no result yet, and both events are
    maps of fewer than 15 fields, the two become one record, the query carrying the result
    as its ``result`` field (audit/SCHEMA.md); else the result is a record of its own."""
    items: list[_Item] = []
    open_queries: set[int] = set()  # items that are queries without a result
    for record in records:
        kind, sid, ts, data = record[0], record[1], record[2], record[3]
        if kind == "result" and len(record) > 4 and record[4] is True:
            at = next((at for at in range(len(items) - 1, max(-1, len(items) - 1 - JOIN_LOOKBACK), -1)
                       if items[at][1] == sid), None)  # the session's last record in the frame
            if at is not None and at in open_queries:
                joined = with_result(items[at][3], data)
                if joined is not None:
                    query = items[at]
                    items[at] = (query[0], query[1], query[2], joined, None)
                    open_queries.discard(at)
                    continue
        if kind == "query":
            open_queries.add(len(items))
        items.append((kind, sid, ts, data, None))
    return items


def _batch_items_py(body: bytes | memoryview, types: frozenset[str]) -> list[_Item] | None:
    """The records of an agent's batch frame (msgpack ``["b", [[type, session_id, ts,
    data], ...]]``, a joining result with ``true`` after them) as the writer queues them,
    ``(type, session_id, ts, data, None)``, joined as :func:`joined_items` says; None when
    ``body`` is anything else, holds a value of another kind or a type not in ``types``
    (audit/_link.c has it compiled)."""
    if bytes(body[:len(_BATCH_HEAD)]) != _BATCH_HEAD:
        return None
    try:
        frame = msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None
    if not isinstance(frame[1], list):
        return None
    for record in frame[1]:
        if not isinstance(record, list) or not 4 <= len(record) <= 5:
            return None
        kind, sid, ts, data = record[:4]
        if (not isinstance(kind, str) or kind not in types
                or not (sid is None or isinstance(sid, str))
                or type(ts) is not int or ts < 0 or not isinstance(data, bytes)
                or (len(record) == 5 and not isinstance(record[4], bool))):
            return None
    return joined_items(frame[1])


# Why the compiled steps are not in use, for `ringfence doctor`; None when they are.
NATIVE_LINK_ERROR: ImportError | None = None
try:  # the same compiled (setup.py); the writer works alike without it
    if os.environ.get("RINGFENCE_IMPL") == "python":
        raise ImportError("RINGFENCE_IMPL=python")
    from audit._link import batch_frame as batch_frame
    from audit._link import batch_items as _batch_items
    from audit._link import link as _link
except ImportError as e:  # a source tree where it was not built, or RINGFENCE_IMPL=python
    NATIVE_LINK_ERROR = e
    _link = _link_py
    _batch_items = _batch_items_py
    batch_frame = _batch_frame_py
NATIVE_LINK = _link is not _link_py


def batch_items(body: bytes | memoryview) -> list[_Item] | None:
    """The records of an agent's batch frame ``body`` as queue items, checked: their types
    are ones producers may emit; None when the frame is anything else (see _batch_items_py)."""
    return _batch_items(body, _PRODUCER_TYPES)


class _Waiter:
    """Where a strict record's outcome is delivered: an asyncio future, a thread event, or a
    callback (called on the writer thread)."""

    __slots__ = ("loop", "future", "event", "callback", "seq", "error")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        callback: Callable[[int, BaseException | None], None] | None = None,
    ) -> None:
        self.loop = loop
        self.future: asyncio.Future[int] | None = loop.create_future() if loop else None
        self.event = threading.Event() if loop is None and callback is None else None
        self.callback = callback
        self.seq = -1
        self.error: BaseException | None = None

    def resolve(self, seq: int, error: BaseException | None) -> None:
        self.seq, self.error = seq, error
        if self.callback is not None:
            self.callback(seq, error)
        elif self.event is not None:
            self.event.set()
        elif self.loop is not None:
            # A closed loop means nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._deliver)

    def wait(self) -> int:
        """Block until resolved (a thread-event waiter); the seq, or the error raised."""
        assert self.event is not None
        self.event.wait()
        if self.error is not None:
            raise self.error
        return self.seq

    def _deliver(self) -> None:
        fut = self.future
        if fut is None or fut.done():
            return
        if self.error is not None:
            fut.set_exception(self.error)
        else:
            fut.set_result(self.seq)


def require_producer_type(type: str) -> None:
    """Raise UnknownEventType for a type producers may not emit (store-only, or unknown)."""
    if type not in _PRODUCER_TYPES:
        raise UnknownEventType(f"{type!r} is not an event type producers may emit")


def thread_packer(tls: threading.local) -> msgpack.Packer:
    """This thread's msgpack Packer, kept in ``tls`` (a Packer is not thread-safe)."""
    try:
        packer: msgpack.Packer = tls.packer
    except AttributeError:
        packer = tls.packer = msgpack.Packer(use_bin_type=True)
    return packer


def encode_producer_event(tls: threading.local, type: str, event: Event) -> bytes:
    """A producer's event as msgpack (one Packer per thread in ``tls``); refuses store-only
    types (UnknownEventType) and what msgpack cannot encode (InvalidEvent). An event given
    as bytes is one its producer already encoded (a msgpack map), taken as it is."""
    require_producer_type(type)
    if isinstance(event, bytes):
        return event
    packer = thread_packer(tls)
    try:
        data: bytes = packer.pack(event)
    except (TypeError, ValueError, OverflowError) as e:
        packer.reset()
        raise InvalidEvent(f"event cannot be encoded: {e}") from None
    return data


class _Failure(Exception):
    """A batch could not be committed."""


def default_origin(host: str) -> str:
    """The checkpoint origin used when the configuration names none."""
    return f"{host}/ringfence/audit"


class AuditLog:
    """The audit trail of this host: emit records, close cleanly; see the module docstring."""

    def __init__(
        self,
        root: Path,
        *,
        host: str,
        signer: Signer,
        origin: str,
        checkpoint_every_records: int = 10_000,
        checkpoint_every_seconds: float = 60.0,
        checkpoint_export: str = "",
        segment_max_bytes: int = 1 << 30,
        segment_max_age_seconds: float = 0.0,
        queue_size: int = 65_536,
        batch_max_records: int = 4096,
        batch_max_delay_ms: float = 20.0,
        retry_interval_ms: float = 500.0,
        on_health: Callable[[bool, str | None], None] | None = None,
    ) -> None:
        self.root = root
        # Told (on the writer thread) each time the store starts failing or recovers.
        self.on_health = on_health
        self.host = host
        self.signer = signer
        self.origin = origin
        self.checkpoint_every_records = checkpoint_every_records
        self.checkpoint_every_seconds = checkpoint_every_seconds
        self.checkpoint_export = checkpoint_export
        self.segment_max_bytes = segment_max_bytes
        self.segment_max_age_seconds = segment_max_age_seconds
        self.queue_size = queue_size
        self.batch_max_records = batch_max_records
        self.batch_max_delay = batch_max_delay_ms / 1000.0
        self.retry_interval = retry_interval_ms / 1000.0

        self._queue: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._writer_idle = False
        self._blocked = 0
        self._strict_queued = 0
        self._accepted = 0
        self._processed = 0
        self._closing = False
        self._closed = False
        self._healthy = True
        self.failure: str | None = None
        self._lost: dict[str, int] = {}
        self._lost_first_ts = 0
        self._lost_last_ts = 0
        self._lost_reason = ""
        self._internal: list[_Item] = []
        self._inflight: list[_Item] = []  # taken from the queue, not yet committed or dropped
        self._next_retry = 0.0
        self._packer = msgpack.Packer(use_bin_type=True)
        self._tls = threading.local()  # one msgpack Packer per producer thread
        # type -> msgpack(type); session id -> msgpack(host) + msgpack(session id).
        self._enc_type: dict[str, bytes] = {}
        self._enc_sid: dict[str | None, bytes] = {}
        self.last_export_error: str | None = None

        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = Store(root, writable=True)
        if not self.store.segments:
            self.store.segments.append(create_segment(root, 1, 0, time.time_ns(), None, []))
        seg = self.store.segments[-1]
        self.next_seq = seg.next_seq()
        if self.next_seq > 0:
            raw = self.store.get_raw(self.next_seq - 1)
            if raw is None:
                raise StoreCorrupt(f"{root}: record {self.next_seq - 1} is missing")
            self.prev_leaf = leaf_hash(raw)
        else:
            self.prev_leaf = ZERO_HASH
        self.frontier = self.store.frontier(self.next_seq)
        cps = self.store.checkpoint_seqs()
        last_cp = cps[-1] if cps else None
        self._since_checkpoint = 0
        if last_cp is None:
            self._since_checkpoint = self.next_seq
        else:
            # Records after the last checkpoint record are not covered yet.
            self._since_checkpoint = max(0, self.next_seq - last_cp[1] - 1)
        self._last_checkpoint_time = time.monotonic()
        self._checkpoint_due = self._since_checkpoint > 0
        self._sessions: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API

    @classmethod
    def open(
        cls,
        settings: AuditSettings,
        *,
        host: str,
        state_dir: Path,
        on_health: Callable[[bool, str | None], None] | None = None,
    ) -> AuditLog:
        """Open (create) the store, continue the chain, start the writer thread."""
        origin = settings.origin or default_origin(host)
        key_path = settings.key_path or state_dir / "audit.key"
        signer = load_or_create_key(key_path, origin)
        return cls(
            settings.path,
            host=host,
            signer=signer,
            origin=origin,
            checkpoint_every_records=settings.checkpoint_every_records,
            checkpoint_every_seconds=settings.checkpoint_every_seconds,
            checkpoint_export=settings.checkpoint_export,
            segment_max_bytes=settings.segment_max_bytes,
            segment_max_age_seconds=settings.segment_max_age_seconds,
            queue_size=settings.queue_size,
            batch_max_records=settings.batch_max_records,
            batch_max_delay_ms=settings.batch_max_delay_ms,
            retry_interval_ms=settings.retry_interval_ms,
            on_health=on_health,
        )

    @property
    def healthy(self) -> bool:
        """Whether the store is writing (False while failing or after close)."""
        return self._healthy and not self._closing

    def emit(self, type: str, event: Event, *, session_id: str | None = None) -> None:
        """Queue a record (batched durability); blocks while the queue is full."""
        self._put(type, event, session_id, None)

    def emit_many(
        self, records: Sequence[tuple[str, Event]], *, session_id: str | None = None
    ) -> None:
        """:meth:`emit` for several records of one session, in order."""
        for type, event in records:
            self._put(type, event, session_id, None)

    def emit_packed(self, type: str, data: bytes, session_id: str | None) -> None:
        """:meth:`emit` of an event already encoded (a msgpack map)."""
        self._put(type, data, session_id, None)

    async def emit_durable(
        self, type: str, event: Event, *, session_id: str | None = None
    ) -> int:
        """Queue a record and return its seq once its commit is on disk (strict durability)."""
        waiter = _Waiter(asyncio.get_running_loop())
        self._put(type, event, session_id, waiter)
        assert waiter.future is not None
        return await waiter.future

    def emit_durable_sync(self, type: str, event: Event, *, session_id: str | None = None) -> int:
        """emit_durable for callers outside an event loop: blocks until the commit is on disk."""
        waiter = _Waiter()
        self._put(type, event, session_id, waiter)
        return waiter.wait()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record queued before this call is committed or counted lost."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._accepted
            self._cond.notify_all()
            while self._processed < target and self._thread.is_alive():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is not None else 0.05)
        return True

    def close(self) -> None:
        """Drain the queue, commit, write a final checkpoint, stop the writer. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self.store.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ producers

    def _put(
        self, type: str, event: Event, session_id: str | None, waiter: _Waiter | None
    ) -> None:
        data = encode_producer_event(self._tls, type, event)
        self._enqueue(type, session_id, time.time_ns(), data, waiter)

    def emit_encoded(
        self, type: str, data: bytes, session_id: str | None, ts: int,
        waiter: _Waiter | None = None,
    ) -> None:
        """Queue a record whose event is already msgpack-encoded (by the agent process)."""
        require_producer_type(type)
        self._enqueue(type, session_id, ts, data, waiter)

    def emit_encoded_many(self, items: Sequence[Sequence[Any]]) -> None:
        """Queue batched records already encoded, each ``(type, session_id, ts, data)`` or,
        for a result that joins its query, ``(type, session_id, ts, data, True)`` (see
        :func:`joined_items`), under one lock. While the store fails (or once closed) the
        rest are counted lost, not raised."""
        for item in items:
            require_producer_type(item[0])
        self.queue_items(joined_items(items))

    def queue_items(self, items: list[_Item]) -> None:
        """:meth:`emit_encoded_many` for items already checked and made queue items,
        ``(type, session_id, ts, data, None)`` (see :func:`batch_items`)."""
        cond = self._cond
        queue = self._queue
        with cond:
            if self._healthy and not self._closing and len(queue) + len(items) <= self.queue_size:
                queue.extend(items)  # the common case: room for all
                self._accepted += len(items)
            else:
                for item in items:
                    while len(queue) >= self.queue_size and self._healthy and not self._closing:
                        self._blocked += 1
                        cond.wait()
                        self._blocked -= 1
                    if self._closing:
                        return
                    if not self._healthy:
                        self._count_lost(item[0], item[2])
                        continue
                    queue.append(item)
                    self._accepted += 1
            if self._writer_idle or len(queue) >= self.batch_max_records:
                cond.notify_all()

    def _enqueue(
        self, type: str, session_id: str | None, ts: int, data: bytes, waiter: _Waiter | None
    ) -> None:
        item: _Item = (type, session_id, ts, data, waiter)
        cond = self._cond
        with cond:
            while True:
                if self._closing:
                    raise AuditUnavailable("audit log is closed")
                if not self._healthy:
                    self._count_lost(type, ts)
                    raise AuditUnavailable(f"audit store is failing: {self.failure}")
                if len(self._queue) < self.queue_size:
                    break
                self._blocked += 1
                cond.wait()
                self._blocked -= 1
            self._queue.append(item)
            self._accepted += 1
            if waiter is not None:
                self._strict_queued += 1
                cond.notify_all()
            elif self._writer_idle or len(self._queue) == self.batch_max_records:
                cond.notify_all()

    def _count_lost(self, type: str, ts: int) -> None:
        """Count a record that could not be written (caller holds the lock)."""
        if not self._lost:
            self._lost_first_ts = ts
        self._lost[type] = self._lost.get(type, 0) + 1
        self._lost_last_ts = max(self._lost_last_ts, ts)

    # --------------------------------------------------------------- writer

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # the writer must never die silently
            log.exception("audit writer stopped")
            with self._cond:
                self._healthy = False
                self.failure = f"writer stopped: {e}"
                pending = self._inflight + list(self._queue)
                self._inflight = []
                self._queue.clear()
                for item in pending:
                    if not isinstance(item[4], int):
                        self._count_lost(item[0], item[2])
                        self._processed += 1
                self._cond.notify_all()
            self._tell_health()
            self._fail_waiters(pending, AuditUnavailable(self.failure))

    def _next_wakeup(self) -> float:
        now = time.monotonic()
        due = now + 1.0
        if self._since_checkpoint > 0:
            due = min(due, self._last_checkpoint_time + self.checkpoint_every_seconds)
        if self.segment_max_age_seconds > 0 and self._rotatable():
            seg = self.store.segments[-1]
            age_due = now + (seg.created_ns / 1e9 + self.segment_max_age_seconds - time.time())
            due = min(due, age_due)
        if not self._healthy:
            due = min(due, self._next_retry)
        return max(0.0, due - now)

    def _take_batch(self) -> tuple[list[_Item], bool]:
        """Wait for work and take a batch; the flag says the log is closing and drained."""
        cond = self._cond
        with cond:
            while not self._queue and not self._closing:
                if self._healthy and (self._internal or self._checkpoint_due):
                    break
                if self._housekeeping_due():
                    break
                self._writer_idle = True
                cond.wait(self._next_wakeup())
                self._writer_idle = False
            if (
                self._queue
                and self._healthy
                and not self._closing
                and not self._strict_queued
                and len(self._queue) < self.batch_max_records
            ):
                cond.wait(self.batch_max_delay)
            n = min(len(self._queue), self.batch_max_records)
            q = self._queue
            if n == len(q):  # the common case: all of it, without a step a record
                batch = list(q)
                q.clear()
            else:
                batch = [q.popleft() for _ in range(n)]
            if self._strict_queued:
                for item in batch:
                    if item[4] is not None:
                        self._strict_queued -= 1
            if self._blocked:
                cond.notify_all()
            done = self._closing and not self._queue
            self._inflight = batch
        return batch, done

    def _housekeeping_due(self) -> bool:
        if not self._healthy:
            return time.monotonic() >= self._next_retry
        if self._since_checkpoint > 0 and (
            time.monotonic() - self._last_checkpoint_time >= self.checkpoint_every_seconds
        ):
            return True
        return self._rotatable() and self._too_old()

    def _rotatable(self) -> bool:
        """Whether the current segment holds more than the checkpoint it started with."""
        return self.next_seq > self.store.segments[-1].first_seq + 1

    def _too_old(self) -> bool:
        seg = self.store.segments[-1]
        return (
            self.segment_max_age_seconds > 0
            and time.time_ns() - seg.created_ns >= self.segment_max_age_seconds * 1e9
        )

    def _loop(self) -> None:
        while True:
            batch, done = self._take_batch()
            if not self._healthy:
                self._drop(batch, count=True)
                batch = []
                if time.monotonic() < self._next_retry and not done:
                    continue
                if not self._try_recover():
                    self._next_retry = time.monotonic() + self.retry_interval
                    if done:
                        return
                    continue
            if self._internal:
                batch = self._internal + batch
                self._internal = []
            if batch:
                try:
                    self._commit(batch)
                except _Failure as e:
                    self._enter_failure(str(e), batch)
                    if done:
                        return
                    continue
            self._after_commit()
            if done:
                self._final_checkpoint()
                return

    def _commit(self, batch: list[_Item]) -> None:
        """Write a batch in one transaction; on success advance the chain and resolve waiters."""
        first = self.next_seq
        stack = list(self.frontier.hashes)
        records, nodes, sessions, marks, prev, size = _link(
            batch, first, self.prev_leaf, stack, self.frontier.size, ENVELOPE_VERSION,
            self._enc_type, self._enc_sid, self._encode_names, self._sessions,
            SESSION_START, SESSION_END,
        )
        since = self._since_checkpoint + len(batch)
        strict: list[tuple[_Waiter, int]] = []
        checkpoints: list[tuple[bytes, bytes]] = []
        for position, seq in marks:
            waiter = batch[position][4]
            if isinstance(waiter, _Waiter):
                strict.append((waiter, seq))
            else:
                assert isinstance(waiter, int)
                checkpoints.append((_KEY(waiter), _KEY(seq)))
                since = len(batch) - 1 - position  # the records after the checkpoint's
        seq = first + len(batch)
        seg = self.store.segments[-1]
        self._write(seg, records, (_KEY(stored_hash_count(first)), nodes), sessions, checkpoints, seq)
        self.next_seq = seq
        self.prev_leaf = prev
        self.frontier = Frontier(size, stack)
        self._since_checkpoint = since
        with self._cond:
            self._inflight = []
        for waiter, wseq in strict:
            waiter.resolve(wseq, None)
        with self._cond:
            self._processed += len(batch) - len(checkpoints)
            self._cond.notify_all()

    def _encode_names(self, type: str, sid: str | None) -> bytes:
        """msgpack of the type, host and session id fields (cached, bounded)."""
        if len(self._enc_sid) > 100_000:
            self._enc_sid.clear()
        if type not in self._enc_type:
            self._enc_type[type] = self._packer.pack(type)
        if sid not in self._enc_sid:
            self._enc_sid[sid] = self._packer.pack(self.host) + self._packer.pack(sid)
        return self._enc_type[type] + self._enc_sid[sid]

    def _write(
        self,
        seg: Segment,
        records: list[tuple[bytes, bytes]],
        nodes: tuple[bytes, bytes],
        sessions: list[tuple[bytes, bytes]],
        checkpoints: list[tuple[bytes, bytes]],
        next_seq: int,
    ) -> None:
        env = seg.env
        for _ in range(64):
            try:
                with env.begin(write=True) as txn:
                    txn.cursor(db=seg.db(DB_RECORDS)).putmulti(records, append=True)
                    txn.put(nodes[0], nodes[1], db=seg.db(DB_NODES), append=True)
                    for key, value in sessions:
                        txn.put(key, value, db=seg.db(DB_SESSIONS))
                    for key, value in checkpoints:
                        txn.put(key, value, db=seg.db(DB_CHECKPOINTS))
                    txn.put(b"next_seq", u64(next_seq), db=seg.db(DB_META))
                return
            except lmdb.MapFullError:
                self._grow(seg)
            except lmdb.Error as e:
                raise _Failure(f"commit failed: {e}") from None
        raise _Failure("commit failed: map full after repeated growth")

    def _grow(self, seg: Segment) -> None:
        """Double the map size of ``seg`` (LMDB needs no live transaction in this process)."""
        size = int(seg.env.info()["map_size"]) * 2
        try:
            with seg.shared.resize_lock:
                seg.env.set_mapsize(size)
        except lmdb.Error as e:
            raise _Failure(f"map full and cannot grow to {size} bytes: {e}") from None
        log.info("audit segment %d map grown to %d bytes", seg.number, size)

    def _enter_failure(self, reason: str, batch: list[_Item]) -> None:
        log.error("audit store failing: %s", reason)
        with self._cond:
            self._healthy = False
            self.failure = reason
            self._lost_reason = reason
            self._next_retry = time.monotonic() + self.retry_interval
            self._cond.notify_all()
        self._tell_health()
        self._drop(batch, count=True)

    def _tell_health(self) -> None:
        if self.on_health is not None:
            try:
                self.on_health(self._healthy, self.failure)
            except Exception:  # a listener must not stop the writer
                log.exception("audit health listener failed")

    def _drop(self, batch: list[_Item], *, count: bool) -> None:
        """Count records that cannot be written and fail their strict waiters."""
        if not batch:
            return
        error = AuditUnavailable(f"audit store is failing: {self.failure}")
        with self._cond:
            self._inflight = []
            for item in batch:
                if isinstance(item[4], int):
                    self._checkpoint_due = True  # a checkpoint record is retried, not counted
                    continue
                if count:
                    self._count_lost(item[0], item[2])
                self._processed += 1
            self._cond.notify_all()
        self._fail_waiters(batch, error)

    @staticmethod
    def _fail_waiters(batch: list[_Item], error: BaseException) -> None:
        for item in batch:
            if isinstance(item[4], _Waiter):
                item[4].resolve(-1, error)

    def _room_to_resume(self) -> str | None:
        """None when the store's filesystem has room to resume writing, else why it waits.

        After a full disk, the small audit.loss record can land in pages LMDB freed inside
        its own file while the disk stays full; resuming then would admit sessions whose
        next batches fail again and are lost. So writing resumes only with RESUME_FREE
        bytes free (or 1 % of the filesystem, if that is less)."""
        try:
            fs = os.statvfs(self.store.root)
        except OSError:
            return None  # nothing to measure: the commit itself will tell
        free = fs.f_bavail * fs.f_frsize
        need = min(RESUME_FREE, fs.f_blocks * fs.f_frsize // 100)
        if free >= need:
            return None
        return (f"waiting for free space: {free} bytes free on the audit trail's filesystem, "
                f"{need} needed to resume")

    def _try_recover(self) -> bool:
        """Try to write the audit.loss record; on success the store is healthy again."""
        waiting = self._room_to_resume()
        if waiting is not None:
            with self._cond:
                self.failure = waiting
            return False
        with self._cond:
            lost = dict(self._lost)
            event = {
                "lost": sum(lost.values()),
                "by_type": lost,
                "reason": self._lost_reason or (self.failure or ""),
                "first_ts": self._lost_first_ts,
                "last_ts": self._lost_last_ts,
            }
        item: _Item = (AUDIT_LOSS, None, time.time_ns(), encode_event(event), None)
        try:
            self._commit([item])
        except _Failure as e:
            with self._cond:
                self.failure = str(e)
            return False
        with self._cond:
            self._processed -= 1  # the loss record was never accepted from a producer
            for type, n in lost.items():
                left = self._lost.get(type, 0) - n
                if left > 0:
                    self._lost[type] = left
                else:
                    self._lost.pop(type, None)
            self._healthy = True
            self.failure = None
            self._cond.notify_all()
        self._tell_health()
        log.warning("audit store writing again; %d record(s) were lost", event["lost"])
        return True

    def _after_commit(self) -> None:
        if not self._healthy:
            return
        seg = self.store.segments[-1]
        rotate = self._rotatable() and (seg.size_bytes() >= self.segment_max_bytes or self._too_old())
        if rotate:
            self._rotate()
            return
        if self._since_checkpoint <= 0:
            self._checkpoint_due = False
            return
        if (
            self._checkpoint_due
            or self._since_checkpoint >= self.checkpoint_every_records
            or time.monotonic() - self._last_checkpoint_time >= self.checkpoint_every_seconds
        ):
            self._queue_checkpoint(self.make_checkpoint(), seg.number, None)

    def make_checkpoint(self) -> Checkpoint:
        """Sign a checkpoint of everything committed so far (the writer's view)."""
        return Checkpoint(self.origin, self.next_seq, self.frontier.root()).sign(self.signer)

    def _queue_checkpoint(self, cp: Checkpoint, segment: int, frontier: list[bytes] | None) -> None:
        self.export(cp)
        event: dict[str, Any] = {
            "origin": cp.origin,
            "size": cp.size,
            "root": cp.root,
            "note": cp.note,
            "segment": segment,
        }
        if frontier is not None:
            event["frontier"] = frontier
        self._internal.append((CHECKPOINT, None, time.time_ns(), encode_event(event), cp.size))
        self._checkpoint_due = False
        self._since_checkpoint = 0
        self._last_checkpoint_time = time.monotonic()

    def export(self, cp: Checkpoint) -> None:
        """Write a checkpoint to the export target (one JSON object per line)."""
        target = self.checkpoint_export
        if not target:
            return
        line = json.dumps(
            {
                "origin": cp.origin,
                "size": cp.size,
                "root": base64.b64encode(cp.root).decode(),
                "note": cp.note,
            }
        )
        try:
            if target == "stdout":
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            else:
                with open(target, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            self.last_export_error = None
        except OSError as e:
            self.last_export_error = str(e)
            log.error("cannot export audit checkpoint to %s: %s", target, e)

    def _rotate(self) -> None:
        """Start a new segment whose first record carries the old one's final checkpoint."""
        old = self.store.segments[-1]
        cp = self.make_checkpoint()
        try:
            new = create_segment(
                self.root,
                old.number + 1,
                self.next_seq,
                time.time_ns(),
                cp.note,
                list(self.frontier.hashes),
            )
        except (lmdb.Error, OSError) as e:
            self._enter_failure(f"cannot create segment {old.number + 1}: {e}", [])
            return
        self.store.segments.append(new)
        self._queue_checkpoint(cp, new.number, list(self.frontier.hashes))
        log.info("audit segment %d started at seq %d", new.number, new.first_seq)

    def _final_checkpoint(self) -> None:
        if not self._healthy:
            return
        if self._since_checkpoint > 0 and not self._internal:
            self._queue_checkpoint(self.make_checkpoint(), self.store.segments[-1].number, None)
        batch, self._internal = self._internal, []
        if not batch:
            return
        try:
            self._commit(batch)
        except _Failure as e:
            log.error("final audit checkpoint not written: %s", e)
