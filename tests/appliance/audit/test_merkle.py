"""RFC 9162 Merkle trees: the stored-subtree implementation against the RFC's recursive
definitions, for every tree size and index up to 70, and the verifiers against bad proofs."""

from __future__ import annotations

import hashlib

import pytest

from appliance.audit.merkle import (
    EMPTY_ROOT,
    Frontier,
    MemoryNodes,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    verify_consistency,
    verify_inclusion,
)


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(d: list[bytes]) -> bytes:  # RFC 9162 2.1.1, literally
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return leaf_hash(d[0])
    k = _k(len(d))
    return node_hash(mth(d[:k]), mth(d[k:]))


def path(m: int, d: list[bytes]) -> list[bytes]:  # 2.1.3.1
    if len(d) == 1:
        return []
    k = _k(len(d))
    return [*path(m, d[:k]), mth(d[k:])] if m < k else [*path(m - k, d[k:]), mth(d[:k])]


def subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:  # 2.1.4.1
    if m == len(d):
        return [] if b else [mth(d)]
    k = _k(len(d))
    if m <= k:
        return [*subproof(m, d[:k], b), mth(d[k:])]
    return [*subproof(m - k, d[k:], False), mth(d[:k])]


DATA = [f"record {i}".encode() for i in range(70)]
LEAVES = [leaf_hash(x) for x in DATA]


def test_roots_and_frontier_match_the_rfc_definition() -> None:
    assert root(MemoryNodes([]), 0) == EMPTY_ROOT
    frontier = Frontier()
    stored: dict[tuple[int, int], bytes] = {}
    for n in range(1, len(DATA) + 1):
        for level, index, h in frontier.append(LEAVES[n - 1]):
            stored[(level, index)] = h
        expected = mth(DATA[:n])
        assert frontier.root() == expected
        assert root(MemoryNodes(LEAVES[:n]), n) == expected
        reloaded = Frontier.load(MemoryNodes(LEAVES[:n]), n)
        assert reloaded.root() == expected and reloaded.edge() == frontier.edge()
    source = MemoryNodes(LEAVES)
    assert all(source.node(level, index) == h for (level, index), h in stored.items())


def test_inclusion_proofs_match_and_verify() -> None:
    for n in range(1, 40):
        source = MemoryNodes(LEAVES[:n])
        r = mth(DATA[:n])
        for m in range(n):
            proof = inclusion_proof(source, m, n)
            assert proof == path(m, DATA[:n])
            assert verify_inclusion(LEAVES[m], m, n, proof, r)
            assert not verify_inclusion(LEAVES[(m + 1) % n], m, n, proof, r) or n == 1
            assert not verify_inclusion(LEAVES[m], m, n, proof, mth(DATA[: n - 1])) or n == 1
            assert not verify_inclusion(LEAVES[m], n, n, proof, r)
            if proof:
                bad = list(proof)
                bad[0] = hashlib.sha256(bad[0]).digest()
                assert not verify_inclusion(LEAVES[m], m, n, bad, r)
    with pytest.raises(ValueError):
        inclusion_proof(MemoryNodes(LEAVES[:3]), 3, 3)


def test_consistency_proofs_match_and_verify() -> None:
    source = MemoryNodes(LEAVES[:45])
    for new in range(1, 45):
        new_root = mth(DATA[:new])
        for old in range(1, new + 1):
            proof = consistency_proof(source, old, new)
            assert proof == (subproof(old, DATA[:new], True) if old < new else [])
            assert verify_consistency(old, new, mth(DATA[:old]), new_root, proof)
            # a different old tree of the same size is not consistent with the new one
            forged_old = mth([b"forged", *DATA[1:old]])
            assert not verify_consistency(old, new, forged_old, new_root, proof)
            if proof:
                assert not verify_consistency(old, new, mth(DATA[:old]), new_root, proof[:-1])
    assert verify_consistency(0, 5, EMPTY_ROOT, mth(DATA[:5]), [])
    assert not verify_consistency(6, 5, mth(DATA[:6]), mth(DATA[:5]), [])
