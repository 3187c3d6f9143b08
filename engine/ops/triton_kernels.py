"""Triton kernels over the paged KV cache (layout: [num_kv_heads, num_blocks, block_size, head_dim]).

Checked against engine.ops.reference under TRITON_INTERPRET=1. head_dim is padded to a power of
two >= 16 (HEAD_PAD) with masks, so that `tl.dot` applies. Keys are processed in tiles of TILE_N
tokens; each token's page is looked up in the block table, so the tile need not equal the page
size (a 64-token tile over 16-token pages reads four pages per iteration).

`stride_bt` (the block-table width) changes from step to step and is not specialised on: Triton
would otherwise compile another variant whenever the width turns divisible by 16 or equal to 1,
in the middle of a timed run.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def write_kv_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,  # strides of key/value [T, KV, D] (unit stride in D)
    stride_ch,  # cache stride between kv heads: num_blocks * block_size * head_dim
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
):
    """One program = (token, kv head); slot < 0 is padding and writes nothing."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        d = tl.arange(0, HEAD_PAD)
        mask = d < HEAD_DIM
        k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
        dst = h.to(tl.int64) * stride_ch + slot * HEAD_DIM + d
        tl.store(key_cache_ptr + dst, k, mask=mask)
        tl.store(value_cache_ptr + dst, v, mask=mask)


