"""Builds the flattened input tensors and attention metadata for one scheduled step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.core.scheduler import ScheduledSeq
from engine.ops.attention_metadata import AttentionMetadata


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int64: the token rows whose logits are sampled
    sampled: list[ScheduledSeq]  # S entries, aligned with logits_indices


def _padded_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max((len(t) for t in tables), default=0) or 1
    data = [t + [0] * (width - len(t)) for t in tables]
    return torch.tensor(data, dtype=torch.int32, device=device).reshape(len(tables), width)


def build_model_input(batch: list[ScheduledSeq], block_size: int, device: torch.device) -> ModelInput:
    """`batch` must list decodes (num_new_tokens == 1) before prefill chunks."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_rows: list[int] = []
    sampled: list[ScheduledSeq] = []
    dec_lens: list[int] = []
    dec_tables: list[list[int]] = []
    pre_starts: list[int] = [0]
    pre_lens: list[int] = []
    pre_tables: list[list[int]] = []
    num_decode_tokens = 0
    for item in batch:
        seq, n = item.seq, item.num_new_tokens
        start = seq.num_computed_tokens
        tokens = seq.all_token_ids[start : start + n]
        table = seq.block_table
        ids.extend(tokens)
        for pos in range(start, start + n):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        if n == 1 and not pre_lens:
            num_decode_tokens += 1
            dec_lens.append(start + 1)
            dec_tables.append(table)
        else:
            pre_starts.append(pre_starts[-1] + n)
            pre_lens.append(start + n)
            pre_tables.append(table)
        if item.samples:
            logits_rows.append(len(ids) - 1)
            sampled.append(item)

    def as_long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    meta = AttentionMetadata(
        slot_mapping=as_long(slots),
        num_decode_tokens=num_decode_tokens,
        decode_seq_lens=torch.tensor(dec_lens, dtype=torch.int32, device=device),
        decode_block_tables=_padded_tables(dec_tables, device),
        prefill_query_start_loc=torch.tensor(pre_starts, dtype=torch.int32, device=device),
        prefill_seq_lens=torch.tensor(pre_lens, dtype=torch.int32, device=device),
        prefill_block_tables=_padded_tables(pre_tables, device),
        prefill_query_start_loc_host=pre_starts,
        prefill_seq_lens_host=pre_lens,
        decode_max_seq_len=max(dec_lens, default=0),
        prefill_max_seq_len=max(pre_lens, default=0),
    )
    return ModelInput(as_long(ids), as_long(positions), meta, as_long(logits_rows), sampled)
