"""Weight-only quantization of the decoder's linear layers (int8 per output channel, int4 group-wise).

int8: w[n, k] ~= q[n, k] * scale[n], q in [-127, 127] (symmetric, one scale per output row).
int4: w[n, k] ~= q[n, k] * scale[n, g] + min[n, g], q in [0, 15], one (scale, min) per group of
`group_size` input columns (asymmetric: the GGUF Q4_1 layout; Q4_0 is min = -8 * scale).

On CPU the matmuls are torch's packed kernels (`aten._weight_int8pack_mm`,
`aten._weight_int4pack_mm_for_cpu`), which read the int8 / packed int4 weights directly; anywhere
else (CUDA: unmeasured, no GPU on the build machine) the layer dequantizes its weight to the
activation dtype per call and uses `F.linear` ("dequant" kernel; also selectable on CPU, which is
how it is tested). The lm_head stays in the model's dtype: in tied models (SmolLM2, Llama 3.2 1B/3B)
it is the embedding, which is kept anyway, so quantizing it saves no memory and costs logit accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.errors import ModelLoadError

QUANT_MODES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 32  # 128 does not divide SmolLM2-135M's hidden size (576)
_INT4_GROUP_SIZES = (32, 64, 128, 256)


class QuantizationError(ModelLoadError):
    """A quantized weight, its scales or the requested quantization are malformed."""


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q int8 [N, K], scales float32 [N])."""
    wf = w.detach().float()
    scales = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(wf / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q uint8 [N, K] in 0..15, scales float32 [N, K/G], mins float32 [N, K/G])."""
    n, k = w.shape
    _check_group(k, group_size)
    wg = w.detach().float().reshape(n, k // group_size, group_size)
    mins, maxs = wg.amin(dim=-1), wg.amax(dim=-1)
    scales = ((maxs - mins) / 15.0).clamp(min=1e-12)
    q = torch.round((wg - mins[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(n, k), scales, mins


def _check_group(k: int, group_size: int) -> None:
    if group_size not in _INT4_GROUP_SIZES:
        raise QuantizationError(f"int4 group size: expected one of {list(_INT4_GROUP_SIZES)}; got {group_size}")
    if k % group_size:
        raise QuantizationError(
            f"int4 group size {group_size} must divide the input size {k}; expected a divisor such as 32"
        )


def _cpu_ops(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None]).T + bias, from int8 weights [N, K] and per-row scales [N]."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype, kernel: str = "auto") -> None:
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2:
            raise QuantizationError(f"int8 weight: expected a 2-D int8 tensor; got {q.dim()}-D {q.dtype}")
        if tuple(scales.shape) != (q.shape[0],):
            raise QuantizationError(
                f"int8 scales: expected shape ({q.shape[0]},) (one per output row); got {tuple(scales.shape)}"
            )
        self.out_features, self.in_features = q.shape
        self.qweight = q.contiguous()
        self.scales = scales.to(dtype).contiguous()
        self.bias = None if bias is None else bias.detach().to(dtype)
        cpu_ok = q.device.type == "cpu" and _cpu_ops("_weight_int8pack_mm")
        self.kernel = _pick(kernel, cpu_ok, "cpu_packed")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "cpu_packed":
            lead = x.shape[:-1]  # the packed op takes 2-D inputs only
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.qweight, self.scales)
            y = y.reshape(*lead, self.out_features)
        else:
            y = nn.functional.linear(x, self.qweight.to(x.dtype)) * self.scales
        return y if self.bias is None else y + self.bias

    def weight_bytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * self.scales.element_size()


class Int4Linear(nn.Module):
    """Group-wise int4 with a min per group: w = q * scale + min (q in 0..15)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype, group_size: int, kernel: str = "auto") -> None:
        super().__init__()
        if q.dim() != 2 or q.dtype not in (torch.uint8, torch.int32):
            raise QuantizationError(f"int4 weight: expected a 2-D uint8 tensor of 0..15; got {q.dim()}-D {q.dtype}")
        n, k = q.shape
        _check_group(k, group_size)
        want = (n, k // group_size)
        for label, t in (("scales", scales), ("mins", mins)):
            if tuple(t.shape) != want:
                raise QuantizationError(
                    f"int4 {label}: expected shape {want} (rows x groups of {group_size}); got {tuple(t.shape)}"
                )
        self.out_features, self.in_features, self.group_size = n, k, group_size
        self.bias = None if bias is None else bias.detach().to(dtype)
        cpu_ok = q.device.type == "cpu" and _cpu_ops("_weight_int4pack_mm_for_cpu") and n % 16 == 0
        self.kernel = _pick(kernel, cpu_ok, "cpu_packed")
        if self.kernel == "cpu_packed":
            # torch's int4 kernels dequantize as (q - 8) * scale + zero, so zero = min + 8 * scale
            zeros = mins.float() + 8.0 * scales.float()
            self.scales_zeros = torch.stack([scales.float(), zeros], dim=-1).transpose(0, 1).to(dtype).contiguous()
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        else:
            self.packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8).contiguous()  # two nibbles a byte
            self.scales = scales.to(dtype).contiguous()
            self.mins = mins.to(dtype).contiguous()

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.kernel == "cpu_packed":
            eye = torch.eye(self.in_features, dtype=dtype, device=self.packed.device)
            return self.forward_nobias(eye).t().contiguous()
        q = torch.stack([self.packed & 0xF, self.packed >> 4], dim=-1).reshape(self.out_features, -1)
        qg = q.to(dtype).reshape(self.out_features, -1, self.group_size)
        w = qg * self.scales.to(dtype)[..., None] + self.mins.to(dtype)[..., None]
        return w.reshape(self.out_features, self.in_features)

    def forward_nobias(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "cpu_packed":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(-1, self.in_features), self.packed, self.group_size, self.scales_zeros
            )
            return y.reshape(*x.shape[:-1], self.out_features)  # type: ignore[no-any-return]
        return nn.functional.linear(x, self.dequantize(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.forward_nobias(x)
        return y if self.bias is None else y + self.bias

    def weight_bytes(self) -> int:
        extra = [self.scales_zeros] if self.kernel == "cpu_packed" else [self.scales, self.mins]
        return self.packed.numel() * self.packed.element_size() + sum(t.numel() * t.element_size() for t in extra)


def _pick(kernel: str, cpu_ok: bool, packed: str) -> str:
    if kernel not in ("auto", packed, "dequant"):
        raise QuantizationError(f"quantized kernel: expected 'auto', '{packed}' or 'dequant'; got {kernel!r}")
    if kernel == "auto":
        return packed if cpu_ok else "dequant"
    if kernel == packed and not cpu_ok:
        raise QuantizationError(f"quantized kernel {packed!r} needs a CPU weight and torch's packed op")
    return kernel


def quantize_linear(linear: nn.Linear, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                    kernel: str = "auto") -> nn.Module:
    """A quantized replacement for linear (same input and output)."""
    w, dtype = linear.weight.detach(), linear.weight.dtype
    if mode == "int8":
        q, s = quantize_int8(w)
        return Int8Linear(q, s, linear.bias, dtype, kernel)
    if mode == "int4":
        q4, s4, m4 = quantize_int4(w, group_size)
        return Int4Linear(q4, s4, m4, linear.bias, dtype, group_size, kernel)
    raise QuantizationError(f"quantization: expected one of {list(QUANT_MODES)}; got {mode!r}")


def quantize_model(model: nn.Module, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                   kernel: str = "auto") -> int:
    """Replace every decoder-layer nn.Linear (q/k/v/o, gate/up/down) in place; lm_head is kept.
    Returns how many layers were replaced."""
    if mode not in QUANT_MODES:
        raise QuantizationError(f"quantization: expected one of {list(QUANT_MODES)}; got {mode!r}")
    targets = [
        (parent, name, child)
        for pname, parent in model.named_modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and f"{pname}.{name}".strip(".") != "lm_head"
    ]
    with torch.inference_mode():
        for parent, name, child in targets:
            setattr(parent, name, quantize_linear(child, mode, group_size, kernel))
    return len(targets)


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the weights (and scales) of every linear layer, quantized or not, lm_head included
    unless it is tied to the embedding."""
    total = 0
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            total += module.weight_bytes()
        elif isinstance(module, nn.Linear):
            if embed is not None and module.weight is embed.weight:
                continue
            total += module.weight.numel() * module.weight.element_size()
    return total
