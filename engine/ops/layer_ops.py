"""The decoder layer's element-wise ops (RMSNorm with the residual add, SiLU-and-multiply, rotary
embedding), one fused pass each on every device: the compiled kernels on CPU (cpu_native), Triton
kernels on CUDA (triton_backend), the torch ops where neither applies (cpu_native's fallback).

On a GPU an unfused decoder layer is ~40 small kernel launches (RMSNorm alone is ~8 torch ops);
at one decode row per sequence those launches, not the weight reads, would bound single-stream
decode. Same formulas, op order and rounding as transformers on both paths.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from engine.ops import cpu_native


@functools.cache
def _have_triton() -> bool:  # looked up once: the ops below run several times per layer
    return importlib.util.find_spec("triton") is not None


def _on_cuda(x: torch.Tensor) -> bool:
    """CUDA tensors take the Triton kernels; a CUDA build without Triton takes the torch ops."""
    return x.is_cuda and _have_triton()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, add: torch.Tensor | None = None) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)) over x [T, H]'s rows; with `add`, x += add first, in
    place (the residual stream), and the sum is normalised. Returns a new tensor."""
    if _on_cuda(x) and x.dim() == 2 and x.stride(-1) == 1 and weight.dtype == x.dtype:
        from engine.ops import triton_backend

        return triton_backend.rms_norm(x, weight, eps, add)
    return cpu_native.rms_norm(x, weight, eps, add)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 I] -> silu(gate) * up [T, I]."""
    if _on_cuda(gate_up) and gate_up.dim() == 2:
        from engine.ops import triton_backend

        return triton_backend.silu_and_mul(gate_up)
    return cpu_native.silu_and_mul(gate_up)


def rotate_(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> bool:
    """Rotate x [T, heads, D] by cos / sin_signed [T, 1, D] in place when a fused kernel takes it
    (x must be a temporary); False = not done, the caller runs RotaryEmbedding.rotate."""
    if _on_cuda(x) and x.dim() == 3:
        from engine.ops import triton_backend

        return triton_backend.rotate_(x, cos, sin_signed)
    return cpu_native.rotate_(x, cos, sin_signed)
