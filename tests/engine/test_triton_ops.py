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


@pytest.fixture
def bf16_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter converts fp32 to bf16 by truncation; the GPU (cvt.rn) and torch round to
    nearest even. Round here too, so that a kernel's bf16 results can be held to torch's."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):  # type: ignore[no-untyped-def]
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            u = src.data.astype(np.float32).view(np.uint32)
            bits = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
            return interpreter.TensorHandle(np.where(np.isnan(src.data), np.uint16(0x7FC0), bits), tl.bfloat16)
        return original(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)


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


def _ulps(dtype: torch.dtype) -> float:
    """Two rounding steps of the dtype: the kernels round where torch does, but a last-bit
    difference in rsqrt or exp can move an intermediate rounding by one step."""
    return {torch.float32: 4e-6, torch.bfloat16: 2**-6}[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_add", [False, True])
def test_rms_norm_matches_transformers_formula(dtype: torch.dtype, with_add: bool, bf16_rounding: None) -> None:
    """Rows of a wider tensor (strided, as the residual stream is not), hidden 80 (not a power of
    two: masked lanes), with and without the residual add written back in place."""
    torch.manual_seed(1)
    base = (torch.randn(5, 96) * 3).to(dtype)
    x, add = base[:, :80], (torch.randn(5, 80) * 3).to(dtype)
    weight = (torch.rand(80) + 0.5).to(dtype)
    want_x = (x + add) if with_add else x.clone()
    h = want_x.float()
    want = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)  # LlamaRMSNorm
    untouched = base[:, 80:].clone()
    got = tb.rms_norm(x, weight, 1e-5, add if with_add else None)
    assert got.dtype == dtype and got.shape == (5, 80) and not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), rtol=_ulps(dtype), atol=_ulps(dtype))
    assert torch.equal(x, want_x)  # the residual stream holds x + add (rounded to the dtype) afterwards
    assert torch.equal(base[:, 80:], untouched)  # nothing written past the row's 80 columns
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        tb.rms_norm(base.t(), weight, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_torch(dtype: torch.dtype, bf16_rounding: None) -> None:
    torch.manual_seed(2)
    gate_up = (torch.randn(7, 2 * 1100) * 4).to(dtype)  # 1100 columns: two blocks of 1024, the second masked
    gate, up = gate_up.split(1100, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    got = tb.silu_and_mul(gate_up)
    assert got.dtype == dtype and got.shape == (7, 1100)
    torch.testing.assert_close(got.float(), want.float(), rtol=_ulps(dtype), atol=_ulps(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 24])
def test_rotary_in_place_matches_rotate(dtype: torch.dtype, dim: int, bf16_rounding: None) -> None:
    """q and k heads of a fused qkv projection's output (rows strided by the v heads), rotated in
    place; the v heads are left alone. dim 24: a half of 12 lanes, masked to 16."""
    from engine.model.config import RopeConfig
    from engine.model.rope import RotaryEmbedding

    torch.manual_seed(3)
    t, heads, kv = 6, 4, 2
    rope = RotaryEmbedding(RopeConfig(theta=10000.0), dim, 64)
    cos, sin = rope.cos_sin(torch.tensor([0, 1, 5, 17, 33, 63]), dtype)
    qkv = torch.randn(t, (heads + 2 * kv) * dim).to(dtype)
    qk = qkv[:, : (heads + kv) * dim].view(t, heads + kv, dim)
    want = RotaryEmbedding.rotate(qk, cos, sin)
    v_before = qkv[:, (heads + kv) * dim :].clone()
    assert tb.rotate_(qk, cos, sin)
    torch.testing.assert_close(qk.float(), want.float(), rtol=_ulps(dtype), atol=_ulps(dtype))
    assert torch.equal(qkv[:, (heads + kv) * dim :], v_before)
    assert not tb.rotate_(qk, cos.double(), sin.double())  # mismatched dtypes: the caller's torch path


def test_decode_takes_strided_query_rows() -> None:
    """The decode query is a slice of the fused projection (rows strided, heads contiguous): read
    in place, same result as a contiguous copy."""
    lens = [3, 40]
    kc, vc, bt = _cache(lens, 8, 2, 16)
    wide = torch.randn(2, 10, 16)
    q = wide[:, :6]
    sl = torch.tensor(lens, dtype=torch.int32)
    got = tb.paged_decode_attention(q, kc, vc, bt, sl, max(lens), 0.25)
    ref = reference.paged_decode_attention(q.contiguous(), kc, vc, bt, sl, max(lens), 0.25)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_tiny_model_same_greedy_with_triton_backend(tmp_path, engine_model_dir, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Whole engine (chunked prefill + decode + prefix cache) with both backends on a tiny model,
    the Triton backend through the CUDA-graph runner's padded static buffers (run eagerly), and
    finally with the decoder layer's element-wise ops on their Triton kernels as on CUDA (the
    residual stream, the qkv slices and the rotary tables as the model passes them)."""
    import shutil

    transformers = pytest.importorskip("transformers")
    from engine import LLM, SamplingParams
    from engine.ops import layer_ops
    from engine.worker.cuda_graphs import DecodeGraphRunner

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    shutil.copy(engine_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    prompts = [[1, 5, 9, 33, 2, 7, 7, 8, 100, 3, 4], [1, 5, 9, 33, 2, 7, 7, 8, 50], [77]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = {}
    launches: list[str] = []
    for backend, graphs, fused in (("torch", False, False), ("triton", False, False), ("triton", True, False),
                                   ("triton", True, True)):
        llm = LLM(model=tmp_path, attention_backend=backend, block_size=4, max_num_batched_tokens=7,
                  max_num_seqs=3, check_integrity=True)
        runner = llm.engine.runner
        assert runner.model.backend.name == backend
        if graphs:
            runner.graphs = DecodeGraphRunner(runner.model, runner.kv_caches, llm.config, runner.num_blocks,
                                              runner.max_model_len, capture=False)
        if fused:  # route CPU tensors to the Triton kernels (interpreted), counting the launches
            monkeypatch.setattr(layer_ops, "_on_cuda", lambda x: True)
            for name in ("rms_norm", "silu_and_mul", "rotate_"):
                def counted(*args, _f=getattr(tb, name), _n=name, **kw):  # type: ignore[no-untyped-def]
                    result = _f(*args, **kw)
                    if result is not False:  # rotate_ returns False when it leaves the work to torch
                        launches.append(_n)
                    return result
                monkeypatch.setattr(tb, name, counted)
        outs[backend, graphs, fused] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outs["triton", False, False] == outs["torch", False, False]
    assert outs["triton", True, False] == outs["torch", False, False]
    assert outs["triton", True, True] == outs["torch", False, False]
    assert {"rms_norm", "silu_and_mul", "rotate_"} <= set(launches)
