"""Plain-torch reference attention ops over a paged KV cache; the CPU path and the test oracle.

Cache layout (per layer): key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim].
A token at absolute position p of a sequence lives in block block_table[p // block_size] at offset
p % block_size, i.e. flat slot block_table[p // block_size] * block_size + p % block_size.
"""

from __future__ import annotations

import torch


def write_kv_cache(
    key: torch.Tensor,  # [T, KV, D]
    value: torch.Tensor,  # [T, KV, D]
    key_cache: torch.Tensor,  # [N, B, KV, D]
    value_cache: torch.Tensor,  # [N, B, KV, D]
    slot_mapping: torch.Tensor,  # [T] int64; slot < 0 means "do not write" (padding)
) -> None:
    num_kv, dim = key.shape[1], key.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    key_cache.view(-1, num_kv, dim)[slots] = key[keep].to(key_cache.dtype)
    value_cache.view(-1, num_kv, dim)[slots] = value[keep].to(value_cache.dtype)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Gather the first `length` tokens of one sequence: returns [length, KV, D]."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [nb, B, KV, D]
    return blocks.reshape(-1, cache.shape[2], cache.shape[3])[:length]


def paged_prefill_attention(
    query: torch.Tensor,  # [Tp, H, D] new tokens of all prefill sequences, concatenated
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [P, max_blocks]
    query_start_loc: list[int],  # P + 1 offsets into query
    seq_lens: list[int],  # P context lengths (cached prefix + new tokens)
    scale: float,
) -> torch.Tensor:
    """Causal attention of each chunk over its cached prefix and itself. Returns [Tp, H, D]."""
    num_heads = query.shape[1]
    out = torch.empty_like(query)
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        num_new = end - start
        prefix = seq_len - num_new
        k = _gather(key_cache, block_tables[i], seq_len).to(query.dtype)  # [L, KV, D]
        v = _gather(value_cache, block_tables[i], seq_len).to(query.dtype)
        group = num_heads // k.shape[1]
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        q = query[start:end].transpose(0, 1)  # [H, n, D]
        q_pos = torch.arange(prefix, seq_len, device=query.device)[:, None]  # [n, 1]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]  # [1, L]
        mask = k_pos <= q_pos  # [n, L]
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        out[start:end] = o.transpose(0, 1)
    return out


def paged_decode_attention(
    query: torch.Tensor,  # [Dn, H, D] one new token per sequence
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [Dn, max_blocks]
    seq_lens: torch.Tensor,  # [Dn] context lengths incl. the new token
    max_seq_len: int,
    scale: float,
) -> torch.Tensor:
    """Attention of each sequence's single new token over its whole context. Returns [Dn, H, D]."""
    num_seqs, num_heads, dim = query.shape
    num_kv = key_cache.shape[2]
    block_size = key_cache.shape[1]
    num_blocks = (max_seq_len + block_size - 1) // block_size
    table = block_tables[:, :num_blocks].long()  # [Dn, nb]
    k = key_cache[table].reshape(num_seqs, -1, num_kv, dim)[:, :max_seq_len].to(query.dtype)
    v = value_cache[table].reshape(num_seqs, -1, num_kv, dim)[:, :max_seq_len].to(query.dtype)
    group = num_heads // num_kv
    q = query.view(num_seqs, num_kv, group, dim)
    scores = torch.einsum("skgd,slkd->skgl", q, k) * scale  # [Dn, KV, G, L]
    positions = torch.arange(max_seq_len, device=query.device)
    valid = positions[None, :] < seq_lens[:, None].to(positions.dtype)  # [Dn, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    out = torch.einsum("skgl,slkd->skgd", probs, v)  # [Dn, KV, G, D]
    return out.reshape(num_seqs, num_heads, dim)
