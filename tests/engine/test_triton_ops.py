"""Triton kernels against the torch reference, run by the Triton interpreter on tiny shapes."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import

import pytest
import torch

pytest.importorskip("triton")

from engine.ops import reference
from engine.ops import triton_backend as tb


def _cache(lens: list[int], block_size: int, kv: int, dim: int) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    nb = sum((n + block_size - 1) // block_size for n in lens) + 2
    kc, vc = torch.randn(kv, nb, block_size, dim), torch.randn(kv, nb, block_size, dim)  # head-major
    perm = torch.randperm(nb).tolist()
    tables = []
    for n in lens:
        k = (n + block_size - 1) // block_size
        tables.append(perm[:k])
        perm = perm[k:]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return kc, vc, bt


def test_write_kv_matches_reference() -> None:
    k, v = torch.randn(5, 2, 3), torch.randn(5, 2, 3)
    slots = torch.tensor([0, 7, -1, 3, 12])
    caches = [torch.zeros(2, 4, 4, 3) for _ in range(4)]  # [KV, N, B, D]
    reference.write_kv_cache(k, v, caches[0], caches[1], slots)
    tb.write_kv_cache(k, v, caches[2], caches[3], slots)
    torch.testing.assert_close(caches[2], caches[0])
    torch.testing.assert_close(caches[3], caches[1])


@pytest.mark.parametrize(("block_size", "heads", "kv", "dim", "splits", "tile_n"),
                         [(4, 6, 2, 8, 1, 16), (4, 6, 2, 8, 3, 16), (8, 9, 3, 12, 2, 32), (16, 4, 1, 16, None, 64)])
def test_decode_matches_reference(
    block_size: int, heads: int, kv: int, dim: int, splits: int | None, tile_n: int
) -> None:
    lens = [1, 7, 13, 50]  # 50 tokens: several tiles of 16 and pages per tile
    kc, vc, bt = _cache(lens, block_size, kv, dim)
    q = torch.randn(len(lens), heads, dim)
    sl = torch.tensor(lens, dtype=torch.int32)
    ref = reference.paged_decode_attention(q, kc, vc, bt, sl, max(lens), 0.3)
    got = tb.paged_decode_attention(q, kc, vc, bt, sl, max(lens), 0.3, num_splits=splits, tile_n=tile_n)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("block_size", "heads", "kv", "dim", "block_m"), [(4, 4, 2, 8, 16), (8, 6, 3, 12, 16)])
def test_prefill_matches_reference(block_size: int, heads: int, kv: int, dim: int, block_m: int) -> None:
    # a fresh prompt, chunks over a cached prefix (one spanning several query and key tiles), one token
    lens, new = [6, 45, 3, 20], [6, 37, 1, 2]
    kc, vc, bt = _cache(lens, block_size, kv, dim)
    starts = [0]
    for n in new:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], heads, dim)
    ref = reference.paged_prefill_attention(q, kc, vc, bt, starts, lens, 0.25)
    got = tb.paged_prefill_attention(q, kc, vc, bt, torch.tensor(starts, dtype=torch.int32),
                                     torch.tensor(lens, dtype=torch.int32), max(new), 0.25, block_m=block_m,
                                     tile_n=16)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.fixture
def bf16_dot(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter keeps bf16 values as their uint16 bit patterns and its tl.dot multiplies
    those integers (garbage results); widen bf16 operands to fp32 first, which is exact and what
    the tensor cores do (bf16 products, fp32 accumulation)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(h):  # type: ignore[no-untyped-def]
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args):  # type: ignore[no-untyped-def]
        return original(self, widen(a), widen(b), d, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def _close_bf16(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == torch.bfloat16 and not got.isnan().any()
    err = (got.float() - ref).abs().max().item()
    assert err <= 2e-2 * ref.abs().max().item(), err  # bf16: 8-bit mantissa (as tests/engine/test_triton_gpu.py)


def test_8b_shapes_in_bf16(bf16_dot: None) -> None:
    """The GPU bench's geometry (32 query heads on 8 kv heads, head_dim 128, 16-token pages, bf16):
    decode up to 2048 tokens with and without splits, the CUDA-graph launch (splits sized for the
    max length, padded rows of length 1 over a wide block table), prefill over a prefix, KV write.
    Reference: the torch ops in fp32 on the same bf16 values."""
    heads, kv, dim, bs, scale = 32, 8, 128, 16, 128**-0.5
    lens = [1, 17, 300, 2048]
    kc, vc, bt = (t if t.dtype == torch.int32 else t.bfloat16() for t in _cache(lens, bs, kv, dim))
    q = torch.randn(len(lens), heads, dim).bfloat16()
    sl = torch.tensor(lens, dtype=torch.int32)
    ref = reference.paged_decode_attention(q.float(), kc.float(), vc.float(), bt, sl, max(lens), scale)
    for splits in (None, 7):
        _close_bf16(tb.paged_decode_attention(q, kc, vc, bt, sl, max(lens), scale, num_splits=splits), ref)
    # as captured: max_seq_len = max_model_len, block table 128 wide, rows past the batch padded
    wide = torch.zeros(4, 128, dtype=torch.int32)
    wide[:2, :2] = bt[1:3, :2]
    short = torch.tensor([17, 20, 1, 1], dtype=torch.int32)
    ref = reference.paged_decode_attention(q.float(), kc.float(), vc.float(), wide, short, 20, scale)
    _close_bf16(tb.paged_decode_attention(q, kc, vc, wide, short, 2048, scale), ref)

    heads, kv = 8, 2  # prefill: fewer heads (interpreted); a fresh prompt, a chunk over a prefix, 1 token
    lens, new = [100, 300, 1], [100, 70, 1]
    kc, vc, bt = (t if t.dtype == torch.int32 else t.bfloat16() for t in _cache(lens, bs, kv, dim))
    starts = [0, 100, 170, 171]
    q = torch.randn(starts[-1], heads, dim).bfloat16()
    ref = reference.paged_prefill_attention(q.float(), kc.float(), vc.float(), bt, starts, lens, scale)
    got = tb.paged_prefill_attention(q, kc, vc, bt, torch.tensor(starts, dtype=torch.int32),
                                     torch.tensor(lens, dtype=torch.int32), max(new), scale)
    _close_bf16(got, ref)

    k, v = torch.randn(5, kv, dim).bfloat16(), torch.randn(5, kv, dim).bfloat16()
    slots = torch.tensor([0, 37, -1, 3, 4 * bs + 1])
    caches = [kc.clone(), vc.clone(), kc.clone(), vc.clone()]
    reference.write_kv_cache(k, v, caches[0], caches[1], slots)
    tb.write_kv_cache(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])


def test_decode_splits_are_powers_of_two_the_graphs_compile() -> None:
    """SPLITS is a constexpr: eager steps must only need values the CUDA-graph capture compiled."""
    from engine.worker.cuda_graphs import CAPTURE_SIZES

    captured = {tb.decode_splits(2048, bs, 8, 64) for bs in CAPTURE_SIZES if bs <= 256}
    assert captured == {1, 2, 4, 8, 16}
    eager = {tb.decode_splits(n, s, 8, 64) for n in range(1, 2049, 37) for s in range(1, 300, 7)}
    assert eager <= captured


def test_tiny_model_same_greedy_with_triton_backend(tmp_path, engine_model_dir) -> None:  # type: ignore[no-untyped-def]
    """Whole engine (chunked prefill + decode + prefix cache) with both backends on a tiny model,
    and the Triton backend through the CUDA-graph runner's padded static buffers (run eagerly)."""
    import shutil

    transformers = pytest.importorskip("transformers")
    from engine import LLM, SamplingParams
    from engine.worker.cuda_graphs import DecodeGraphRunner

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    shutil.copy(engine_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    prompts = [[1, 5, 9, 33, 2, 7, 7, 8, 100, 3, 4], [1, 5, 9, 33, 2, 7, 7, 8, 50], [77]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = {}
    for backend, graphs in (("torch", False), ("triton", False), ("triton", True)):
        llm = LLM(model=tmp_path, attention_backend=backend, block_size=4, max_num_batched_tokens=7,
                  max_num_seqs=3, check_integrity=True)
        runner = llm.engine.runner
        assert runner.model.backend.name == backend
        if graphs:
            runner.graphs = DecodeGraphRunner(runner.model, runner.kv_caches, llm.config, runner.num_blocks,
                                              runner.max_model_len, capture=False)
        outs[backend, graphs] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outs["triton", False] == outs["torch", False]
    assert outs["triton", True] == outs["torch", False]
