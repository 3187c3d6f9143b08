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


def test_tiny_model_same_greedy_with_triton_backend(tmp_path, engine_model_dir) -> None:  # type: ignore[no-untyped-def]
    """Whole engine (chunked prefill + decode + prefix cache) with both backends on a tiny model."""
    import shutil

    transformers = pytest.importorskip("transformers")
    from engine import LLM, SamplingParams

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    shutil.copy(engine_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    prompts = [[1, 5, 9, 33, 2, 7, 7, 8, 100, 3, 4], [1, 5, 9, 33, 2, 7, 7, 8, 50], [77]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(model=tmp_path, attention_backend=backend, block_size=4, max_num_batched_tokens=7,
                  check_integrity=True)
        assert llm.engine.runner.model.backend.name == backend
        outs[backend] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outs["triton"] == outs["torch"]
