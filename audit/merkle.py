"""RFC 6962 Merkle tree hashing, stored-hash layout, inclusion and consistency proofs.

Stored hashes are laid out in post-order (the layout of Go's sumdb ``tlog``):
the hashes that record ``n`` completes are written right after its leaf hash,
so a log's hashes are appended in index order and never rewritten.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from audit.errors import ProofError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

# Reads the hash of the complete subtree at (level, index): leaves
# [index << level, (index + 1) << level).
HashReader = Callable[[int, int], bytes]


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def stored_hash_index(level: int, n: int) -> int:
    """Position in the stored-hash sequence of the level-``level`` hash number ``n``."""
    for _ in range(level):
        n = 2 * n + 1
    i = 0
    while n > 0:
        i += n
        n >>= 1
    return i + level


def stored_hash_count(size: int) -> int:
    """Number of stored hashes of a tree with ``size`` leaves."""
    return 2 * size - size.bit_count()


def split_point(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class Frontier:
    """The right edge of a growing tree: one hash per complete subtree, largest first."""

    __slots__ = ("size", "hashes")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if len(hashes) != size.bit_count():
            raise ProofError(f"frontier of size {size} needs {size.bit_count()} hashes")
        self.size = size
        self.hashes = list(hashes)

    def copy(self) -> Frontier:
        """An independent copy."""
        return Frontier(self.size, self.hashes)

    def append(self, leaf: bytes, out: list[bytes]) -> None:
        """Add a leaf hash; append to ``out`` the hashes this leaf stores (leaf first)."""
        out.append(leaf)
        h = leaf
        n = self.size
        hashes = self.hashes
        while n & 1:
            h = hashlib.sha256(b"\x01" + hashes.pop() + h).digest()
            out.append(h)
            n >>= 1
        hashes.append(h)
        self.size += 1

    def root(self) -> bytes:
        """The tree head of the current size."""
        if not self.hashes:
            return EMPTY_ROOT
        h = self.hashes[-1]
        for left in reversed(self.hashes[:-1]):
            h = node_hash(left, h)
        return h

    @staticmethod
    def subtrees(size: int) -> list[tuple[int, int]]:
        """The (level, index) of each complete subtree on the frontier of ``size``."""
        out: list[tuple[int, int]] = []
        start = 0
        for level in range(size.bit_length() - 1, -1, -1):
            if size >> level & 1:
                out.append((level, start >> level))
                start += 1 << level
        return out

    @classmethod
    def load(cls, size: int, read: HashReader) -> Frontier:
        """Rebuild the frontier of ``size`` from stored hashes."""
        return cls(size, [read(level, index) for level, index in cls.subtrees(size)])


def subtree_hash(lo: int, hi: int, read: HashReader) -> bytes:
    """MTH of leaves [lo, hi) using stored complete-subtree hashes."""
    n = hi - lo
    if n <= 0:
        raise ProofError(f"empty range [{lo}, {hi})")
    if n & (n - 1) == 0 and lo % n == 0:
        return read(n.bit_length() - 1, lo // n)
    k = split_point(n)
    return node_hash(subtree_hash(lo, lo + k, read), subtree_hash(lo + k, hi, read))


def tree_root(size: int, read: HashReader) -> bytes:
    """The tree head of the first ``size`` leaves."""
    return EMPTY_ROOT if size == 0 else subtree_hash(0, size, read)


def inclusion_proof(index: int, size: int, read: HashReader) -> list[bytes]:
    """RFC 6962 audit path of leaf ``index`` in the tree of ``size`` leaves."""
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of size {size}")
    proof: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = split_point(hi - lo)
        if index < lo + k:
            proof.append(subtree_hash(lo + k, hi, read))
            hi = lo + k
        else:
            proof.append(subtree_hash(lo, lo + k, read))
            lo = lo + k
    proof.reverse()
    return proof


def consistency_proof(old: int, new: int, read: HashReader) -> list[bytes]:
    """RFC 6962 consistency proof between tree sizes ``old`` and ``new``."""
    if not 0 <= old <= new:
        raise ProofError(f"no consistency proof from size {old} to size {new}")
    if old == 0 or old == new:
        return []
    proof: list[bytes] = []

    def sub(m: int, lo: int, hi: int, complete: bool) -> None:
        n = hi - lo
        if m == n:
            if not complete:
                proof.append(subtree_hash(lo, hi, read))
            return
        k = split_point(n)
        if m <= k:
            sub(m, lo, lo + k, complete)
            proof.append(subtree_hash(lo + k, hi, read))
        else:
            sub(m - k, lo + k, hi, False)
            proof.append(subtree_hash(lo, lo + k, read))

    sub(old, 0, new, True)
    return proof


def root_from_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root an inclusion proof leads to (RFC 9162 2.1.3.2); raises ProofError if malformed."""
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of size {size}")
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is too short")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """Raise ProofError unless ``proof`` shows ``leaf`` at ``index`` in the tree ``root``."""
    if root_from_inclusion(index, size, leaf, proof) != root:
        raise ProofError(f"inclusion proof for leaf {index} does not lead to the root of size {size}")


def verify_consistency(old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> None:
    """Raise ProofError unless ``proof`` shows tree ``old`` is a prefix of tree ``new`` (RFC 9162)."""
    if old > new:
        raise ProofError(f"old size {old} is larger than new size {new}")
    if old == new:
        if proof:
            raise ProofError("consistency proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError(f"two different roots for the same size {old}")
        return
    if old == 0:
        if proof:
            raise ProofError("consistency proof from the empty tree must be empty")
        return
    if not proof:
        raise ProofError("consistency proof is empty")
    path = list(proof)
    if old & (old - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is too short")
    if fr != old_root:
        raise ProofError(f"consistency proof does not lead to the old root of size {old}")
    if sr != new_root:
        raise ProofError(f"consistency proof does not lead to the new root of size {new}")


class MemoryTree:
    """A Merkle tree held in memory (for tests and for verifying a log being read)."""

    def __init__(self) -> None:
        self.frontier = Frontier()
        self.stored: list[bytes] = []

    def append(self, leaf: bytes) -> None:
        """Add a leaf hash."""
        self.frontier.append(leaf, self.stored)

    def read(self, level: int, index: int) -> bytes:
        """The stored hash at (level, index)."""
        return self.stored[stored_hash_index(level, index)]

    @property
    def size(self) -> int:
        """Number of leaves."""
        return self.frontier.size
