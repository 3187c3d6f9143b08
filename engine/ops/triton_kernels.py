"""Triton kernels over the paged KV cache (layout: [num_blocks, block_size, num_kv_heads, head_dim]).

Checked against engine.ops.reference under TRITON_INTERPRET=1. head_dim is padded to a power of
two (HEAD_PAD) with masks; the KV page (block_size) is the tile of keys processed per iteration.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def write_kv_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_ptr,
    stride_kt, stride_vt,  # token strides of key/value [T, KV, D] (contiguous inner dims)
    KV_DIM: tl.constexpr,  # num_kv_heads * head_dim
    KV_PAD: tl.constexpr,  # next power of two >= KV_DIM
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, KV_PAD)
        mask = offs < KV_DIM
        k = tl.load(key_ptr + t * stride_kt + offs, mask=mask)
        v = tl.load(value_ptr + t * stride_vt + offs, mask=mask)
        tl.store(key_cache_ptr + slot * KV_DIM + offs, k, mask=mask)
        tl.store(value_cache_ptr + slot * KV_DIM + offs, v, mask=mask)


@triton.jit
def decode_split_kernel(
    q_ptr, key_cache_ptr, value_cache_ptr, block_table_ptr, seq_lens_ptr,
    out_ptr, m_ptr, l_ptr,  # partials: out [S, KV, SPLITS, G_PAD, HEAD_PAD], m/l [S, KV, SPLITS, G_PAD]
    scale, stride_qs, stride_bt, max_blocks_per_split,
    NUM_KV: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, SPLITS: tl.constexpr,
):
    """One program = (sequence, kv head, split): all GROUP query heads sharing that kv head read
    each K/V page once (GQA-aware); the context is split into SPLITS ranges (split-K)."""
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + s)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, HEAD_PAD)
    j = tl.arange(0, BLOCK_SIZE)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + s * stride_qs + (kvh * GROUP + g)[:, None] * HEAD_DIM + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [G_PAD, HEAD_PAD]
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, HEAD_PAD], tl.float32)
    first = split * max_blocks_per_split
    num_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    last = tl.minimum(first + max_blocks_per_split, num_blocks)
    for b in range(first, last):
        block = tl.load(block_table_ptr + s * stride_bt + b).to(tl.int64)
        pos = b * BLOCK_SIZE + j
        valid = pos < seq_len
        base = (block * BLOCK_SIZE + j)[:, None] * (NUM_KV * HEAD_DIM) + kvh * HEAD_DIM + d[None, :]
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(key_cache_ptr + base, mask=kv_mask, other=0.0).to(tl.float32)  # [BS, HEAD_PAD]
        v = tl.load(value_cache_ptr + base, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G_PAD, BS]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    part = (s * NUM_KV + kvh) * SPLITS + split
    tl.store(out_ptr + (part * G_PAD + g)[:, None] * HEAD_PAD + d[None, :], acc)
    tl.store(m_ptr + part * G_PAD + g, m_i)
    tl.store(l_ptr + part * G_PAD + g, l_i)


@triton.jit
def prefill_kernel(
    q_ptr, key_cache_ptr, value_cache_ptr, block_table_ptr, query_start_ptr, seq_lens_ptr, out_ptr,
    scale, stride_qt, stride_ot, stride_bt,
    NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """One program = (prefill sequence, query head, tile of BLOCK_M new tokens). Keys come from
    the cache (cached prefix + this chunk, already written), one page at a time, causally masked."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(query_start_ptr + s)
    q_len = tl.load(query_start_ptr + s + 1) - q_start
    if tile * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens_ptr + s)
        prefix = seq_len - q_len
        kvh = h // (NUM_HEADS // NUM_KV)
        m_off = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_PAD)
        j = tl.arange(0, BLOCK_SIZE)
        m_mask = m_off < q_len
        d_mask = d < HEAD_DIM
        q = tl.load(q_ptr + (q_start + m_off)[:, None] * stride_qt + h * HEAD_DIM + d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [M, HEAD_PAD]
        q_pos = prefix + m_off
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
        last_pos = tl.minimum(prefix + (tile + 1) * BLOCK_M, seq_len)  # causal: no key beyond this
        for b in range(0, tl.cdiv(last_pos, BLOCK_SIZE)):
            block = tl.load(block_table_ptr + s * stride_bt + b).to(tl.int64)
            k_pos = b * BLOCK_SIZE + j
            base = (block * BLOCK_SIZE + j)[:, None] * (NUM_KV * HEAD_DIM) + kvh * HEAD_DIM + d[None, :]
            kv_mask = (k_pos < seq_len)[:, None] & d_mask[None, :]
            k = tl.load(key_cache_ptr + base, mask=kv_mask, other=0.0).to(tl.float32)  # [BS, HEAD_PAD]
            v = tl.load(value_cache_ptr + base, mask=kv_mask, other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [M, BS]
            allowed = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < seq_len)
            scores = tl.where(allowed, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + (q_start + m_off)[:, None] * stride_ot + h * HEAD_DIM + d[None, :],
                 out, mask=m_mask[:, None] & d_mask[None, :])
