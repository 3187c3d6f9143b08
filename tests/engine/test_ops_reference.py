"""The torch reference paged ops against dense causal attention on random tensors."""

from __future__ import annotations

import torch

from engine.ops import (
    AttentionMetadata,
    TorchAttentionBackend,
    kv_cache_shape,
    paged_decode_attention,
    paged_prefill_attention,
    write_kv_cache,
)


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int, scale: float) -> torch.Tensor:
    """q [n, H, D], k/v [L, KV, D]; query i sits at absolute position offset + i."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("nhd,lhd->hnl", q, k) * scale
    mask = torch.arange(k.shape[0])[None, :] > (torch.arange(q.shape[0]) + offset)[:, None]
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("hnl,lhd->nhd", probs, v)


def _setup(lens: list[int], block_size: int = 4, kv: int = 2, heads: int = 4, dim: int = 8):
    torch.manual_seed(0)
    num_blocks = sum((n + block_size - 1) // block_size for n in lens) + 3
    kc = torch.zeros(kv_cache_shape(num_blocks, block_size, kv, dim))
    vc = torch.zeros_like(kc)
    perm = torch.randperm(num_blocks).tolist()  # scattered, non-contiguous blocks
    tables, keys, vals = [], [], []
    for n in lens:
        nb = (n + block_size - 1) // block_size
        table, perm = perm[:nb], perm[nb:]
        k, v = torch.randn(n, kv, dim), torch.randn(n, kv, dim)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(n)])
        write_kv_cache(k, v, kc, vc, slots)
        tables.append(table)
        keys.append(k)
        vals.append(v)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return kc, vc, bt, keys, vals, heads, dim


def test_write_kv_cache_skips_negative_slots() -> None:
    kc = torch.zeros(kv_cache_shape(2, 2, 2, 3))  # [KV=2, N=2, B=2, D=3]
    vc = torch.zeros_like(kc)
    k = torch.ones(2, 2, 3)
    k[:, 1] = 5
    write_kv_cache(k, k * 2, kc, vc, torch.tensor([3, -1]))
    assert kc[0, 1, 1].eq(1).all() and kc[1, 1, 1].eq(5).all() and kc.sum() == 18  # slot 3 = block 1, offset 1
    assert vc[0, 1, 1].eq(2).all() and vc.sum() == 36


def test_decode_matches_dense() -> None:
    lens = [5, 9, 1, 16]
    kc, vc, bt, keys, vals, heads, dim = _setup(lens)
    q = torch.randn(len(lens), heads, dim)
    out = paged_decode_attention(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32), max(lens), 0.3)
    for i, n in enumerate(lens):
        ref = _dense(q[i : i + 1], keys[i], vals[i], n - 1, 0.3)
        torch.testing.assert_close(out[i : i + 1], ref, rtol=1e-5, atol=1e-5)


def test_prefill_over_cached_prefix_matches_dense() -> None:
    lens = [7, 12, 3]
    new = [3, 12, 1]  # tokens of each sequence that are "new" this step
    kc, vc, bt, keys, vals, heads, dim = _setup(lens)
    starts = [0]
    for n in new:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], heads, dim)
    out = paged_prefill_attention(q, kc, vc, bt, starts, lens, 0.25)
    for i, (n, m) in enumerate(zip(lens, new, strict=True)):
        ref = _dense(q[starts[i] : starts[i + 1]], keys[i], vals[i], n - m, 0.25)
        torch.testing.assert_close(out[starts[i] : starts[i + 1]], ref, rtol=1e-5, atol=1e-5)


def test_prefill_fast_path_equals_gather() -> None:
    """A chunk with no cached prefix may attend to its own K/V directly: same result as the gather."""
    lens = [7, 12]
    kc, vc, bt, keys, vals, heads, dim = _setup(lens)
    starts = [0, 7, 19]
    q = torch.randn(19, heads, dim)
    key, value = torch.cat(keys), torch.cat(vals)
    fast = paged_prefill_attention(q, kc, vc, bt, starts, lens, 0.25, key=key, value=value)
    slow = paged_prefill_attention(q, kc, vc, bt, starts, lens, 0.25)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_backend_decode_buckets_equal_one_batch() -> None:
    """Length buckets (slices of decodes sorted by length) give the same result as one padded batch."""
    lens = [1, 3, 5, 9, 16, 17]
    kc, vc, bt, keys, _, heads, dim = _setup(lens)
    q = torch.randn(len(lens), heads, dim)
    kv = keys[0].shape[1]
    empty = torch.zeros(0, kv, dim)
    sl = torch.tensor(lens, dtype=torch.int32)

    def meta(buckets: list[tuple[int, int, int]]) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=torch.zeros(0, dtype=torch.int64), num_decode_tokens=len(lens), decode_seq_lens=sl,
            decode_block_tables=bt, prefill_query_start_loc=torch.zeros(1, dtype=torch.int32),
            prefill_seq_lens=torch.zeros(0, dtype=torch.int32), prefill_block_tables=torch.zeros(0, 1),
            prefill_query_start_loc_host=[0], prefill_seq_lens_host=[], decode_max_seq_len=max(lens),
            decode_buckets=buckets,
        )

    backend = TorchAttentionBackend()
    one = backend.forward(q, empty, empty, kc, vc, meta([]), 0.3)
    split = backend.forward(q, empty, empty, kc, vc, meta([(0, 3, 5), (3, 5, 16), (5, 6, 17)]), 0.3)
    torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-5)
    ref = paged_decode_attention(q, kc, vc, bt, sl, max(lens), 0.3)
    torch.testing.assert_close(one, ref)
