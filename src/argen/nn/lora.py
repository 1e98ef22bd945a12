"""Batched LoRA: many adapters on one model at once, chosen per batch row, never merged.

Contract:
- `AdapterRows(count, rank)`: the per-row adapter index every wrapped layer of one model reads. `rows` is
  None (every row runs the plain model) or a (B,) int64 tensor matching the batch of the layer's input:
  0 = no adapter (the base), k = adapter k (1-based). The caller sets it around a forward pass with
  `rows_of(model, index)`, which also derives `mask` (B, K * R), 1 on the R rank slots of each row's
  own adapter (none for a base row); a CUDA graph captured inside reads the same tensor in place on
  replay (and recomputes the mask from it), so the caller changes the index by writing into that
  tensor, never by rebinding it.
- `BatchedLoraLinear(base, a, b, rows)` wraps a linear layer (`nn.Linear` or `argen.nn.quant.Int8Linear`):
  `a` (K+1, R, in) and `b` (K+1, R, out) stack the K adapters' A and B^T matrices, their scale already
  folded into `b` (scale * alpha / r, peft's scaling), ranks padded with zeros to the model's largest R;
  entry 0 and every adapter that does not target this layer are zeros. forward(x (B, T, in)) = base(x) +
  B_k (A_k x) for each row's adapter k, by one of two equal forms chosen by shape alone (graph-safe): with
  at least K rows x tokens, every row through the K adapters' stacked A, masked to its own adapter's rank
  slots, then through the stacked B (two dense matmuls; A and B are read once per step); with fewer, A_k and B_k
  gathered per row (two batched matmuls). A base row gets base(x) + 0: the plain model's numbers.
  Measured on the project's CPU (rank 16, 5 stacks, 32 rows): the gathered form costs 2-4x the masked one.
- `MultiLora` (installed as `model.multi_lora` by `install`): the adapters' served `names`, and each
  adapter's own condition embedding where it rebuilt the class rows or learned a new caption projection
  (`embedder(k)`: that module, else the model's own `cls_embedding`). `embed_condition(model, cond,
  adapters)` embeds each row with its adapter's embedder (rows grouped per adapter, one call each);
  `check_classes` (class ids within each row's adapter's classes, else `ArgenError`) and
  `null_condition` (each row's own null class or learned unconditional caption) go with it.
- `install(model, names, layers, embedders)` wraps the named linear layers (setattr on their parents)
  and returns the `MultiLora`; `multi_lora(model)` -> it, or None for a plain model.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from argen.utils.errors import ArgenError


class AdapterRows:
    """The per-row adapter index of one model's wrapped layers (None: no adapter on any row)."""

    def __init__(self, count: int, rank: int):
        self.count, self.rank = count, rank  # K + 1 stacks (the base's zeros first), R rank slots each
        self.rows: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    def set(self, index: torch.Tensor | None) -> None:
        self.rows = index
        self.mask = None
        if index is not None:
            stacks = torch.arange(1, self.count, device=index.device)
            hit = index[:, None] == stacks[None]  # (B, K), no host read
            mask = hit[:, :, None].expand(-1, -1, self.rank).reshape(index.shape[0], -1)  # (B, K R)
            self.mask = mask.to(torch.float32)


class BatchedLoraLinear(nn.Module):
    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, rows: AdapterRows):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(a, requires_grad=False)  # (K+1, R, in)
        self.b = nn.Parameter(b, requires_grad=False)  # (K+1, R, out): B transposed, scale folded in
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (B, T, out)
        index = self.rows.rows
        if index is None:
            return y
        batch = x.shape[0]
        if index.shape[0] != batch:
            raise RuntimeError(f"adapter index for {index.shape[0]} rows, but the batch has {batch}")
        x = x.reshape(batch, -1, x.shape[-1])  # (B, T, in)
        tokens = x.shape[1]
        if batch * tokens >= self.a.shape[0] - 1:  # stacked: the K adapters' A and B read once
            mask = self.rows.mask  # (B, K R)
            if tokens > 1:
                mask = mask[:, None].expand(batch, tokens, mask.shape[1]).reshape(batch * tokens, -1)
            h = torch.mm(x.reshape(batch * tokens, -1), self.a[1:].flatten(0, 1).T.to(x.dtype))  # (B T, K R)
            h = h.mul_(mask)
            out = torch.addmm(y.reshape(batch * tokens, -1), h, self.b[1:].flatten(0, 1).to(x.dtype))
            return out.view(y.shape)  # (B, T, out)
        a = self.a[index].to(x.dtype)  # (B, R, in): gathered per row
        b = self.b[index].to(x.dtype)  # (B, R, out)
        h = torch.bmm(x, a.transpose(1, 2))  # (B, T, R)
        return y + torch.bmm(h, b).view(y.shape)  # (B, T, out)