@triton.jit(do_not_specialize=["stride_bt"])
def decode_split_kernel(
    q_ptr, key_cache_ptr, value_cache_ptr, block_table_ptr, seq_lens_ptr,
    out_ptr, m_ptr, l_ptr,  # partials: out [S, KV, SPLITS, G_PAD, HEAD_PAD], m/l [S, KV, SPLITS, G_PAD]
    scale, stride_qs, stride_bt, stride_ch,
    NUM_KV: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, SPLITS: tl.constexpr,
    TILE_N: tl.constexpr,
):
    """One program = (sequence, kv head, split): the GROUP query heads sharing that kv head (padded
    to G_PAD rows for tl.dot) read each K/V tile once (GQA-aware); the context is split into
    SPLITS ranges of whole tiles, sized per sequence from its own length (split-K, combined by the
    caller). Sizing inside the kernel keeps the launch independent of the batch's lengths, so the
    same launch can be replayed from a CUDA graph."""
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + s)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, HEAD_PAD)
    n = tl.arange(0, TILE_N)
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + s * stride_qs + (kvh * GROUP + g)[:, None] * HEAD_DIM + d[None, :],
                mask=(g < GROUP)[:, None] & d_mask[None, :], other=0.0)  # [G_PAD, HEAD_PAD]
    q = (q.to(tl.float32) * scale).to(key_cache_ptr.dtype.element_ty)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, HEAD_PAD], tl.float32)
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len, SPLITS), TILE_N) * TILE_N
    first = split * tokens_per_split
    last = tl.minimum(first + tokens_per_split, seq_len)
    head_base = kvh.to(tl.int64) * stride_ch
    for start in range(first, last, TILE_N):
        pos = start + n
        valid = pos < last
        block = tl.load(block_table_ptr + s * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        offs = head_base + (block * BLOCK_SIZE + pos % BLOCK_SIZE)[:, None] * HEAD_DIM + d[None, :]
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(key_cache_ptr + offs, mask=kv_mask, other=0.0)  # [TILE_N, HEAD_PAD]
        v = tl.load(value_cache_ptr + offs, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")  # [G_PAD, TILE_N] fp32
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    part = (s * NUM_KV + kvh) * SPLITS + split
    tl.store(out_ptr + (part * G_PAD + g)[:, None] * HEAD_PAD + d[None, :], acc)
    tl.store(m_ptr + part * G_PAD + g, m_i)
    tl.store(l_ptr + part * G_PAD + g, l_i)


@triton.jit(do_not_specialize=["stride_bt"])
def prefill_kernel(
    q_ptr, key_cache_ptr, value_cache_ptr, block_table_ptr, query_start_ptr, seq_lens_ptr, out_ptr,
    scale, stride_qt, stride_ot, stride_bt, stride_ch,
    NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
):
    """One program = (prefill sequence, query head, tile of BLOCK_M new tokens). Keys come from
    the cache (cached prefix + this chunk, already written), TILE_N tokens at a time, causally
    masked; the loop stops at the tile's last query position."""
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
        n = tl.arange(0, TILE_N)
        m_mask = m_off < q_len
        d_mask = d < HEAD_DIM
        q = tl.load(q_ptr + (q_start + m_off)[:, None] * stride_qt + h * HEAD_DIM + d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [M, HEAD_PAD]
        q = (q.to(tl.float32) * scale).to(key_cache_ptr.dtype.element_ty)
        q_pos = prefix + m_off
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
        last_pos = tl.minimum(prefix + (tile + 1) * BLOCK_M, seq_len)  # causal: no key beyond this
        head_base = kvh.to(tl.int64) * stride_ch
        for start in range(0, last_pos, TILE_N):
            k_pos = start + n
            in_ctx = k_pos < last_pos
            block = tl.load(block_table_ptr + s * stride_bt + k_pos // BLOCK_SIZE, mask=in_ctx, other=0).to(tl.int64)
            offs = head_base + (block * BLOCK_SIZE + k_pos % BLOCK_SIZE)[:, None] * HEAD_DIM + d[None, :]
            kv_mask = in_ctx[:, None] & d_mask[None, :]
            k = tl.load(key_cache_ptr + offs, mask=kv_mask, other=0.0)  # [TILE_N, HEAD_PAD]
            v = tl.load(value_cache_ptr + offs, mask=kv_mask, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")  # [M, TILE_N] fp32
            allowed = (k_pos[None, :] <= q_pos[:, None]) & in_ctx[None, :]
            scores = tl.where(allowed, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + (q_start + m_off)[:, None] * stride_ot + h * HEAD_DIM + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@triton.jit
def decode_combine_kernel(
    part_ptr, m_ptr, l_ptr,  # decode_split_kernel's partials
    out_ptr, stride_os,  # out [S, H, D] in the query's dtype (unit stride in D, heads HEAD_DIM apart)
    NUM_KV: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr, SPLITS: tl.constexpr,
):
    """One program = (sequence, kv head): merges the SPLITS partial softmaxes of its GROUP query
    heads (weights e^(m_split - m_max); an empty split has m = -inf, l = 0 and weighs 0) and writes
    the normalised rows in the output dtype: one launch instead of a chain of torch ops."""
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, HEAD_PAD)
    base = (s * NUM_KV + kvh) * SPLITS
    m_max = tl.full([G_PAD], float("-inf"), tl.float32)
    for i in tl.static_range(SPLITS):
        m_max = tl.maximum(m_max, tl.load(m_ptr + (base + i) * G_PAD + g))
    total = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, HEAD_PAD], tl.float32)
    for i in tl.static_range(SPLITS):
        m = tl.load(m_ptr + (base + i) * G_PAD + g)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
        total += tl.load(l_ptr + (base + i) * G_PAD + g) * w
        acc += tl.load(part_ptr + ((base + i) * G_PAD + g)[:, None] * HEAD_PAD + d[None, :]) * w[:, None]
    res = acc / total[:, None]
    mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    dst = out_ptr + s.to(tl.int64) * stride_os + (kvh * GROUP + g)[:, None] * HEAD_DIM + d[None, :]
    tl.store(dst, res.to(out_ptr.dtype.element_ty), mask=mask)


# ---- the decoder layer's element-wise ops, one pass each, in transformers' op order and rounding --


@triton.jit
def rms_norm_kernel(
    x_ptr, add_ptr, w_ptr, out_ptr, stride_x, stride_a, stride_o, n_cols, eps,
    HAS_ADD: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program = one row. With HAS_ADD, x += add first (stored back: the residual stream).
    Then weight * (x * rsqrt(mean(x^2) + eps)) with the normalised row rounded to x's dtype before
    the weight multiplies it, as transformers' LlamaRMSNorm does."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_ADD:
        a = tl.load(add_ptr + row * stride_a + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + a.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + row * stride_x + cols, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / n_cols
    h = (h * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * h).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def silu_and_mul_kernel(gate_up_ptr, out_ptr, stride_g, stride_o, size, BLOCK: tl.constexpr):
    """One program = BLOCK columns of one row: silu(gate) rounded to the dtype, times up."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < size
    gate = tl.load(gate_up_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_g + size + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, stride_ct, stride_st,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):
    """One program = (token, head), in place: x * cos + roll(x, D/2) * sin_signed (sin with its
    first half negated, RotaryEmbedding.cos_sin), each product rounded to x's dtype as in torch."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    i = tl.arange(0, HALF_PAD)
    mask = i < HALF
    base = x_ptr + t * stride_xt + h * stride_xh
    dt = x_ptr.dtype.element_ty
    # products in fp32 are exact for bf16 / fp16 operands: rounding them once gives the dtype's own
    x1 = tl.load(base + i, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + i, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + t * stride_ct + i, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + i, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_st + i, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_st + HALF + i, mask=mask, other=0.0).to(tl.float32)
    y1 = (x1 * c1).to(dt).to(tl.float32) + (x2 * s1).to(dt).to(tl.float32)
    y2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    tl.store(base + i, y1.to(dt), mask=mask)
    tl.store(base + HALF + i, y2.to(dt), mask=mask)
