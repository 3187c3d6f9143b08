"""Python wrappers launching the Triton kernels, and the Triton attention backend.

Cache layout as in engine.ops.reference: [num_kv_heads, num_blocks, block_size, head_dim].
"""

from __future__ import annotations

import itertools

import torch
import triton

from engine.ops.attention_metadata import AttentionMetadata
from engine.ops.triton_kernels import decode_split_kernel, prefill_kernel, write_kv_kernel


def _head_pad(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))  # tl.dot needs every dimension >= 16


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Same contract as reference.write_kv_cache; key/value [T, KV, D] with unit stride in D."""
    t, kv, dim = key.shape
    if t == 0:
        return
    key, value = key.to(key_cache.dtype), value.to(value_cache.dtype)
    if key.stride(2) != 1 or value.stride(2) != 1:
        key, value = key.contiguous(), value.contiguous()
    write_kv_kernel[(t, kv)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), key_cache.stride(0),
        HEAD_DIM=dim, HEAD_PAD=triton.next_power_of_2(dim),
    )


def decode_splits(max_seq_len: int, num_seqs: int, num_kv: int, tile_n: int) -> int:
    """Enough programs to fill a GPU (~4 waves of 132 SMs), never more splits than tiles of the
    longest context (pass the model's max length when the launch is captured in a CUDA graph).

    A power of two (1, 2, 4, 8 or 16): SPLITS is a constexpr, so every distinct value is a Triton
    compile; capturing the CUDA graphs compiles all five, and eager steps then reuse them."""
    tiles = triton.cdiv(max_seq_len, tile_n)
    want = triton.cdiv(528, max(1, num_seqs * num_kv))
    n = max(1, min(16, tiles, want))
    return 1 << (n.bit_length() - 1)


def paged_decode_attention(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, max_seq_len: int, scale: float, num_splits: int | None = None, tile_n: int = 64,
) -> torch.Tensor:
    """Split-K GQA decode. query [S, H, D] -> [S, H, D]."""
    s, heads, dim = query.shape
    num_kv, block_size = key_cache.shape[0], key_cache.shape[2]
    group = heads // num_kv
    splits = num_splits or decode_splits(max_seq_len, s, num_kv, tile_n)
    g_pad, d_pad = max(16, triton.next_power_of_2(group)), _head_pad(dim)
    query = query.contiguous()
    out = torch.empty(s, num_kv, splits, g_pad, d_pad, dtype=torch.float32, device=query.device)
    m = torch.empty(s, num_kv, splits, g_pad, dtype=torch.float32, device=query.device)
    lse = torch.empty_like(m)
    decode_split_kernel[(s, num_kv, splits)](
        query, key_cache, value_cache, block_tables, seq_lens, out, m, lse,
        scale, query.stride(0), block_tables.stride(0), key_cache.stride(0),
        NUM_KV=num_kv, GROUP=group, G_PAD=g_pad, HEAD_DIM=dim, HEAD_PAD=d_pad,
        BLOCK_SIZE=block_size, SPLITS=splits, TILE_N=tile_n,
    )
    # combine splits: empty splits have m = -inf and l = 0
    m_max = m.max(dim=2, keepdim=True).values  # [S, KV, 1, G]
    weight = torch.exp(m - m_max).nan_to_num(0.0)  # [S, KV, SPLITS, G]
    total = (lse * weight).sum(dim=2)  # [S, KV, G]
    acc = (out * weight[..., None]).sum(dim=2) / total[..., None]  # [S, KV, G, D_PAD]
    return acc[:, :, :group, :dim].reshape(s, heads, dim).to(query.dtype)


def paged_prefill_attention(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, max_query_len: int, scale: float,
    block_m: int = 64, tile_n: int = 64,
) -> torch.Tensor:
    """query [Tp, H, D] -> [Tp, H, D]; query_start_loc [P + 1] and seq_lens [P] on device."""
    tp, heads, dim = query.shape
    p = seq_lens.shape[0]
    query = query.contiguous()
    out = torch.empty_like(query)
    if tp == 0:
        return out
    prefill_kernel[(p, heads, triton.cdiv(max_query_len, block_m))](
        query, key_cache, value_cache, block_tables, query_start_loc, seq_lens, out,
        scale, query.stride(0), out.stride(0), block_tables.stride(0), key_cache.stride(0),
        NUM_HEADS=heads, NUM_KV=key_cache.shape[0], HEAD_DIM=dim, HEAD_PAD=_head_pad(dim),
        BLOCK_M=block_m, BLOCK_SIZE=key_cache.shape[2], TILE_N=tile_n,
    )
    return out


class TritonAttentionBackend:
    name = "triton"

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
        value_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    ) -> torch.Tensor:
        write_kv_cache(key, value, key_cache, value_cache, meta.slot_mapping)
        nd = meta.num_decode_tokens
        if not meta.num_prefills:
            return paged_decode_attention(
                query, key_cache, value_cache, meta.decode_block_tables, meta.decode_seq_lens,
                meta.decode_max_seq_len, scale,
            )
        out = torch.empty_like(query)
        if nd:
            out[:nd] = paged_decode_attention(
                query[:nd], key_cache, value_cache, meta.decode_block_tables, meta.decode_seq_lens,
                meta.decode_max_seq_len, scale,
            )
        starts = meta.prefill_query_start_loc_host
        max_q = max(b - a for a, b in itertools.pairwise(starts))
        out[nd:] = paged_prefill_attention(
            query[nd:], key_cache, value_cache, meta.prefill_block_tables, meta.prefill_query_start_loc,
            meta.prefill_seq_lens, max_q, scale,
        )
        return out
