"""Int8 weight-only linear layers for decoding: `Int8Linear` and `quantize_int8(model)`.

Contract:
- `Int8Linear.from_linear(linear)` stores the weight (N, K) as int8 `weight_int8` with one
  symmetric scale per output channel, `scale` (N,) = max|w_n| / 127, computed in float32:
  w ≈ weight_int8 * scale[:, None]. There is no bias (the generator's linears have none).
- `forward(x)` takes (..., K) in the model's dtype (fp32 or bf16) and returns (..., N) in the same
  dtype. Activations are never quantised. `dequantized_weight()` is the (N, K) float32 reference
  the layer approximates.
- `quantize_int8(model, skip=())` replaces every bias-free `nn.Linear` below `model` whose
  qualified name is not in `skip` by an `Int8Linear`, in place, and returns the model. The int8
  tensors are frozen parameters (requires_grad=False), so `model.to(dtype)` casts the scales but
  never the int8 weights, and code that watches `model.parameters()` sees the swap.
- `is_quantized(model)`: whether any `Int8Linear` is below `model`; `weight_bytes(model)`: the bytes
  of its state dict.

Kernel: torch's own `torch._weight_int8pack_mm` (per-channel int8 weights, bf16 activations,
float32 accumulation), not torchao. Measured on the project's 2-core AVX-512 (BF16, VNNI) CPU,
torch 2.14: torchao 0.18's `Int8WeightOnlyConfig` dequantises the weight and then multiplies, so
GPT-B's linears at 4 rows were slower than plain fp32 (no gain to be had from it), while the torch
kernel reads the int8 weight directly: 0.18 ms against 0.98 ms fp32 for a 2048x768 weight at 4
rows. That kernel is fast only with bf16 activations (with fp32 ones it is ~10x slower than fp32),
so a float32 model feeds its linears bf16-rounded activations and gets the float32 result back;
everything outside the linears (norms, RoPE, attention, residual stream) stays in float32.
The kernel needs K to be a multiple of 8 (other K crash it); such layers, and every device but the
CPU (CUDA graph capture included), use the dequantise-then-multiply path in the model's dtype,
which is correct everywhere and adds no dependency.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KERNEL_K_MULTIPLE = 8  # _weight_int8pack_mm crashes for K not a multiple of 8 (torch 2.14, AVX-512 and AVX2)


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 (N, K), float32 scales (N,)), symmetric, rounding to nearest."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0  # (N,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (N, K)
    return q.contiguous(), scale


class Int8Linear(nn.Module):
    """y = x @ (weight_int8 * scale[:, None]).T; bias-free; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_int8 = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                        requires_grad=False)
        self.scale = nn.Parameter(torch.ones(out_features, device=device), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias; quantise bias-free layers only")
        layer = cls(linear.in_features, linear.out_features, device=linear.weight.device)
        q, scale = quantize_per_channel(linear.weight)
        layer.weight_int8.data.copy_(q)
        layer.scale.data = scale.to(linear.weight.dtype)  # the model's dtype, as a cast model would hold it
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale.float()[:, None]  # (N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.in_features % KERNEL_K_MULTIPLE:
            return F.linear(x, self.weight_int8.to(x.dtype)) * self.scale.to(x.dtype)
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (M, K)
        out = torch._weight_int8pack_mm(rows, self.weight_int8, self.scale.to(torch.bfloat16))  # (M, N)
        return out.to(x.dtype).view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def replace_linears(model: nn.Module, make, skip: tuple[str, ...] = ()) -> nn.Module:
    """Swap every bias-free `nn.Linear` (exactly that type; qualified name not in `skip`) for
    `make(linear)`, in place; returns the model."""
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and module.bias is None and name not in skip]
    for name, linear in targets:
        model.set_submodule(name, make(linear))
    return model


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Swap every bias-free `nn.Linear` (qualified name not in `skip`) for an `Int8Linear`, in place."""
    return replace_linears(model, Int8Linear.from_linear, skip)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict (parameters and persistent buffers): what its weights cost."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
