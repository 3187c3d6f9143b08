"""BlockManager: ref counts, free list, salted prefix cache, LRU eviction, integrity checks."""

from __future__ import annotations

import pytest

from engine.core.block_manager import BlockManager
from engine.errors import IntegrityError
from tests.engine.helpers import make_seq

BS = 4


def _admit(bm: BlockManager, seq, num_new: int | None = None) -> list[int]:  # type: ignore[no-untyped-def]
    cached = bm.find_cached_prefix(seq)
    n = num_new if num_new is not None else seq.num_tokens - len(cached) * BS
    assert bm.can_admit(seq, cached, n)
    bm.admit(seq, cached, n)
    seq.num_computed_tokens += n
    bm.cache_computed_blocks(seq)
    return cached


def test_allocate_and_free_returns_every_block() -> None:
    bm = BlockManager(8, BS)
    seq = make_seq("a", list(range(10)))
    _admit(bm, seq)
    bm.check_integrity([seq])
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []
    bm.check_integrity([])


def test_prefix_shared_under_same_salt() -> None:
    bm = BlockManager(16, BS)
    a = make_seq("a", list(range(13)), cache_salt="tenant-1")
    _admit(bm, a)
    b = make_seq("b", [*range(12), 99], cache_salt="tenant-1")
    cached = _admit(bm, b)
    assert cached == a.block_table[:3]  # 3 full blocks shared
    assert b.num_cached_tokens == 12
    assert bm.prefix_cache_hits == 12 and bm.prefix_cache_queries == 26
    bm.check_integrity([a, b])  # shared blocks have ref count 2


def test_prefix_never_shared_across_salts() -> None:
    bm = BlockManager(16, BS)
    a = make_seq("a", list(range(13)), cache_salt="tenant-1")
    _admit(bm, a)
    for salt in ("tenant-2", None):
        b = make_seq(f"b-{salt}", list(range(13)), cache_salt=salt)
        assert _admit(bm, b) == []
        assert not set(a.block_table) & set(b.block_table)
        bm.free(b)


def test_full_hit_still_computes_last_token() -> None:
    bm = BlockManager(16, BS)
    a = make_seq("a", list(range(8)))
    _admit(bm, a)
    b = make_seq("b", list(range(8)))
    assert len(_admit(bm, b)) == 1  # only the first block: the block with the last token is recomputed


def test_freed_cached_blocks_are_reused_then_evicted_lru() -> None:
    bm = BlockManager(4, BS)
    a = make_seq("a", list(range(9)))
    _admit(bm, a)
    bm.free(a)  # blocks stay cached while free
    b = make_seq("b", list(range(9)))
    assert len(_admit(bm, b)) == 2
    bm.free(b)
    c = make_seq("c", [50 + i for i in range(16)])  # needs all 4 blocks: evicts the cached ones
    assert _admit(bm, c) == []
    d = make_seq("d", list(range(9)))
    assert bm.find_cached_prefix(d) == []
    bm.check_integrity([c])


def test_integrity_violation_raises_with_numbers() -> None:
    bm = BlockManager(4, BS)
    seq = make_seq("a", list(range(5)))
    _admit(bm, seq)
    seq.block_table.append(3)  # a block the manager never handed out
    with pytest.raises(IntegrityError, match=r"block 3: ref count 0; block tables reference it 1 times"):
        bm.check_integrity([seq])


def test_cannot_admit_beyond_capacity() -> None:
    bm = BlockManager(2, BS)
    seq = make_seq("a", list(range(9)))
    assert not bm.can_admit(seq, [], 9)
    assert bm.can_admit(seq, [], 8)


def test_empty_blocks_are_taken_lowest_first_before_any_cached_prefix_is_evicted() -> None:
    bm = BlockManager(8, BS)
    a = make_seq("a", list(range(10)))  # blocks 0, 1 full (cached once computed), 2 partial
    assert _admit(bm, a) == [] and a.block_table == [0, 1, 2]
    b = make_seq("b", [100 + i for i in range(5)])
    _admit(bm, b)
    assert b.block_table == [3, 4]
    bm.free(a)  # 0, 1 keep a's prefix (cached); 2 is empty again
    bm.check_integrity([b])
    c = make_seq("c", [200 + i for i in range(13)])  # 4 blocks, all new content
    _admit(bm, c)
    assert c.block_table == [2, 5, 6, 7]  # the empty ones, lowest id first; the cached ones stay
    assert bm.find_cached_prefix(make_seq("a2", list(range(10)))) == [0, 1]
    bm.check_integrity([b, c])
    bm.free(b)
    bm.free(c)
    d = make_seq("d", [300 + i for i in range(3)])
    _admit(bm, d)
    # the lowest empty block (b's partial one); the full blocks of b and c keep their prefixes
    assert d.block_table == [4] and bm.num_free_blocks == 7
    bm.check_integrity([d])


