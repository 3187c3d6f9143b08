"""The compiled CPU kernels (engine._cpu_kernels) against the torch reference.

`make install` always builds them, so a missing extension fails here instead of silently
leaving every node on the slower reference path.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.ops import cpu_native, reference
from engine.ops.backend import CpuAttentionBackend, get_backend


def _paged(lens: list[int], block_size: int, kv: int, dim: int, dtype: torch.dtype, seed: int = 0):
    """Random caches with every sequence's pages scattered over the cache (a shuffled block order)."""
    gen = torch.Generator().manual_seed(seed)
    nb = sum((n + block_size - 1) // block_size for n in lens) + 3
    kc = torch.randn(kv, nb, block_size, dim, generator=gen).to(dtype)
    vc = torch.randn(kv, nb, block_size, dim, generator=gen).to(dtype)
    perm = torch.randperm(nb, generator=gen).tolist()
    tables = []
    for n in lens:
        k = (n + block_size - 1) // block_size
        tables.append(perm[:k])
        perm = perm[k:]
    width = max(len(t) for t in tables) + 1  # one unused column, as the engine pads tables
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return kc, vc, bt


def test_the_kernels_are_built() -> None:
    assert cpu_native.available(), cpu_native.reason()
    assert isinstance(get_backend(torch.device("cpu")), CpuAttentionBackend)


@pytest.mark.parametrize(
    ("block_size", "heads", "kv", "dim", "lens"),
    [
        (16, 9, 3, 64, [1, 15, 16, 17, 200]),  # SmolLM2's heads; page boundaries
        (4, 8, 2, 128, [3, 64, 1, 31]),  # Llama-3-8B's head size, GQA 4
        (1, 4, 4, 16, [1, 2, 9]),  # MHA, one token per page
        (32, 32, 8, 128, [1000, 33]),  # a long context
        (16, 2, 2, 64, [40, 16, 1]),  # G = 1 ...
        (8, 4, 2, 64, [23, 9]),  # ... and 2 on the single-pass kernel
        (16, 14, 2, 64, [37, 120]),  # G = 7: the two-pass kernel
        (8, 6, 2, 32, [5, 70]),  # a head size without a specialised kernel
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_reference(block_size, heads, kv, dim, lens, dtype) -> None:  # type: ignore[no-untyped-def]
    kc, vc, bt = _paged(lens, block_size, kv, dim, dtype)
    base = torch.randn(len(lens), heads + 3, dim).to(dtype)
    q = base[:, 1 : heads + 1]  # strided rows, as a slice of a fused projection
    sl = torch.tensor(lens, dtype=torch.int32)
    out = torch.full((len(lens), heads, dim), float("nan"), dtype=dtype)  # poisoned: every element is written
    cpu_native._native.paged_decode_attention(out, q, kc, vc, bt, sl, 0.125)
    # the oracle runs in fp32 on the same (possibly bf16-rounded) inputs
    ref = reference.paged_decode_attention(q.float(), kc.float(), vc.float(), bt, sl, max(lens), 0.125)
    assert not out.isnan().any()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding (2^-8 relative)
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("block_size", "heads", "kv", "dim", "chunks"),
    [  # chunks: (context length after the chunk, new tokens in it) per sequence
        (16, 9, 3, 64, [(200, 200), (17, 17), (1, 1), (90, 30), (300, 5)]),  # SmolLM2: 21-token tiles
        (16, 8, 8, 64, [(130, 130), (70, 64), (65, 1)]),  # MHA: 64-token tiles
        (4, 32, 8, 128, [(50, 50), (37, 12)]),  # Llama-3-8B's heads, GQA 4, small pages
        (1, 14, 2, 64, [(40, 40), (23, 9)]),  # G = 7 (63-row tiles), one token per page
        (32, 16, 2, 16, [(100, 77), (33, 33)]),  # G = 8, a small head size, long pages
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_matches_reference(block_size, heads, kv, dim, chunks, dtype) -> None:  # type: ignore[no-untyped-def]
    lens = [ctx for ctx, _ in chunks]
    kc, vc, bt = _paged(lens, block_size, kv, dim, dtype, seed=4)
    starts = [0]
    for _, new in chunks:
        starts.append(starts[-1] + new)
    base = torch.randn(starts[-1], heads + 2, dim).to(dtype)
    q = base[:, 2:]  # strided rows
    out = torch.full((starts[-1], heads, dim), float("nan"), dtype=dtype)  # poisoned
    cpu_native._native.paged_prefill_attention(
        out, q, kc, vc, bt, torch.tensor(starts, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32), 0.125
    )
    ref = reference.paged_prefill_attention(q.float(), kc.float(), vc.float(), bt, starts, lens, 0.125)
    assert not out.isnan().any()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_prefill_bad_input_is_a_clear_error() -> None:
    kc, vc, bt = _paged([5, 9], 4, 2, 16, torch.float32)
    q, out = torch.randn(6, 4, 16), torch.empty(6, 4, 16)
    starts, lens = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([5, 9], dtype=torch.int32)
    run = cpu_native._native.paged_prefill_attention
    run(out, q, kc, vc, bt, starts, lens, 1.0)  # valid
    with pytest.raises(RuntimeError, match="block id is outside the cache"):
        run(out, q, kc, vc, torch.full_like(bt, 10_000), starts, lens, 1.0)
    with pytest.raises(RuntimeError, match="chunk is longer than its context"):
        run(out, q, kc, vc, bt, starts, torch.tensor([1, 9], dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="from 0 to the number of query tokens"):
        run(out, q, kc, vc, bt, torch.tensor([0, 2, 5], dtype=torch.int32), lens, 1.0)
    with pytest.raises(RuntimeError, match=r"context length is outside \[1, pages \* block_size\]"):
        run(out, q, kc, vc, bt, starts, torch.tensor([5, 90], dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match=r"query_start_loc must be a contiguous \[P \+ 1\] int32"):
        run(out, q, kc, vc, bt, starts[:2], lens, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    fused = torch.randn(6, 2 * 3 * 16 + 5).to(dtype)  # [T, k | v | extra]: strided K and V views
    k, v = fused[:, :48].view(6, 3, 16), fused[:, 48:96].view(6, 3, 16)
    slots = torch.tensor([0, 7, -1, 3, 12, 15])
    caches = [torch.zeros(3, 4, 4, 16, dtype=dtype) for _ in range(4)]  # [KV, N, B, D]
    reference.write_kv_cache(k, v, caches[0], caches[1], slots)
    cpu_native.write_kv_cache(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])


def test_bad_input_is_a_clear_error_not_a_crash() -> None:
    kc, vc, bt = _paged([5, 9], 4, 2, 16, torch.float32)
    q = torch.randn(2, 4, 16)
    lens = torch.tensor([5, 9], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="block id is outside the cache"):
        cpu_native.paged_decode_attention(q, kc, vc, torch.full_like(bt, 10_000), lens, 1.0)
    with pytest.raises(RuntimeError, match=r"context length is outside \[1, pages \* block_size\]"):
        cpu_native.paged_decode_attention(q, kc, vc, bt, torch.tensor([0, 9], dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpu_native.paged_decode_attention(q.half(), kc.half(), vc.half(), bt, lens, 1.0)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_native.paged_decode_attention(q[..., :8], kc[..., :8].contiguous(), vc[..., :8].contiguous(), bt, lens, 1.0)
    with pytest.raises(RuntimeError, match="share one dtype"):
        cpu_native.paged_decode_attention(q, kc.bfloat16(), vc.bfloat16(), bt, lens, 1.0)
    with pytest.raises(RuntimeError, match="slot is outside the cache"):
        cpu_native.write_kv_cache(torch.randn(1, 2, 16), torch.randn(1, 2, 16), kc, vc, torch.tensor([10_000]))
    # what the kernels do not take, the backend hands to the reference
    assert not cpu_native.supports(q.half(), kc.half()) and not cpu_native.supports(q[..., :8], kc)


def test_backend_choice_and_config() -> None:
    assert get_backend(torch.device("cpu"), "torch").name == "torch"
    assert get_backend(torch.device("cpu"), "cpu").name == "cpu"
    with pytest.raises(ValueError, match="runs on the CPU only"):
        get_backend(torch.device("cuda"), "cpu")
    with pytest.raises(ValueError, match="'auto', 'cpu', 'torch' or 'triton'"):
        EngineConfig(model="m", attention_backend="native")


def test_real_model_same_tokens_with_either_cpu_backend(engine_model_dir) -> None:  # type: ignore[no-untyped-def]
    """Chunked prefill over a cached prefix, prefix-cache hits and mixed decode/prefill steps: the
    compiled kernels give the reference's greedy tokens (fp32) and logprobs within 1e-4."""
    shared = "You are a careful assistant. Answer in one sentence. " * 6
    prompts = [shared + "What is the capital of France?", shared + "Name a large ocean.", "Count: 1 2 3",
               "The quick brown fox"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    results = {}
    for backend in ("torch", "cpu"):
        llm = LLM(model=engine_model_dir, attention_backend=backend, max_num_batched_tokens=48,
                  check_integrity=True, num_threads=1)
        assert llm.engine.runner.model.backend.name == backend
        results[backend] = llm.generate(prompts, params)
    for ref, got in zip(results["torch"], results["cpu"], strict=True):
        assert got.token_ids == ref.token_ids
        assert ref.logprobs and got.logprobs and len(got.logprobs) == len(ref.logprobs) == 24
        for token, a, b in zip(ref.token_ids, ref.logprobs, got.logprobs, strict=True):
            assert abs(a[token] - b[token]) < 1e-4, (token, a, b)


def _torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [576, 100, 48])  # even and odd vector counts, a tail
def test_rms_norm_matches_torch_ops(dtype: torch.dtype, hidden: int) -> None:
    torch.manual_seed(1)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    wide = torch.randn(7, hidden + 9).to(dtype)
    x = wide[:, 3 : hidden + 3]  # strided rows
    weight = torch.randn(hidden).to(dtype)
    torch.testing.assert_close(cpu_native.rms_norm(x, weight, 1e-5).float(),
                               _torch_rms_norm(x, weight, 1e-5).float(), rtol=tol, atol=tol)
    # with `add`: the residual stream is updated in place, and the sum is normalised
    residual, add = torch.randn(7, hidden).to(dtype), torch.randn(7, hidden).to(dtype)
    expected_sum = residual + add
    out = cpu_native.rms_norm(residual, weight, 1e-5, add=add)
    assert torch.equal(residual, expected_sum)
    torch.testing.assert_close(out.float(), _torch_rms_norm(expected_sum, weight, 1e-5).float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [1536, 37])  # a multiple of 16, and a tail
def test_silu_and_mul_matches_torch_ops(dtype: torch.dtype, size: int) -> None:
    torch.manual_seed(2)
    wide = (torch.randn(5, 2 * size + 4) * 6).to(dtype)
    wide[0, :8] = torch.tensor([-100.0, 100.0, -88.0, 89.0, 0.0, -0.0, 1e-30, -1e-30]).to(dtype)  # no overflow
    gate_up = wide[:, 2 : 2 * size + 2]
    got = cpu_native.silu_and_mul(gate_up)
    gate, up = gate_up.float().split(size, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.shape == (5, size) and not got.isnan().any()
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_in_place_matches_torch_ops(dtype: torch.dtype) -> None:
    from engine.model.config import RopeConfig
    from engine.model.rope import RotaryEmbedding

    torch.manual_seed(3)
    rope = RotaryEmbedding(RopeConfig(theta=10000.0), 64, 512)
    positions = torch.tensor([0, 5, 511, 17])
    cos, sin = rope.cos_sin(positions, dtype)
    qkv = torch.randn(4, (9 + 3 + 3) * 64).to(dtype)
    qk = qkv[:, : 12 * 64].view(4, 12, 64)  # q and k heads, strided rows as in the model
    expected = RotaryEmbedding.rotate(qk.clone(), cos, sin)
    v_before = qkv[:, 12 * 64 :].clone()
    assert cpu_native.rotate_(qk, cos, sin)  # in place
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(qk.float(), expected.float(), rtol=tol, atol=tol)
    assert torch.equal(qkv[:, 12 * 64 :], v_before)  # v untouched


def test_fused_ops_fall_back_to_torch_for_other_dtypes_and_refuse_bad_shapes() -> None:
    x = torch.randn(3, 32).half()
    torch.testing.assert_close(cpu_native.rms_norm(x, torch.ones(32).half(), 1e-6),
                               _torch_rms_norm(x, torch.ones(32).half(), 1e-6))
    assert cpu_native.silu_and_mul(torch.randn(3, 8).half()).shape == (3, 4)
    assert not cpu_native.rotate_(torch.randn(3, 2, 8).half(), torch.ones(3, 1, 8).half(), torch.ones(3, 1, 8).half())
    with pytest.raises(RuntimeError, match=r"out, x and weight must be \[T, H\], \[T, H\] and \[H\]"):
        cpu_native._native.rms_norm(torch.empty(3, 32), torch.randn(3, 32), None, torch.ones(31), 1e-6)
    with pytest.raises(RuntimeError, match=r"contiguous \[T, I\] for gate_up \[T, 2 I\]"):
        cpu_native._native.silu_and_mul(torch.empty(3, 5), torch.randn(3, 8))
    with pytest.raises(RuntimeError, match=r"cos and sin must be contiguous \[T, D\]"):
        cpu_native._native.rotary_(torch.randn(3, 2, 8), torch.randn(2, 8), torch.randn(2, 8))


@pytest.mark.parametrize("vocab", [49152, 37, 5, 1])
def test_argmax_matches_torch_including_ties_nan_and_banned_rows(vocab: int) -> None:
    torch.manual_seed(5)
    wide = torch.randn(7, vocab + 3)
    logits = wide[:, 1 : vocab + 1]  # strided rows
    logits[1] = torch.randint(0, 3, (vocab,)).float()  # many ties: the first maximum wins
    logits[2] = float("-inf")  # every token banned
    logits[3, vocab // 2] = float("nan")  # a NaN counts as the maximum
    logits[4, -1] = float("nan")  # ... in the tail too
    logits[4, 0] = float("nan")  # ... and the first NaN is the answer
    logits[5, -1] = 1e30  # the maximum in the tail
    assert torch.equal(cpu_native.argmax(logits), logits.argmax(dim=-1))
    assert torch.equal(cpu_native.argmax(logits.double()), logits.double().argmax(dim=-1))  # torch's path
