"""Per-step attention metadata for a flattened batch: decodes first, then prefill chunks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """Describes how the T flattened tokens of one step map onto sequences and KV blocks.

    Tokens [0, num_decode_tokens) are decodes (one token each, one per decode sequence); tokens
    [num_decode_tokens, T) are prefill chunks, concatenated in the order of the prefill sequences.
    Every sequence's new K/V is written to the cache (slot_mapping) before attention reads it, so
    attention always runs over the cache: cached prefix + the new tokens.
    """

    slot_mapping: torch.Tensor  # [T] int64, flat slot = block_id * block_size + offset
    num_decode_tokens: int
    decode_seq_lens: torch.Tensor  # [D] int32, context length incl. the new token
    decode_block_tables: torch.Tensor  # [D, max_blocks] int32 (padded with 0)
    prefill_query_start_loc: torch.Tensor  # [P + 1] int32, offsets into the prefill tokens
    prefill_seq_lens: torch.Tensor  # [P] int32, context length after this chunk
    prefill_block_tables: torch.Tensor  # [P, max_blocks] int32 (padded with 0)
    # host copies, so the reference path never syncs with the device
    prefill_query_start_loc_host: list[int]
    prefill_seq_lens_host: list[int]
    decode_max_seq_len: int = 0
    prefill_max_seq_len: int = 0
    # Decodes are ordered by context length; each bucket (start, end, max_seq_len) is a slice of
    # decode rows run as one padded batch by the torch path. Empty = one bucket of all decodes.
    decode_buckets: list[tuple[int, int, int]] = field(default_factory=list)
    # Values a backend derives from this metadata once per step and reuses in every layer
    # (gather indices, attention masks); owned by the backend, empty when built.
    scratch: dict[Any, Any] = field(default_factory=dict)

    def buckets(self) -> list[tuple[int, int, int]]:
        if self.decode_buckets or not self.num_decode_tokens:
            return self.decode_buckets
        return [(0, self.num_decode_tokens, self.decode_max_seq_len)]

    @property
    def num_decodes(self) -> int:
        return self.num_decode_tokens

    @property
    def num_prefills(self) -> int:
        return len(self.prefill_seq_lens_host)