def test_cached_blocks_are_evicted_lru_only_when_no_empty_block_is_left() -> None:
    bm = BlockManager(4, BS)
    a, b = make_seq("a", list(range(5))), make_seq("b", [50 + i for i in range(5)])
    _admit(bm, a)  # [0, 1]: block 0 full
    _admit(bm, b)  # [2, 3]: block 2 full
    bm.free(a)
    bm.free(b)  # cached: 0 (freed first), then 2; empty: 1, 3
    c = make_seq("c", [90 + i for i in range(12)])  # 3 blocks: both empty ones, then evicts 0
    _admit(bm, c)
    assert c.block_table == [1, 3, 0]
    assert bm.find_cached_prefix(make_seq("a2", list(range(5)))) == []
    assert bm.find_cached_prefix(make_seq("b2", [50 + i for i in range(5)])) == [2]
    bm.check_integrity([c])


def test_reset_prefix_cache_makes_free_cached_blocks_empty() -> None:
    bm = BlockManager(4, BS)
    a = make_seq("a", list(range(9)))
    _admit(bm, a)
    bm.free(a)
    bm.reset_prefix_cache()
    bm.check_integrity([])
    c = make_seq("c", [90 + i for i in range(5)])
    _admit(bm, c)
    assert c.block_table == [0, 1] and bm.find_cached_prefix(make_seq("a2", list(range(9)))) == []


def _grow(bm: BlockManager, seq, tokens: int) -> None:  # type: ignore[no-untyped-def]
    """Decode `tokens` more tokens into seq (output ids appended, blocks allocated as it goes)."""
    for _ in range(tokens):
        assert bm.allocate_slots(seq, 1)
        seq.num_computed_tokens += 1
        seq.output_token_ids.append(7)


def test_a_sequence_grows_into_blocks_reserved_next_to_its_prompt() -> None:
    bm = BlockManager(16, BS)
    a = make_seq("a", list(range(5)), max_total_tokens=13)  # 2 prompt blocks, 4 in all
    b = make_seq("b", [50 + i for i in range(5)], max_total_tokens=9)  # 2 prompt blocks, 3 in all
    _admit(bm, a)
    _admit(bm, b)
    assert a.block_table == [0, 1] and b.block_table == [4, 5]  # 2, 3 are held for a; 6 for b
    bm.check_integrity([a, b])
    assert bm.num_free_blocks == 12  # reservations count as free
    _grow(bm, a, 8)
    _grow(bm, b, 4)
    assert a.block_table == [0, 1, 2, 3] and b.block_table == [4, 5, 6]  # each one consecutive
    bm.check_integrity([a, b])
    c = make_seq("c", [90 + i for i in range(3)])
    _admit(bm, c)
    assert c.block_table == [7]


def test_reservations_are_soft_and_released_with_their_sequence() -> None:
    bm = BlockManager(6, BS)
    a = make_seq("a", list(range(5)), max_total_tokens=16)  # 2 blocks now, 2 more held for it
    _admit(bm, a)
    b = make_seq("b", [50 + i for i in range(12)])  # 3 blocks: no run of 3 is unreserved
    assert bm.can_admit(b, [], 12)  # reserved blocks count as free
    _admit(bm, b)
    assert b.block_table == [4, 5, 2]  # the empty ones, then the lowest reserved one
    bm.check_integrity([a, b])
    _grow(bm, a, 4)  # a's next reserved block was taken: it grows into the one after
    assert a.block_table == [0, 1, 3]
    bm.free(b)
    bm.free(a)
    bm.check_integrity([])
    assert bm.num_free_blocks == 6


def test_growth_reservation_is_capped_and_freed_when_the_sequence_ends() -> None:
    from engine.core.block_manager import GROWTH_BLOCKS

    bm = BlockManager(200, BS)
    a = make_seq("a", list(range(8)), max_total_tokens=10_000)
    _admit(bm, a)
    b = make_seq("b", [50 + i for i in range(4)])
    _admit(bm, b)
    assert b.block_table == [2 + GROWTH_BLOCKS]  # right after a's prompt and its capped reservation
    bm.free(a)
    c = make_seq("c", [90 + i for i in range(4)])
    _admit(bm, c)
    assert c.block_table == [2]  # a's reservation is free again (its full prompt blocks stay cached)
    bm.check_integrity([b, c])
