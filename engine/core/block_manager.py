"""KV block allocator: ref counts, an LRU free list, and a prefix cache keyed by chained hashes.

Contract:
- A block is either referenced (ref_count > 0, in some sequence's block table) or in the free
  list (ref_count == 0), never both.
- A free block may still hold a cached prefix (it is in `_hash_to_block`); it is reused in LRU
  order, and its hash is evicted only when it is handed out for new content.
- Only full blocks whose K/V are computed are hashed into the prefix cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from engine.core.block_hash import extend_block_hashes
from engine.core.sequence import Sequence
from engine.errors import IntegrityError


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1; got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_count = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._hash_to_block: dict[bytes, int] = {}
        self._registered: dict[int, int] = {}  # id(seq) -> blocks of seq already hashed in
        self.prefix_cache_hits = 0  # tokens served from cache at admission
        self.prefix_cache_queries = 0  # prompt tokens looked up at admission

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids caching the longest prefix of seq; never covers its last token."""
        if not self.enable_prefix_caching:
            return []
        extend_block_hashes(seq.block_hashes, seq.all_token_ids, self.block_size, seq.cache_salt)
        limit = (seq.num_tokens - 1) // self.block_size  # keep >= 1 token to compute
        found: list[int] = []
        for h in seq.block_hashes[:limit]:
            block = self._hash_to_block.get(h)
            if block is None:
                break
            found.append(block)
        return found

    # ---- allocation ----------------------------------------------------------------------
    def can_admit(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> bool:
        reused_free = sum(1 for b in cached if b in self._free)
        need = self.blocks_needed(len(cached) * self.block_size + num_new_tokens) - len(cached)
        return need <= len(self._free) - reused_free

    def admit(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> None:
        """Attach cached prefix blocks to a waiting seq, then allocate room for its first chunk."""
        if seq.block_table:
            raise IntegrityError(f"admit: expected an empty block table; found {len(seq.block_table)}")
        for b in cached:
            if self._ref_count[b] == 0:
                self._free.pop(b)
            self._ref_count[b] += 1
        seq.block_table.extend(cached)
        seq.num_computed_tokens = seq.num_cached_tokens = len(cached) * self.block_size
        self._registered[id(seq)] = len(cached)
        self.prefix_cache_queries += seq.num_tokens
        self.prefix_cache_hits += seq.num_cached_tokens
        if not self.allocate_slots(seq, num_new_tokens):
            raise IntegrityError("admit: can_admit() was true but allocation failed")

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow seq's block table to hold num_computed + num_new tokens; False if out of blocks."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > len(self._free):
            return False
        for _ in range(max(need, 0)):
            seq.block_table.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        block, _ = self._free.popitem(last=False)  # least recently freed first
        old = self._block_hash[block]
        if old is not None:
            if self._hash_to_block.get(old) == block:
                del self._hash_to_block[old]
            self._block_hash[block] = None
        self._ref_count[block] = 1
        return block

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks; tail blocks first, so they are evicted before shared prefixes."""
        for b in reversed(seq.block_table):
            self._ref_count[b] -= 1
            if self._ref_count[b] < 0:
                raise IntegrityError(f"block {b}: ref count went negative ({self._ref_count[b]})")
            if self._ref_count[b] == 0:
                self._free[b] = None
        seq.block_table.clear()
        self._registered.pop(id(seq), None)

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Publish seq's full, computed blocks into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        start = self._registered.get(id(seq), 0)
        if num_full <= start:
            return
        extend_block_hashes(seq.block_hashes, seq.all_token_ids, self.block_size, seq.cache_salt)
        for i in range(start, num_full):
            block, h = seq.block_table[i], seq.block_hashes[i]
            if self._block_hash[block] is None and h not in self._hash_to_block:
                self._block_hash[block] = h
                self._hash_to_block[h] = block
        self._registered[id(seq)] = num_full

    def reset_prefix_cache(self) -> None:
        for h, b in list(self._hash_to_block.items()):
            self._block_hash[b] = None
            del self._hash_to_block[h]

    # ---- integrity -----------------------------------------------------------------------
    def check_integrity(self, seqs: Iterable[Sequence]) -> None:
        """Raise IntegrityError (with numbers) unless bookkeeping matches the live sequences."""
        expected = [0] * self.num_blocks
        for seq in seqs:
            need = self.blocks_needed(seq.num_computed_tokens)
            if len(seq.block_table) < need:
                raise IntegrityError(
                    f"seq {seq.request_id}: {seq.num_computed_tokens} computed tokens need {need} "
                    f"blocks; block table has {len(seq.block_table)}"
                )
            for b in seq.block_table:
                expected[b] += 1
        for b in range(self.num_blocks):
            if expected[b] != self._ref_count[b]:
                raise IntegrityError(
                    f"block {b}: ref count {self._ref_count[b]}; block tables reference it {expected[b]} times"
                )
            if (self._ref_count[b] == 0) != (b in self._free):
                raise IntegrityError(
                    f"block {b}: ref count {self._ref_count[b]} but in_free_list={b in self._free}"
                )
        used = sum(1 for r in self._ref_count if r > 0)
        if used + len(self._free) != self.num_blocks:
            raise IntegrityError(
                f"{used} used + {len(self._free)} free blocks != {self.num_blocks} total"
            )
        for h, b in self._hash_to_block.items():
            if self._block_hash[b] != h:
                raise IntegrityError(f"prefix cache maps a hash to block {b}, which holds another hash")
        hashed = sum(1 for h in self._block_hash if h is not None)
        if hashed != len(self._hash_to_block):
            raise IntegrityError(f"{hashed} blocks carry a hash; prefix cache has {len(self._hash_to_block)}")
