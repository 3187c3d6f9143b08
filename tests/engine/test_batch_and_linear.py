"""Model-free checks of step-building helpers: decode length buckets, oneDNN packed linears."""

from __future__ import annotations

import pytest
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


@pytest.mark.parametrize(("dtype", "expect_packed", "tol"), [
    (torch.float32, True, 1e-4), (torch.bfloat16, True, 2e-2), (torch.float16, False, 0.0)])
def test_packed_linears_match_nn_linear(dtype: torch.dtype, expect_packed: bool, tol: float) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 32, bias=False)).eval().to(dtype)
    x = torch.randn(7, 64).to(dtype)
    with torch.inference_mode():
        ref = model(x)
        replaced = pack_linears(model)
        got = model(x)
    if replaced == 0:  # a torch build without oneDNN (or fp16: never packed) keeps nn.Linear: still correct
        assert all(isinstance(m, nn.Linear) for m in model)
        assert not expect_packed or not torch.backends.mkldnn.is_available()
    else:
        assert expect_packed and replaced == 2 and all(isinstance(m, PackedLinear) for m in model)
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol / 10)


def test_decode_graph_padding_path_is_exact_on_cpu(engine_model_dir) -> None:  # type: ignore[no-untyped-def]
    """The CUDA-graph runner's static, padded inputs (slot -1, length 1, token 0 for rows beyond the
    batch), run eagerly on CPU: same greedy tokens as the plain path."""
    from engine import LLM, SamplingParams
    from engine.worker.cuda_graphs import DecodeGraphRunner

    prompts = [[1, 504, 3458, 282], [1, 17, 28, 3458, 29, 198, 504, 4649, 314, 690, 3045, 30, 216, 1070, 3001, 17, 9]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(model=engine_model_dir, max_model_len=64, max_num_seqs=4, check_integrity=True)
    plain = [o.token_ids for o in llm.generate(prompts, params)]
    runner = llm.engine.runner
    runner.graphs = DecodeGraphRunner(runner.model, runner.kv_caches, llm.config, runner.num_blocks,
                                      runner.max_model_len, capture=False)
    assert runner.graphs.sizes == [1, 2, 4]  # 3 decodes run padded to 4
    llm.engine.reset_prefix_cache()
    padded = [o.token_ids for o in llm.generate([*prompts, [5, 6, 7]], params)]
    assert padded[:2] == plain
