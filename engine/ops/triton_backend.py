"""Python wrappers launching the Triton kernels, and the Triton attention backend.

Cache layout as in engine.ops.reference: [num_kv_heads, num_blocks, block_size, head_dim].
"""

from __future__ import annotations

import itertools

import torch
import triton

from engine.ops.attention_metadata import AttentionMetadata
from engine.ops.triton_kernels import (
    decode_combine_kernel,
    decode_split_kernel,
    prefill_kernel,
    rms_norm_kernel,
    rotary_kernel,
    silu_and_mul_kernel,
    write_kv_kernel,
)


def _head_pad(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))  # tl.dot needs every dimension >= 16


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] as the kernels index it: rows may be strided (a slice of the fused qkv
    projection), heads D apart and D contiguous; anything else is copied."""
    return x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous()


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
    query = _rows(query)
    part = torch.empty(s, num_kv, splits, g_pad, d_pad, dtype=torch.float32, device=query.device)
    m = torch.empty(s, num_kv, splits, g_pad, dtype=torch.float32, device=query.device)
    lse = torch.empty_like(m)
    out = torch.empty(s, heads, dim, dtype=query.dtype, device=query.device)
    if s == 0:
        return out
    decode_split_kernel[(s, num_kv, splits)](
        query, key_cache, value_cache, block_tables, seq_lens, part, m, lse,
        scale, query.stride(0), block_tables.stride(0), key_cache.stride(0),
        NUM_KV=num_kv, GROUP=group, G_PAD=g_pad, HEAD_DIM=dim, HEAD_PAD=d_pad,
        BLOCK_SIZE=block_size, SPLITS=splits, TILE_N=tile_n,
    )
    decode_combine_kernel[(s, num_kv)](
        part, m, lse, out, out.stride(0),
        NUM_KV=num_kv, GROUP=group, G_PAD=g_pad, HEAD_DIM=dim, HEAD_PAD=d_pad, SPLITS=splits,
    )
    return out


def paged_prefill_attention(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, max_query_len: int, scale: float,
    block_m: int = 64, tile_n: int = 64,
) -> torch.Tensor:
    """query [Tp, H, D] -> [Tp, H, D]; query_start_loc [P + 1] and seq_lens [P] on device."""
    tp, heads, dim = query.shape
    p = seq_lens.shape[0]
    query = _rows(query)
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


# ---- the decoder layer's element-wise ops on CUDA (engine.ops.layer_ops picks them) --------------


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, add: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as cpu_native.rms_norm for x [T, H] (x's rows updated in place with `add`)."""
    if x.stride(-1) != 1:
        raise ValueError("rms_norm: x's last dimension must be contiguous (it is updated in place)")
    t, n = x.shape
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    a = x if add is None else _row_major(add)
    block = triton.next_power_of_2(n)
    rms_norm_kernel[(t,)](
        x, a, weight, out, x.stride(0), a.stride(0), out.stride(0), n, eps,
        HAS_ADD=add is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )
    return out


def silu_and_mul(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """gate_up [T, 2 I] -> silu(gate) * up [T, I]."""
    gate_up = _row_major(gate_up)
    t, size = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((t, size), dtype=gate_up.dtype, device=gate_up.device)
    if t:
        silu_and_mul_kernel[(t, triton.cdiv(size, block))](gate_up, out, gate_up.stride(0), out.stride(0), size,
                                                           BLOCK=block)
    return out


def rotate_(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> bool:
    """Rotate x [T, heads, D] in place by cos / sin_signed [T, 1, D]; False (nothing done) when x's
    layout or dtypes do not suit the kernel."""
    t, heads, dim = x.shape
    if x.stride(2) != 1 or dim % 2 or cos.dtype != x.dtype or sin_signed.dtype != x.dtype:
        return False
    cos, sin_signed = _row_major(cos.reshape(t, dim)), _row_major(sin_signed.reshape(t, dim))
    if t:
        rotary_kernel[(t, heads)](x, cos, sin_signed, x.stride(0), x.stride(1), cos.stride(0), sin_signed.stride(0),
                                  HALF=dim // 2, HALF_PAD=triton.next_power_of_2(dim // 2))
    return True


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
