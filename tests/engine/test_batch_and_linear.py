"""Model-free checks of step-building helpers: decode length buckets, oneDNN packed linears."""

from __future__ import annotations

import torch
from torch import nn

from engine.model.cpu_linear import PackedLinear, pack_linears
from engine.worker.batch import MAX_DECODE_BUCKETS, decode_buckets


def test_decode_buckets_cover_sorted_rows_and_bound_padding() -> None:
    assert decode_buckets([], 16) == []
    assert decode_buckets([100] * 64, 16) == [(0, 64, 100)]  # equal lengths: splitting only costs
    lens = sorted([17 + 9 * i for i in range(64)])  # 17 .. 584
    buckets = decode_buckets(lens, 16)
    assert 1 < len(buckets) <= MAX_DECODE_BUCKETS
    assert buckets[0][0] == 0 and buckets[-1][1] == len(lens)
    for (a, b, m), nxt in zip(buckets, [*buckets[1:], None], strict=True):
        assert m == lens[b - 1] and a < b
        if nxt is not None:
            assert nxt[0] == b
    padded = sum((b - a) * -(-m // 16) * 16 for a, b, m in buckets)
    assert padded < len(lens) * -(-lens[-1] // 16) * 16 * 0.75


def test_packed_linears_match_nn_linear() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 32, bias=False)).eval()
    x = torch.randn(7, 64)
    with torch.inference_mode():
        ref = model(x)
        replaced = pack_linears(model)
        got = model(x)
    if replaced == 0:  # a torch build without oneDNN keeps nn.Linear: still correct
        assert all(isinstance(m, nn.Linear) for m in model)
    else:
        assert replaced == 2 and all(isinstance(m, PackedLinear) for m in model)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