class MultiLora(nn.Module):
    def __init__(self, names: list[str], embedders: dict[int, nn.Module], rows: AdapterRows):
        super().__init__()
        self.names = list(names)
        self.embedders = nn.ModuleDict({str(k): m for k, m in embedders.items()})
        self.rows = rows

    def embedder(self, model: nn.Module, adapter: int) -> nn.Module:
        """The condition embedding of adapter `adapter` (1-based; 0 = the base's)."""
        return self.embedders[str(adapter)] if str(adapter) in self.embedders else model.cls_embedding

    def check_classes(self, model: nn.Module, cond: torch.Tensor, adapters: list[int]) -> None:
        """(B,) class ids, each within its adapter's classes (1-based adapters; 0 = the base's)."""
        for c, k in zip(cond.tolist(), adapters):
            classes = self.embedder(model, k).num_classes
            if not 0 <= c < classes:
                whose = self.names[k - 1] if k else "the base"
                raise ArgenError(f"class ids of {whose} must lie in [0, {classes - 1}], got {c}")

    def null_condition(self, model: nn.Module, adapters: list[int], device) -> torch.Tensor:
        """Each row's unconditional condition (its adapter's null class or learned caption): (B,) or (B, L, D)."""
        return torch.cat([self.embedder(model, k).null_condition(1, device) for k in adapters])

    def embed_condition(self, model: nn.Module, cond: torch.Tensor, adapters: list[int]) -> torch.Tensor:
        """cond (B,) ids or (B, L, D) features, adapters (B,) 1-based indices -> (B, cond_len, C)."""
        groups: dict[int, list[int]] = {}
        for i, k in enumerate(adapters):
            groups.setdefault(self._key(k), []).append(i)
        if len(groups) == 1:
            return self._embed(model, next(iter(groups)), cond)
        out = None
        for k, members in groups.items():
            index = torch.tensor(members, device=cond.device)
            part = self._embed(model, k, cond[index])  # (b, cond_len, C)
            if out is None:
                out = part.new_empty((cond.shape[0], *part.shape[1:]))
            out[index] = part
        return out

    def _key(self, adapter: int) -> int:
        return adapter if str(adapter) in self.embedders else 0

    def _embed(self, model: nn.Module, key: int, cond: torch.Tensor) -> torch.Tensor:
        if key == 0:
            return model.embed_condition(cond)
        if cond.is_floating_point():
            cond = cond.to(model.tok_embeddings.weight.dtype)
        return self.embedders[str(key)](cond)


def multi_lora(model: nn.Module) -> MultiLora | None:
    return getattr(model, "multi_lora", None)


@contextmanager
def rows_of(model: nn.Module, index: torch.Tensor | None):
    """Run the model's wrapped layers with this (B,) adapter index (nothing for a plain model)."""
    lora = multi_lora(model)
    if lora is None or index is None:
        yield
        return
    lora.rows.set(index)
    try:
        yield
    finally:
        lora.rows.set(None)


def install(model: nn.Module, names: list[str], layers: dict[str, tuple[torch.Tensor, torch.Tensor]],
            embedders: dict[int, nn.Module]) -> MultiLora:
    """Wrap `layers` (qualified name -> (a (K+1, R, in), b (K+1, R, out)), one R for all) of `model` in place."""
    shapes = {a.shape[:2] for a, _ in layers.values()}
    if len(shapes) > 1:
        raise ValueError(f"every layer's stacks must have one (K+1, R), got {sorted(shapes)}")
    count, rank = shapes.pop() if shapes else (len(names) + 1, 1)
    rows = AdapterRows(count, rank)
    for name, (a, b) in layers.items():
        model.set_submodule(name, BatchedLoraLinear(model.get_submodule(name), a, b, rows))
    lora = MultiLora(names, embedders, rows)
    model.multi_lora = lora
    return lora
