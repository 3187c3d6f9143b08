"""Triton kernels and CUDA graphs on a real GPU (skipped without one).

Run in its own process (engine/gpu_check.sh does): test_triton_ops.py switches Triton to its
interpreter for the whole process. Tolerances: fp32 1e-4 (tl.dot in IEEE mode), bf16 2e-2
relative to the output scale (bf16 has an 8-bit mantissa). Outputs are poisoned with NaN
before each kernel runs, so a row a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="Triton interpreter is on"),
]

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not got.isnan().any(), "kernel left unwritten (NaN-poisoned) outputs"
    err = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item() or 1.0
    assert err <= TOL[dtype] * scale, f"max error {err:.3e} > {TOL[dtype]} x {scale:.3e}"


def _paged(lens: list[int], block_size: int, kv: int, dim: int, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    from engine.ops import kv_cache_shape

    gen = torch.Generator(device="cuda").manual_seed(len(lens) * 1000 + dim)
    nb = sum(-(-n // block_size) for n in lens) + 3
    kc = torch.randn(kv_cache_shape(nb, block_size, kv, dim), device="cuda", generator=gen).to(dtype)
    vc = torch.randn(kv_cache_shape(nb, block_size, kv, dim), device="cuda", generator=gen).to(dtype)
    perm = torch.randperm(nb, device="cuda", generator=gen).tolist()
    tables = []
    for n in lens:
        k = -(-n // block_size)
        tables.append(perm[:k])
        perm = perm[k:]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device="cuda")
    return kc, vc, bt, gen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv", "dim", "block_size"), [(32, 8, 128, 16), (9, 3, 64, 16), (14, 2, 64, 32)])
def test_decode_and_write_on_gpu(dtype: torch.dtype, heads: int, kv: int, dim: int, block_size: int) -> None:
    from engine.ops import reference
    from engine.ops import triton_backend as tb

    lens = [1, 15, 16, 17, 300, 1024, 2049]
    kc, vc, bt, gen = _paged(lens, block_size, kv, dim, dtype)
    q = torch.randn(len(lens), heads, dim, device="cuda", generator=gen).to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    ref = reference.paged_decode_attention(q, kc, vc, bt, sl, max(lens), dim**-0.5)
    for splits in (None, 1, 7):
        got = tb.paged_decode_attention(q, kc, vc, bt, sl, max(lens), dim**-0.5, num_splits=splits)
        _close(got, ref, dtype)
    # KV write: same slots through both paths, including a padding slot (-1)
    t = 9
    k, v = (torch.randn(t, kv, dim, device="cuda", generator=gen).to(dtype) for _ in range(2))
    slots = torch.randperm(kc.shape[1] * block_size, device="cuda", generator=gen)[:t]
    slots[3] = -1
    a = [kc.clone(), vc.clone()]
    b = [kc.clone(), vc.clone()]
    reference.write_kv_cache(k, v, a[0], a[1], slots)
    tb.write_kv_cache(k, v, b[0], b[1], slots)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_on_gpu(dtype: torch.dtype) -> None:
    from engine.ops import reference
    from engine.ops import triton_backend as tb

    heads, kv, dim, block_size = 32, 8, 128, 16
    lens, new = [100, 700, 33, 1], [100, 250, 1, 1]  # fresh prompt, chunk over a prefix, 1-token chunks
    kc, vc, bt, gen = _paged(lens, block_size, kv, dim, dtype)
    starts = [0]
    for n in new:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], heads, dim, device="cuda", generator=gen).to(dtype)
    ref = reference.paged_prefill_attention(q, kc, vc, bt, starts, lens, dim**-0.5)
    got = tb.paged_prefill_attention(q, kc, vc, bt, torch.tensor(starts, dtype=torch.int32, device="cuda"),
                                     torch.tensor(lens, dtype=torch.int32, device="cuda"), max(new), dim**-0.5)
    _close(got, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_ops_on_gpu_run_triton_and_match_torch(dtype: torch.dtype) -> None:
    """engine.ops.layer_ops sends CUDA tensors to the fused Triton kernels: RMSNorm (with the
    residual add in place), SiLU-and-multiply, rotary in place, at the 8B shapes."""
    from engine.model.config import RopeConfig
    from engine.model.rope import RotaryEmbedding
    from engine.ops import layer_ops

    gen = torch.Generator(device="cuda").manual_seed(7)
    t, hidden, inter, heads, kv, dim = 37, 4096, 14336, 32, 8, 128
    x = torch.randn(t, hidden, device="cuda", generator=gen).to(dtype)
    add = torch.randn(t, hidden, device="cuda", generator=gen).to(dtype)
    w = (torch.rand(hidden, device="cuda", generator=gen) + 0.5).to(dtype)
    want_x = x + add
    h = want_x.float()
    want = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    _close(layer_ops.rms_norm(x, w, 1e-5, add), want, dtype)
    assert torch.equal(x, want_x)

    gate_up = torch.randn(t, 2 * inter, device="cuda", generator=gen).to(dtype)
    gate, up = gate_up.split(inter, dim=-1)
    _close(layer_ops.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up, dtype)

    rope = RotaryEmbedding(RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0), dim, 4096).to("cuda")
    cos, sin = rope.cos_sin(torch.randint(0, 4096, (t,), device="cuda", generator=gen), dtype)
    qkv = torch.randn(t, (heads + 2 * kv) * dim, device="cuda", generator=gen).to(dtype)
    qk = qkv[:, : (heads + kv) * dim].view(t, heads + kv, dim)
    want = RotaryEmbedding.rotate(qk, cos, sin)
    assert layer_ops.rotate_(qk, cos, sin)
    _close(qk, want, dtype)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    from engine.bench.gpu import write_synthetic_model_dir

    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    write_synthetic_model_dir(path, json.loads((path / "config.json").read_text()))
    return path


def test_engine_on_gpu_matches_transformers_and_cuda_graphs(tiny_model_dir: Path) -> None:
    """fp32 on CUDA: Triton + CUDA graphs, Triton eager and the torch path give transformers' tokens."""
    transformers = pytest.importorskip("transformers")
    from engine import LLM, SamplingParams

    prompts = [[1, 5, 9, 33, 2, 7, 7, 8, 100, 3, 4] * 7, [1, 5, 9, 33, 2, 7, 7, 8, 50], [77], list(range(3, 200))]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda().eval()
    expected = []
    with torch.inference_mode():  # plain argmax loop without a cache: no EOS handling, no API drift
        for p in prompts:
            ids = list(p)
            for _ in range(20):
                ids.append(int(hf(input_ids=torch.tensor([ids], device="cuda")).logits[0, -1].argmax()))
            expected.append(ids[len(p):])
    for backend, graphs in (("triton", True), ("triton", False), ("torch", False)):
        llm = LLM(model=tiny_model_dir, device="cuda", dtype="float32", attention_backend=backend,
                  cuda_graphs=graphs, block_size=16, max_num_batched_tokens=64, max_num_seqs=8,
                  check_integrity=True)
        assert (llm.engine.runner.graphs is not None) == graphs
        got = [o.token_ids for o in llm.generate(prompts, params)]
        assert got == expected, (backend, graphs)
        del llm
        torch.cuda.empty_cache()
