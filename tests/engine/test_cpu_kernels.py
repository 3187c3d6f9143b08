"""The compiled CPU kernels (engine._cpu_kernels) against the torch reference.

`make install` always builds them, so a missing extension fails here instead of silently
leaving every node on the slower reference path.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, EngineConfig, SamplingParams
from engine.ops import cpu_native, reference
from engine.ops.backend import CpuAttentionBackend, TorchAttentionBackend, get_backend


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
    assert isinstance(TorchAttentionBackend(), TorchAttentionBackend)


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
