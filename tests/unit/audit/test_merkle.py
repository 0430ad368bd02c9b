"""RFC 6962 hashing and proofs, checked against the Certificate Transparency reference vectors."""

from __future__ import annotations

import pytest

from audit.errors import ProofError
from audit.merkle import (
    EMPTY_ROOT,
    Frontier,
    MemoryTree,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    stored_hash_count,
    stored_hash_index,
    tree_root,
    verify_consistency,
    verify_inclusion,
)

# The 8 leaves of the CT reference implementations' tests and the root of every prefix.
LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
INCLUSION = [
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (0, 1, []),
]
CONSISTENCY = [
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]


def reference_tree(n: int = 8) -> MemoryTree:
    tree = MemoryTree()
    for leaf in LEAVES[:n]:
        tree.append(leaf_hash(leaf))
    return tree


def root(n: int) -> bytes:
    return bytes.fromhex(ROOTS[n])


def test_roots_match_reference_for_every_size() -> None:
    """The tree head of every prefix of the reference leaves is the published root."""
    tree = reference_tree()
    for n in range(9):
        assert tree_root(n, tree.read) == root(n)
    assert root(0) == EMPTY_ROOT
    assert tree.frontier.root() == root(8)


def test_frontier_root_matches_each_size() -> None:
    """The incremental frontier gives the same root after each append."""
    f = Frontier()
    out: list[bytes] = []
    for n, leaf in enumerate(LEAVES, 1):
        f.append(leaf_hash(leaf), out)
        assert f.root() == root(n)
    assert len(out) == stored_hash_count(8)


def test_stored_hash_layout_is_post_order() -> None:
    """Stored hash positions follow the post-order layout, leaves and parents interleaved."""
    assert [stored_hash_index(0, n) for n in range(5)] == [0, 1, 3, 4, 7]
    assert stored_hash_index(1, 0) == 2 and stored_hash_index(2, 0) == 6
    tree = reference_tree()
    assert tree.read(3, 0) == root(8)


@pytest.mark.parametrize(("index", "size", "proof"), INCLUSION)
def test_inclusion_proofs_match_reference(index: int, size: int, proof: list[str]) -> None:
    """Inclusion proofs equal the reference paths and verify against the reference root."""
    tree = reference_tree()
    got = inclusion_proof(index, size, tree.read)
    assert [h.hex() for h in got] == proof
    verify_inclusion(index, size, leaf_hash(LEAVES[index]), got, root(size))


@pytest.mark.parametrize(("old", "new", "proof"), CONSISTENCY)
def test_consistency_proofs_match_reference(old: int, new: int, proof: list[str]) -> None:
    """Consistency proofs equal the reference proofs and verify between the reference roots."""
    tree = reference_tree()
    got = consistency_proof(old, new, tree.read)
    assert [h.hex() for h in got] == proof
    verify_consistency(old, new, root(old), root(new), got)


def test_every_inclusion_and_consistency_proof_verifies_and_tampering_fails() -> None:
    """For all sizes up to 40, each proof verifies and a wrong leaf, index or root does not."""
    tree = MemoryTree()
    for i in range(40):
        tree.append(leaf_hash(i.to_bytes(2, "big")))
    for n in range(1, 41):
        r = tree_root(n, tree.read)
        for i in range(n):
            p = inclusion_proof(i, n, tree.read)
            leaf = tree.read(0, i)
            verify_inclusion(i, n, leaf, p, r)
            with pytest.raises(ProofError):
                verify_inclusion(i, n, leaf_hash(b"forged"), p, r)
            if n > 1:
                with pytest.raises(ProofError):
                    verify_inclusion((i + 1) % n, n, leaf, p, r)
        for m in range(0, n + 1):
            p = consistency_proof(m, n, tree.read)
            verify_consistency(m, n, tree_root(m, tree.read), r, p)
            if 0 < m < n:
                with pytest.raises(ProofError):
                    verify_consistency(m, n, leaf_hash(b"other"), r, p)
                with pytest.raises(ProofError):
                    verify_consistency(m, n, tree_root(m, tree.read), leaf_hash(b"x"), p)
                if p:
                    with pytest.raises(ProofError):
                        verify_consistency(m, n, tree_root(m, tree.read), r, p[:-1])


def test_consistency_edge_cases() -> None:
    """Size 0 and equal sizes need empty proofs; old > new is refused; equal sizes need equal roots."""
    tree = reference_tree()
    assert consistency_proof(0, 8, tree.read) == []
    assert consistency_proof(8, 8, tree.read) == []
    verify_consistency(0, 8, root(0), root(8), [])
    verify_consistency(8, 8, root(8), root(8), [])
    with pytest.raises(ProofError):
        verify_consistency(8, 8, root(8), root(7), [])
    with pytest.raises(ProofError):
        consistency_proof(8, 5, tree.read)
    with pytest.raises(ProofError):
        verify_consistency(8, 5, root(8), root(5), [])
    with pytest.raises(ProofError):
        verify_consistency(0, 8, root(0), root(8), [root(1)])
    with pytest.raises(ProofError):
        verify_consistency(2, 5, root(2), root(5), [])


def test_inclusion_edge_cases() -> None:
    """An index outside the tree, an empty tree and a too long or too short proof are refused."""
    tree = reference_tree()
    with pytest.raises(ProofError):
        inclusion_proof(8, 8, tree.read)
    with pytest.raises(ProofError):
        inclusion_proof(0, 0, tree.read)
    with pytest.raises(ProofError):
        verify_inclusion(0, 0, leaf_hash(b""), [], root(0))
    p = inclusion_proof(0, 8, tree.read)
    with pytest.raises(ProofError):
        verify_inclusion(0, 8, leaf_hash(LEAVES[0]), [*p, root(1)], root(8))
    with pytest.raises(ProofError):
        verify_inclusion(0, 8, leaf_hash(LEAVES[0]), p[:-1], root(8))
