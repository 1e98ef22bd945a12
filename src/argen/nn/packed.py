"""Linear layers with the weight kept reordered for oneDNN: faster CPU decoding, opt-in.

Contract:
- `PackedLinear` is an `nn.Linear` without bias whose forward, on a CPU, in float32 (or bfloat16 where
  the CPU supports oneDNN's bf16 path) and with no gradient wanted, multiplies by a copy of the
  weight reordered once for oneDNN (`torch.ops.mkldnn._reorder_linear_weight`) through
  `torch.ops.mkldnn._linear_pointwise`. Anywhere else (another device or dtype, autograd, a torch
  without oneDNN) it is `F.linear(x, weight)`. The copy is made on first use and again whenever the
  weight is rebound, cast, moved or edited in place (its address, version counter and dtype are
  checked on every call); it is not part of the state dict, so checkpoints are unchanged. It costs
  a second copy of the weights in memory.
- A row's result does not depend on how many rows share the call (the reorder is made for a
  4-row batch; tested for 1 to 64 rows and larger multiples).
- The results differ from `F.linear`'s in the last bits (a different summation order), so sampled
  tokens may differ from those of the unpacked model, rarely; greedy and seeded tokens are pinned to
  the unpacked model, which stays the default.
- `pack_linears(model, skip=())` swaps every bias-free `nn.Linear` (exactly that type: int8 or
  wrapped layers are left alone) whose qualified name is not in `skip` for a `PackedLinear` sharing
  its weight parameter, in place, and returns the model; `is_packed(model)` says whether any is.

Measured on the project's 2-core AVX-512 CPU (no AMX), torch 2.14, GPT-B's linear layers at 4 rows
(one decode step with guidance for 2 images), 1 thread: 23-30 ms packed against 47-60 ms through
aten (`torch.mm`, MKL) in float32 and 14 ms against 29 ms in bfloat16 (`bench_floor_kernels.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from argen.nn.quant import replace_linears

PACK_ROWS = 4  # the batch the reorder is tuned for; with 1 a row's result depends on the batch size


def _kernel_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.dtype != weight.dtype or x.dim() < 2:
        return False
    if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    if x.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return x.dtype == torch.float32


class PackedLinear(nn.Linear):
    """y = x @ weight.T through a oneDNN-reordered copy of the weight; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self._packed: torch.Tensor | None = None
        self._packed_key: tuple | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        if linear.bias is not None:
            raise ValueError("PackedLinear has no bias; pack bias-free layers only")
        layer = cls(linear.in_features, linear.out_features, device="meta")
        layer.weight = linear.weight  # the same parameter: optimisers, hooks and signatures see no change
        return layer

    def _packed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        version = -1 if weight.is_inference() else weight._version
        key = (weight.data_ptr(), version, weight.dtype)
        if key != self._packed_key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
            self._packed_key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if not _kernel_usable(x, weight):
            return F.linear(x, weight)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self._packed_weight(weight), None, "none", [-1], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed on the CPU"


def pack_linears(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Swap every bias-free `nn.Linear` (qualified name not in `skip`) for a `PackedLinear`, in place."""
    return replace_linears(model, PackedLinear.from_linear, skip)


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())
