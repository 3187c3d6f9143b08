"""Weight-only quantization (engine/model/quant.py): int8 and int4 matmuls against an fp32 reference,
both kernels (torch's packed CPU ops and the dequantize-then-F.linear path CUDA takes), the real
model quantized at load answering greedily, and bad input refused with what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from engine import LLM, EngineConfig, SamplingParams
from engine.model.quant import (
    Int4Linear,
    Int8Linear,
    QuantizationError,
    linear_weight_bytes,
    quantize_int4,
    quantize_int8,
    quantize_linear,
    quantize_model,
)

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def _linear(k: int, n: int, dtype: torch.dtype = torch.float32, bias: bool = False) -> nn.Linear:
    torch.manual_seed(k + n)
    return nn.Linear(k, n, bias=bias).to(dtype)


@pytest.mark.parametrize("kernel", ["cpu_packed", "dequant"])
@pytest.mark.parametrize("k", [576, 1536])
def test_int8_matmul_error_bound(kernel: str, k: int) -> None:
    lin = _linear(k, 192, bias=True)
    x = torch.randn(7, k)
    ref = lin(x).detach()
    q = quantize_linear(lin, "int8", kernel=kernel)
    assert isinstance(q, Int8Linear) and q.kernel == kernel and q.qweight.dtype == torch.int8
    rel = float((q(x) - ref).norm() / ref.norm())
    # per-row symmetric int8: rounding error <= scale / 2 per weight, ~0.4% relative on uniform weights
    assert rel < 0.01, rel
    assert rel > 0  # it really is quantized


@pytest.mark.parametrize("kernel", ["cpu_packed", "dequant"])
@pytest.mark.parametrize("group", [32, 64])
def test_int4_matmul_error_bound(kernel: str, group: int) -> None:
    lin = _linear(576, 192)
    x = torch.randn(5, 576)
    ref = lin(x).detach()
    q = quantize_linear(lin, "int4", group_size=group, kernel=kernel)
    assert isinstance(q, Int4Linear) and q.kernel == kernel
    rel = float((q(x) - ref).norm() / ref.norm())
    assert 0 < rel < 0.1, rel
    # the layer computes exactly with the weights quantize_int4 describes
    qw, s, m = quantize_int4(lin.weight, group)
    deq = (qw.float().view(192, -1, group) * s[..., None] + m[..., None]).view(192, 576)
    exact = x @ deq.t()
    assert float((q(x) - exact).abs().max()) <= 1e-4 * float(exact.abs().max())


def test_both_kernels_agree_in_bfloat16() -> None:
    lin = _linear(576, 128, torch.bfloat16)
    x = torch.randn(3, 576, dtype=torch.bfloat16)
    for mode in ("int8", "int4"):
        a = quantize_linear(lin, mode, kernel="cpu_packed")(x).float()
        b = quantize_linear(lin, mode, kernel="dequant")(x).float()
        assert float((a - b).abs().max()) <= 0.02 * float(b.abs().max()), mode


def test_int8_weights_are_a_quarter_of_fp32() -> None:
    model = nn.Sequential(_linear(576, 192), _linear(192, 576))
    fp32 = linear_weight_bytes(model)
    assert quantize_model(model, "int8") == 2
    assert fp32 / 4 <= linear_weight_bytes(model) <= fp32 / 4 * 1.05


def test_bad_input_is_a_clear_error() -> None:
    lin = _linear(576, 64)
    with pytest.raises(QuantizationError, match=r"expected one of \['int8', 'int4'\]; got 'int3'"):
        quantize_linear(lin, "int3")
    with pytest.raises(QuantizationError, match="group size 256 must divide the input size 576"):
        quantize_linear(lin, "int4", group_size=256)
    with pytest.raises(QuantizationError, match="group size: expected one of"):
        quantize_linear(lin, "int4", group_size=48)
    q, s = quantize_int8(lin.weight)
    with pytest.raises(QuantizationError, match=r"int8 scales: expected shape \(64,\).*got \(32,\)"):
        Int8Linear(q, s[:32], None, torch.float32)
    q4, s4, m4 = quantize_int4(lin.weight, 32)
    with pytest.raises(QuantizationError, match=r"int4 scales: expected shape \(64, 18\).*got \(64, 9\)"):
        Int4Linear(q4, s4[:, :9], m4, None, torch.float32, 32)
    with pytest.raises(QuantizationError, match="2-D int8"):
        Int8Linear(q.to(torch.int16), s, None, torch.float32)
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(model=".", quantization="fp4")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_real_model_quantized_answers_paris(engine_model_dir: Path, mode: str) -> None:
    llm = LLM(model=engine_model_dir, quantization=mode, max_num_batched_tokens=256, max_num_seqs=4)
    runner_model = llm.engine.runner.model
    layers = [m for m in runner_model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    assert len(layers) == 4 * llm.engine.runner.model_config.num_layers  # qkv, o, gate_up, down
    out = llm.chat([FRANCE], SamplingParams(max_tokens=12, temperature=0.0))[0]
    assert "Paris" in out.text, out.text


@pytest.mark.parametrize("kernel", ["cpu_packed", "dequant"])
def test_leading_dimensions_are_kept(kernel: str) -> None:
    lin = _linear(576, 64)
    x = torch.randn(2, 3, 576)
    for mode in ("int8", "int4"):
        y = quantize_linear(lin, mode, kernel=kernel)(x)
        assert y.shape == (2, 3, 64)
        flat = quantize_linear(lin, mode, kernel=kernel)(x.reshape(6, 576))
        assert torch.equal(y.reshape(6, 64), flat), mode
