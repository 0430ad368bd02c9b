"""Full verification of an audit trail, and its inclusion and consistency proofs.

``verify`` checks, in one pass over short read transactions: contiguous
sequence numbers, that every record decodes and names its own seq, the
previous-leaf-hash chain, the recomputed Merkle tree against the stored hashes,
every checkpoint record's signature, origin and root, consistency between
successive checkpoints, and finally a witness checkpoint kept off-host. It stops
at the first problem and names its sequence number.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from audit.checkpoint import Checkpoint, Verifier, open_checkpoint
from audit.errors import AuditError, CheckpointError, ProofError, RecordDecodeError
from audit.merkle import (
    Frontier,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    stored_hash_count,
    tree_root,
    verify_consistency,
    verify_inclusion,
)
from audit.schema import CHECKPOINT, ZERO_HASH, decode_record
from audit.store import (
    DB_META,
    DB_NODES,
    DB_RECORDS,
    READ_BATCH,
    Segment,
    Store,
    from_u64,
    node_chunk,
    u64,
)


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing found wrong: the sequence number it concerns (None: not a record) and what."""

    seq: int | None
    what: str

    def __str__(self) -> str:
        return f"seq {self.seq}: {self.what}" if self.seq is not None else self.what


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of verifying a log."""

    first_seq: int
    records: int
    checkpoints: int
    latest: Checkpoint | None
    witness: Checkpoint | None
    problem: Problem | None

    @property
    def ok(self) -> bool:
        """Whether nothing was found wrong."""
        return self.problem is None


class _Bad(Exception):
    def __init__(self, seq: int | None, what: str) -> None:
        super().__init__(what)
        self.problem = Problem(seq, what)


def read_witness(text: str) -> str:
    """The checkpoint note in a witness file: a signed note, or the last line of a JSONL export."""
    stripped = text.strip()
    if stripped.startswith("{"):
        last = stripped.splitlines()[-1]
        try:
            note = json.loads(last)["note"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError("witness file's last line is not a checkpoint export") from None
        if not isinstance(note, str):
            raise CheckpointError("witness export has no note")
        return note
    return text


def _segment_chunks(seg: Segment, start: int) -> Iterator[list[tuple[int, bytes]]]:
    pos = start
    while True:
        with seg.read() as txn:
            cur = txn.cursor(db=seg.db(DB_RECORDS))
            chunk: list[tuple[int, bytes]] = []
            if cur.set_range(u64(pos)):
                for key, value in cur:
                    chunk.append((from_u64(key), bytes(value)))
                    if len(chunk) >= READ_BATCH:
                        break
        if not chunk:
            return
        yield chunk
        if len(chunk) < READ_BATCH:
            return
        pos = chunk[-1][0] + 1


def _read_nodes(seg: Segment, lo: int, hi: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    with seg.read() as txn:
        db = seg.db(DB_NODES)
        first = node_chunk(txn, db, lo)
        cur = txn.cursor(db=db)
        if not cur.set_range(u64(first[0] if first else lo)):
            return out
        for key, value in cur:
            start = from_u64(key)
            if start >= hi:
                break
            for j in range(len(value) // 32):
                if lo <= start + j < hi:
                    out[start + j] = bytes(value[j * 32 : j * 32 + 32])
    return out


def _last_node_index(seg: Segment) -> int | None:
    with seg.read() as txn:
        cur = txn.cursor(db=seg.db(DB_NODES))
        if not cur.last():
            return None
        return from_u64(cur.key()) + len(cur.value()) // 32 - 1


def _meta_next_seq(seg: Segment) -> int | None:
    with seg.read() as txn:
        raw = txn.get(b"next_seq", db=seg.db(DB_META))
    return from_u64(raw) if raw is not None else None


def verify(
    store: Store, verifier: Verifier, *, origin: str | None = None, witness: str | None = None
) -> VerifyReport:
    """Verify the whole log (and a witness checkpoint note, if given)."""
    state: dict[str, Any] = {"records": 0, "checkpoints": 0, "latest": None, "witness": None}
    try:
        _verify(store, verifier, origin, witness, state)
        problem = None
    except _Bad as bad:
        problem = bad.problem
    return VerifyReport(
        store.first_seq,
        state["records"],
        state["checkpoints"],
        state["latest"],
        state["witness"],
        problem,
    )


def _verify(
    store: Store,
    verifier: Verifier,
    origin: str | None,
    witness: str | None,
    state: dict[str, Any],
) -> None:
    if not store.segments:
        raise _Bad(None, "no segments: the audit trail is empty or missing")
    first = store.segments[0]
    expected = first.first_seq
    prev_leaf: bytes | None = ZERO_HASH
    frontier = Frontier()
    if expected > 0 or first.prev_checkpoint is not None:
        # Older segments were archived: start from the checkpoint this one carries.
        if first.prev_checkpoint is None:
            raise _Bad(expected, "first segment starts after 0 but carries no checkpoint")
        try:
            cp = open_checkpoint(first.prev_checkpoint, verifier, origin)
        except CheckpointError as e:
            raise _Bad(expected, f"segment {first.number} carried checkpoint: {e}") from None
        origin = origin or cp.origin
        try:
            frontier = Frontier(cp.size, first.frontier)
        except ProofError as e:
            raise _Bad(expected, f"segment {first.number} frontier: {e}") from None
        if cp.size != expected or frontier.root() != cp.root:
            raise _Bad(expected, f"segment {first.number} frontier does not match its checkpoint")
        prev_leaf = None  # the previous record is archived; its link cannot be checked here
        state["latest"] = cp
    latest: Checkpoint | None = state["latest"]
    for i, seg in enumerate(store.segments):
        if seg.first_seq != expected:
            raise _Bad(
                expected,
                f"segment {seg.number} starts at seq {seg.first_seq}, expected {expected}",
            )
        for chunk in _segment_chunks(seg, seg.first_seq):
            lo = stored_hash_count(expected)
            hi = stored_hash_count(chunk[-1][0] + 1) if chunk[-1][0] >= expected else lo
            nodes = _read_nodes(seg, lo, hi)
            for key, raw in chunk:
                if key != expected:
                    raise _Bad(expected, f"record is missing (the next stored record is {key})")
                try:
                    rec = decode_record(raw)
                except RecordDecodeError as e:
                    raise _Bad(key, f"record does not decode: {e}") from None
                if rec.seq != key:
                    raise _Bad(
                        key,
                        f"record stored as seq {key} says it is seq {rec.seq} (moved, swapped or duplicated)",
                    )
                if prev_leaf is not None and rec.prev != prev_leaf:
                    raise _Bad(key, "link to the previous record's leaf hash is broken")
                if rec.type == CHECKPOINT:
                    latest = _check_checkpoint(store, rec.event, key, frontier, latest, verifier, origin)
                    # Without an expected origin, the log's first checkpoint sets it.
                    origin = origin or latest.origin
                    state["latest"] = latest
                    state["checkpoints"] += 1
                leaf = leaf_hash(raw)
                out: list[bytes] = []
                si = stored_hash_count(key)
                frontier.append(leaf, out)
                for j, h in enumerate(out):
                    stored = nodes.get(si + j)
                    if stored is None:
                        raise _Bad(key, f"stored tree hash {si + j} is missing")
                    if stored != h:
                        what = "leaf hash" if j == 0 else f"tree node (level {j})"
                        raise _Bad(key, f"stored {what} does not match the records")
                prev_leaf = leaf
                expected += 1
                state["records"] += 1
        meta_next = _meta_next_seq(seg)
        seg_end = store.segments[i + 1].first_seq if i + 1 < len(store.segments) else None
        if meta_next is not None and meta_next > expected:
            raise _Bad(expected, f"records {expected}..{meta_next - 1} are missing (truncated)")
        if seg_end is not None and seg_end != expected:
            raise _Bad(expected, f"segment {seg.number} ends before seq {seg_end}")
        last_node = _last_node_index(seg)
        if last_node is not None and last_node >= stored_hash_count(expected):
            raise _Bad(expected, "tree hashes exist for records that are missing (truncated)")
    state["latest"] = latest
    for size, seq in store.checkpoint_seqs():
        cp_raw = store.get_raw(seq)
        try:
            cp_rec = decode_record(cp_raw) if cp_raw is not None else None
        except RecordDecodeError:
            cp_rec = None
        if cp_rec is None or cp_rec.type != CHECKPOINT or cp_rec.event.get("size") != size:
            raise _Bad(seq, f"checkpoint index entry for size {size} does not match the record")
    if witness is not None:
        _check_witness(store, witness, expected, latest, verifier, origin, state)


def _check_checkpoint(
    store: Store,
    event: Any,
    seq: int,
    frontier: Frontier,
    previous: Checkpoint | None,
    verifier: Verifier,
    origin: str | None,
) -> Checkpoint:
    note = event.get("note")
    if not isinstance(note, str):
        raise _Bad(seq, "checkpoint record has no note")
    try:
        cp = open_checkpoint(note, verifier, origin)
    except CheckpointError as e:
        raise _Bad(seq, f"checkpoint: {e}") from None
    if event.get("size") != cp.size or event.get("root") != cp.root:
        raise _Bad(seq, "checkpoint record's size or root differ from its signed note")
    if cp.size > seq:
        raise _Bad(seq, f"checkpoint covers {cp.size} records but only {seq} precede it")
    root = frontier.root() if cp.size == frontier.size else tree_root(cp.size, store.read_hash)
    if root != cp.root:
        raise _Bad(seq, f"checkpoint root for size {cp.size} does not match the records")
    if previous is not None:
        if cp.size < previous.size:
            raise _Bad(seq, f"checkpoint size {cp.size} is smaller than the previous {previous.size}")
        try:
            proof = consistency_proof(previous.size, cp.size, store.read_hash)
            verify_consistency(previous.size, cp.size, previous.root, cp.root, proof)
        except (ProofError, AuditError) as e:
            raise _Bad(seq, f"checkpoint is not consistent with the previous one: {e}") from None
    return cp


def _check_witness(
    store: Store,
    witness: str,
    size: int,
    latest: Checkpoint | None,
    verifier: Verifier,
    origin: str | None,
    state: dict[str, Any],
) -> None:
    try:
        wit = open_checkpoint(read_witness(witness), verifier, origin)
    except CheckpointError as e:
        raise _Bad(None, f"witness checkpoint: {e}") from None
    state["witness"] = wit
    if wit.size > size:
        raise _Bad(
            size,
            f"log holds {size} records but the witness checkpoint covers {wit.size}: "
            "records were removed or the store was rolled back",
        )
    root = tree_root(wit.size, store.read_hash)
    if root != wit.root:
        raise _Bad(
            max(wit.size - 1, 0),
            f"fork: the log's tree of size {wit.size} has another root than the witness",
        )


def prove_inclusion(store: Store, seq: int, size: int) -> list[bytes]:
    """The inclusion proof of record ``seq`` in the tree of ``size`` records."""
    return inclusion_proof(seq, size, store.read_hash)


def prove_consistency(store: Store, old: int, new: int) -> list[bytes]:
    """The consistency proof between tree sizes ``old`` and ``new``."""
    return consistency_proof(old, new, store.read_hash)


def checkpoint_at_or_after(store: Store, size: int) -> Checkpoint | None:
    """The first checkpoint (from the log) whose tree covers at least ``size`` records."""
    for cp_size, seq in store.checkpoint_seqs():
        if cp_size >= size:
            rec = store.get(seq)
            if rec is not None and isinstance(rec.event.get("note"), str):
                return Checkpoint(
                    str(rec.event["origin"]), cp_size, bytes(rec.event["root"]), rec.event["note"]
                )
    return None


def check_inclusion_bundle(bundle: dict[str, Any], verifier: Verifier) -> None:
    """Check an ``audit prove`` JSON bundle as a third party would; raises AuditError."""
    cp = open_checkpoint(bundle["checkpoint"], verifier)
    record = bytes.fromhex(bundle["record"])
    if decode_record(record).seq != bundle["seq"]:
        raise ProofError("record in the bundle is not the one claimed")
    proof = [bytes.fromhex(h) for h in bundle["proof"]]
    verify_inclusion(bundle["seq"], cp.size, leaf_hash(record), proof, cp.root)
