"""Merkle trees as RFC 9162 (Certificate Transparency 2.0) defines them, section 2.1.

Hashing: ``leaf = SHA-256(0x00 || data)``, ``node = SHA-256(0x01 || left || right)``, the empty
tree hashes to ``SHA-256("")``. For ``n > 1`` leaves, ``k`` is the largest power of two below
``n`` and ``MTH(D[0:n]) = node(MTH(D[0:k]), MTH(D[k:n]))``.

An audit record is a leaf whose data is its 32-byte record hash (``bytes.fromhex(record.hash)``),
so a pruned record -- body gone, hash kept -- is still a leaf of the tree.

This module is pure: proofs are built from a ``NodeSource`` that answers the hash of any
*complete aligned subtree* (``level`` = log2 of its size, ``index`` = its position at that
level). Every hash a proof needs is such a subtree or a right edge made of them, which is why
the log stores exactly those (``audit_tree_nodes``) and nothing else. Verification follows the
RFC's algorithms 2.1.3.2 and 2.1.4.2 word for word.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Protocol

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def record_leaf(record_hash_hex: str) -> bytes:
    """The leaf hash of an audit record, from its hex record hash."""
    return leaf_hash(bytes.fromhex(record_hash_hex))


def _largest_power_of_two_below(n: int) -> int:
    return 1 << ((n - 1).bit_length() - 1)


def decompose(start: int, end: int) -> list[tuple[int, int]]:
    """The complete aligned subtrees ``(level, index)`` covering ``[start, end)``, left to right.

    ``start`` must be aligned for the range (a multiple of the largest piece), as every range
    in an RFC 9162 proof is.
    """
    pieces: list[tuple[int, int]] = []
    pos = start
    size = end - start
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            if pos % (1 << level):
                raise ValueError(f"range [{start}, {end}) is not aligned at {pos} for a subtree of {1 << level}")
            pieces.append((level, pos >> level))
            pos += 1 << level
    return pieces


class NodeSource(Protocol):
    def node(self, level: int, index: int) -> bytes:
        """The hash of the complete subtree of ``2**level`` leaves starting at ``index << level``."""


def range_hash(source: NodeSource, start: int, end: int) -> bytes:
    """``MTH(D[start:end])`` for an aligned range, from complete subtrees (folded right to left)."""
    if end <= start:
        return EMPTY_ROOT
    pieces = [source.node(level, index) for level, index in decompose(start, end)]
    acc = pieces[-1]
    for piece in reversed(pieces[:-1]):
        acc = node_hash(piece, acc)
    return acc


def root(source: NodeSource, size: int) -> bytes:
    return range_hash(source, 0, size)


def inclusion_proof(source: NodeSource, index: int, size: int) -> list[bytes]:
    """``PATH(index, D[0:size])``: sibling hashes, leaf level first."""
    if not 0 <= index < size:
        raise ValueError(f"leaf index must be in [0, {size}), found {index}")
    path: list[bytes] = []
    _path(source, index, 0, size, path)
    return path


def _path(source: NodeSource, m: int, start: int, n: int, out: list[bytes]) -> None:
    if n == 1:
        return
    k = _largest_power_of_two_below(n)
    if m < k:
        _path(source, m, start, k, out)
        out.append(range_hash(source, start + k, start + n))
    else:
        _path(source, m - k, start + k, n - k, out)
        out.append(range_hash(source, start, start + k))


def consistency_proof(source: NodeSource, old_size: int, new_size: int) -> list[bytes]:
    """``PROOF(old_size, D[0:new_size])``; empty when the sizes are equal or ``old_size`` is 0."""
    if not 0 <= old_size <= new_size:
        raise ValueError(f"sizes must satisfy 0 <= old <= new, found old {old_size}, new {new_size}")
    out: list[bytes] = []
    if 0 < old_size < new_size:
        _subproof(source, old_size, 0, new_size, True, out)
    return out


def _subproof(source: NodeSource, m: int, start: int, n: int, complete: bool, out: list[bytes]) -> None:
    if m == n:
        if not complete:
            out.append(range_hash(source, start, start + n))
        return
    k = _largest_power_of_two_below(n)
    if m <= k:
        _subproof(source, m, start, k, complete, out)
        out.append(range_hash(source, start + k, start + n))
    else:
        _subproof(source, m - k, start + k, n - k, False, out)
        out.append(range_hash(source, start, start + k))


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes], expected_root: bytes) -> bool:
    """RFC 9162 2.1.3.2: does ``path`` prove ``leaf`` at ``index`` in the tree of ``size``?"""
    if index >= size or index < 0:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == expected_root


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """RFC 9162 2.1.4.2, extended to the trivial cases (old 0: anything; old == new: same root)."""
    if old_size < 0 or old_size > new_size:
        return False
    if old_size == 0:
        return not proof
    if old_size == new_size:
        return not proof and old_root == new_root
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # an exact power of two
        path.insert(0, old_root)
    if not path:
        return False
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0


class Frontier:
    """The right edge of a growing tree: one complete subtree per set bit of ``size``.

    ``append`` returns every subtree completed by the new leaf as ``(level, index, hash)``
    (the leaf itself first), which is what the log stores; ``root()`` folds the edge.
    Memory is O(log size), so a million-record stream is walked in constant memory.
    """

    def __init__(self, size: int = 0, edge: Iterable[bytes] = ()) -> None:
        self.size = size
        self._edge: list[tuple[int, bytes]] = []
        hashes = list(edge)
        levels = [level for level in range(size.bit_length() - 1, -1, -1) if size >> level & 1]
        if len(hashes) != len(levels):
            raise ValueError(f"a tree of {size} leaves has {len(levels)} edge subtrees, found {len(hashes)}")
        self._edge = list(zip(levels, hashes, strict=True))

    @classmethod
    def load(cls, source: NodeSource, size: int) -> Frontier:
        return cls(size, [source.node(level, index) for level, index in decompose(0, size)])

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        index = self.size
        completed = [(0, index, leaf)]
        level, current = 0, leaf
        while self._edge and self._edge[-1][0] == level:
            _, left = self._edge.pop()
            current = node_hash(left, current)
            level += 1
            completed.append((level, index >> level, current))
        self._edge.append((level, current))
        self.size += 1
        return completed

    def root(self) -> bytes:
        if not self._edge:
            return EMPTY_ROOT
        acc = self._edge[-1][1]
        for _, piece in reversed(self._edge[:-1]):
            acc = node_hash(piece, acc)
        return acc

    def edge(self) -> list[bytes]:
        return [h for _, h in self._edge]

    def copy(self) -> Frontier:
        return Frontier(self.size, self.edge())


class MemoryNodes:
    """A ``NodeSource`` over leaves held in memory (tests, exports of a bounded range)."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        self._levels: list[list[bytes]] = [list(leaves)]
        while len(self._levels[-1]) > 1:
            below = self._levels[-1]
            self._levels.append([node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)])

    def node(self, level: int, index: int) -> bytes:
        try:
            return self._levels[level][index]
        except IndexError:
            raise KeyError(f"no complete subtree at level {level}, index {index}") from None
