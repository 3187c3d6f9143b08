"""Builds the flattened input tensors and attention metadata for one scheduled step.

Batch layout: decodes (one new token each) first, ordered by context length, then prefill chunks.
Ordering decodes by length lets the torch attention path run them in a few length buckets, so a
short context is not padded to the longest one in the step.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from engine.core.scheduler import ScheduledSeq
from engine.ops.attention_metadata import AttentionMetadata

MAX_DECODE_BUCKETS = 4
BUCKET_OVERHEAD_TOKENS = 2048  # a bucket costs about as much as this many padded context tokens


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int64: the token rows whose logits are sampled
    sampled: list[ScheduledSeq]  # S entries, aligned with logits_indices
    # speculative verification: every row of each drafted chunk (its last token + drafts), in order
    spec_indices: torch.Tensor | None = None  # [sum(len(draft) + 1)] int64
    spec: list[ScheduledSeq] | None = None  # the drafted chunks, aligned with spec_indices in runs


def _padded_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max((len(t) for t in tables), default=0) or 1
    data = [t + [0] * (width - len(t)) for t in tables]
    return torch.tensor(data, dtype=torch.int32, device=device).reshape(len(tables), width)


def decode_buckets(lens: list[int], block_size: int) -> list[tuple[int, int, int]]:
    """Split ascending context lengths into <= MAX_DECODE_BUCKETS equal-count slices (start, end,
    max_len), choosing the count that minimises padded tokens + per-bucket overhead."""
    n = len(lens)
    if n == 0:
        return []

    def pad(length: int) -> int:
        return -(-length // block_size) * block_size

    best: list[tuple[int, int, int]] = [(0, n, lens[-1])]
    best_cost = n * pad(lens[-1]) + BUCKET_OVERHEAD_TOKENS
    for k in range(2, min(MAX_DECODE_BUCKETS, n) + 1):
        bounds = [round(i * n / k) for i in range(k + 1)]
        parts = [(a, b, lens[b - 1]) for a, b in itertools.pairwise(bounds) if b > a]
        cost = sum((b - a) * pad(m) for a, b, m in parts) + k * BUCKET_OVERHEAD_TOKENS
        if cost < best_cost:
            best, best_cost = parts, cost
    return best


def build_model_input(batch: list[ScheduledSeq], block_size: int, device: torch.device) -> ModelInput:
    decodes = sorted((it for it in batch if it.num_new_tokens == 1), key=lambda it: it.seq.num_computed_tokens)
    prefills = [it for it in batch if it.num_new_tokens != 1]
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_rows: list[int] = []
    sampled: list[ScheduledSeq] = []
    dec_lens: list[int] = []
    dec_tables: list[list[int]] = []
    for item in decodes:  # a 1-token chunk attends over its whole context: decode semantics
        seq = item.seq
        pos = seq.num_computed_tokens
        table = seq.block_table
        ids.append(seq.token_at(pos))
        positions.append(pos)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        dec_lens.append(pos + 1)
        dec_tables.append(table)
        if item.samples:
            logits_rows.append(len(ids) - 1)
            sampled.append(item)
    pre_starts: list[int] = [0]
    pre_lens: list[int] = []
    pre_tables: list[list[int]] = []
    spec_rows: list[int] = []
    spec: list[ScheduledSeq] = []
    for item in prefills:  # drafted decodes too: a chunk of the last token + its drafts
        seq, n = item.seq, item.num_new_tokens
        start = seq.num_computed_tokens
        table = seq.block_table
        ids.extend(seq.token_slice(start, start + n - len(item.draft)))
        ids.extend(item.draft)
        span = range(start, start + n)
        positions.extend(span)
        slots.extend([table[p // block_size] * block_size + p % block_size for p in span])
        pre_starts.append(pre_starts[-1] + n)
        pre_lens.append(start + n)
        pre_tables.append(table)
        if item.draft:
            spec_rows.extend(range(len(ids) - n, len(ids)))
            spec.append(item)
        elif item.samples:
            logits_rows.append(len(ids) - 1)
            sampled.append(item)

    def as_long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    meta = AttentionMetadata(
        slot_mapping=as_long(slots),
        num_decode_tokens=len(decodes),
        decode_seq_lens=torch.tensor(dec_lens, dtype=torch.int32, device=device),
        decode_block_tables=_padded_tables(dec_tables, device),
        prefill_query_start_loc=torch.tensor(pre_starts, dtype=torch.int32, device=device),
        prefill_seq_lens=torch.tensor(pre_lens, dtype=torch.int32, device=device),
        prefill_block_tables=_padded_tables(pre_tables, device),
        prefill_query_start_loc_host=pre_starts,
        prefill_seq_lens_host=pre_lens,
        decode_max_seq_len=max(dec_lens, default=0),
        prefill_max_seq_len=max(pre_lens, default=0),
        decode_buckets=decode_buckets(dec_lens, block_size),
    )
    return ModelInput(as_long(ids), as_long(positions), meta, as_long(logits_rows), sampled,
                      as_long(spec_rows) if spec else None, spec or None)
