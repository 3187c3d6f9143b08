"""KV block allocator: ref counts, free blocks, and a prefix cache keyed by chained hashes.

Contract:
- A block is either referenced (ref_count > 0, in some sequence's block table) or free
  (ref_count == 0), never both.
- A free block is either empty (it holds no cached prefix) or cached (it is in `_hash_to_block`).
  New content goes to an empty block first; a cached block is taken, in LRU order, only when no
  empty one is left, and its hash is evicted then. So a cached prefix lives as long as the cache
  has room.
- Placement: a sequence's blocks are laid out consecutively where the cache allows. At admission
  it takes the lowest run of empty blocks long enough for the rest of its prompt and its next
  output (up to `GROWTH_BLOCKS` blocks of it); what it does not need yet is *reserved* for it, and
  it grows into its reservation. Reservations are soft: they count as free, and another sequence
  takes a reserved block (the lowest) only when no unreserved empty block is left. Otherwise new
  blocks come from the lowest-numbered empty block. Consecutive blocks are read faster by the CPU
  attention kernels (measured 2x over scattered 4 KB pages), and the blocks in use stay at the low
  end of the cache: memory is reused (on CPU the cache is committed lazily, so a node's resident KV
  memory is the high-water mark of what it held at once, and reused pages are not faulted in
  again).
- Only full blocks whose K/V are computed are hashed into the prefix cache.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

from engine.core.block_hash import extend_block_hashes
from engine.core.sequence import Sequence
from engine.errors import IntegrityError

# Block states (one byte each, so the lowest block or run in a state is a bytearray search)
_EMPTY, _USED, _RESERVED, _CACHED = 0, 1, 2, 3
_STATE_NAMES = ("empty", "used", "reserved", "cached")
GROWTH_BLOCKS = 32  # output blocks reserved beyond the prompt at admission, at most


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1; got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_count = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._state = bytearray(num_blocks)  # _EMPTY, _USED, _RESERVED or _CACHED per block
        self._num_used = 0
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # free blocks with a hash, LRU first
        self._reserved_for: dict[int, int] = {}  # reserved block -> id(seq)
        self._reservation: dict[int, deque[int]] = {}  # id(seq) -> its reserved blocks, next first
        self._hash_to_block: dict[bytes, int] = {}
        self._registered: dict[int, int] = {}  # id(seq) -> blocks of seq already hashed in
        self.prefix_cache_hits = 0  # tokens served from cache at admission
        self.prefix_cache_queries = 0  # prompt tokens looked up at admission

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self._num_used

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

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
        reused_free = sum(1 for b in cached if self._ref_count[b] == 0)
        need = self.blocks_needed(len(cached) * self.block_size + num_new_tokens) - len(cached)
        return need <= self.num_free_blocks - reused_free

    def admit(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> None:
        """Attach cached prefix blocks to a waiting seq, then allocate room for its first chunk."""
        if seq.block_table:
            raise IntegrityError(f"admit: expected an empty block table; found {len(seq.block_table)}")
        for b in cached:
            if self._ref_count[b] == 0:
                self._cached_free.pop(b)  # found by its hash, so a cached block
                self._state[b] = _USED
                self._num_used += 1
            self._ref_count[b] += 1
        seq.block_table.extend(cached)
        seq.num_computed_tokens = seq.num_cached_tokens = len(cached) * self.block_size
        self._registered[id(seq)] = len(cached)
        self.prefix_cache_queries += seq.num_tokens
        self.prefix_cache_hits += seq.num_cached_tokens
        self._place(seq, num_new_tokens)
        if not self.allocate_slots(seq, num_new_tokens):
            raise IntegrityError("admit: can_admit() was true but allocation failed")

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow seq's block table to hold num_computed + num_new tokens; False if out of blocks."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            return False
        for _ in range(max(need, 0)):
            seq.block_table.append(self._take_free_block(seq))
        return True

    def _place(self, seq: Sequence, num_new_tokens: int) -> None:
        """Reserve the lowest run of empty blocks for seq's first chunk, the rest of its prompt and
        up to GROWTH_BLOCKS of its output, if there is such a run."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need <= 0:
            return
        final = max(seq.max_total_tokens, seq.num_tokens)
        prompt_left = self.blocks_needed(seq.num_tokens) - len(seq.block_table)
        growth = min(self.blocks_needed(final) - len(seq.block_table) - prompt_left, GROWTH_BLOCKS)
        length = max(need, prompt_left + max(growth, 0))
        start = self._state.find(bytes(length))  # b"\0" * length: the lowest run of empty blocks
        if start < 0:
            return  # no run that long: blocks come one at a time
        run = deque(range(start, start + length))
        for b in run:
            self._state[b] = _RESERVED
            self._reserved_for[b] = id(seq)
        self._reservation[id(seq)] = run

    def _take_free_block(self, seq: Sequence) -> int:
        block = self._next_reserved(seq)
        if block is None:
            block = self._state.find(_EMPTY)
        if block < 0:
            block = self._state.find(_RESERVED)  # another sequence's reservation, the lowest
            if block >= 0:
                self._unreserve(block)
        if block < 0:  # evict the least recently used cached prefix block
            block, _ = self._cached_free.popitem(last=False)
            old = self._block_hash[block]
            if old is not None and self._hash_to_block.get(old) == block:
                del self._hash_to_block[old]
            self._block_hash[block] = None
        self._state[block] = _USED
        self._num_used += 1
        self._ref_count[block] = 1
        return block

    def _next_reserved(self, seq: Sequence) -> int | None:
        """seq's next reserved block, if it still has one (others may have taken some)."""
        run = self._reservation.get(id(seq))
        while run:
            block = run.popleft()
            if self._reserved_for.get(block) == id(seq):
                del self._reserved_for[block]
                return block
        if run is not None:
            del self._reservation[id(seq)]
        return None

    def _unreserve(self, block: int) -> None:
        del self._reserved_for[block]
        self._state[block] = _EMPTY

    def _release_reservation(self, seq: Sequence) -> None:
        for b in self._reservation.pop(id(seq), ()):
            if self._reserved_for.get(b) == id(seq):
                self._unreserve(b)

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks; tail blocks first, so they are evicted before shared prefixes."""
        for b in reversed(seq.block_table):
            self._ref_count[b] -= 1
            if self._ref_count[b] < 0:
                raise IntegrityError(f"block {b}: ref count went negative ({self._ref_count[b]})")
            if self._ref_count[b] == 0:
                self._release(b)
        seq.block_table.clear()
        self._registered.pop(id(seq), None)
        self._release_reservation(seq)

    def _release(self, block: int) -> None:
        self._num_used -= 1
        if self._block_hash[block] is None:
            self._state[block] = _EMPTY
        else:
            self._state[block] = _CACHED
            self._cached_free[block] = None

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
        for b in self._cached_free:
            self._state[b] = _EMPTY
        self._cached_free.clear()

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
        for b in range(self.num_blocks):
            state = self._state[b]
            name = _STATE_NAMES[state] if state < len(_STATE_NAMES) else f"invalid state {state}"
            if (self._ref_count[b] > 0) != (state == _USED):
                raise IntegrityError(f"block {b}: ref count {self._ref_count[b]} but {name}")
            if (state == _CACHED) != (b in self._cached_free):
                raise IntegrityError(f"block {b}: {name} but in_cached_free_list={b in self._cached_free}")
            if (state == _RESERVED) != (b in self._reserved_for):
                raise IntegrityError(f"block {b}: {name} but reserved_for={self._reserved_for.get(b)}")
            if state in (_EMPTY, _RESERVED) and self._block_hash[b] is not None:
                raise IntegrityError(f"block {b}: {name} but carries a prefix hash")
            if state == _CACHED and self._block_hash[b] is None:
                raise IntegrityError(f"block {b}: {name} but has no prefix hash")
        used = sum(1 for r in self._ref_count if r > 0)
        if used != self._num_used:
            raise IntegrityError(f"{used} blocks referenced but {self._num_used} counted as used")
        for h, b in self._hash_to_block.items():
            if self._block_hash[b] != h:
                raise IntegrityError(f"prefix cache maps a hash to block {b}, which holds another hash")
        hashed = sum(1 for h in self._block_hash if h is not None)
        if hashed != len(self._hash_to_block):
            raise IntegrityError(f"{hashed} blocks carry a hash; prefix cache has {len(self._hash_to_block)}")
