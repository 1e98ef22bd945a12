"""Llama decoder block: pre-norm RMSNorm, attention with 2D RoPE and optional GQA, SwiGLU FFN.

Two calling modes, never mixed:
- training/teacher forcing: `forward(x, rope, mask=None)` attends causally within x;
- cached inference: `forward_cached(x, rope, cache_k, cache_v, positions, kv_len, mask)` writes
  this step's keys/values into caller-owned cache tensors at `positions` and attends over the first
  `kv_len` cache slots. The block stores no state between calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from argen.nn.norm import RMSNorm
from argen.nn.rope import apply_rope


def swiglu_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_head: int | None = None, attn_dropout: float = 0.0,
                 resid_dropout: float = 0.0):
        super().__init__()
        if dim % n_head != 0:
            raise ValueError(f"dim {dim} is not divisible by n_head {n_head}")
        self.n_head = n_head
        self.n_kv_head = n_kv_head or n_head
        if n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head {n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        self.head_dim = dim // n_head
        self.dim = dim
        kv_dim = self.n_kv_head * self.head_dim
        self.wqkv = nn.Linear(dim, dim + 2 * kv_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.attn_dropout = attn_dropout
        self.resid_dropout = nn.Dropout(resid_dropout)

    def _project(self, x: torch.Tensor, rope: torch.Tensor):
        batch, seq, _ = x.shape
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv_dim, kv_dim], dim=-1)
        q = apply_rope(q.view(batch, seq, self.n_head, self.head_dim), rope)
        k = apply_rope(k.view(batch, seq, self.n_kv_head, self.head_dim), rope)
        v = v.view(batch, seq, self.n_kv_head, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)

    def _attend(self, q, k, v, mask, is_causal: bool) -> torch.Tensor:
        if self.n_kv_head != self.n_head:
            repeat = self.n_head // self.n_kv_head
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        dropout = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                             is_causal=is_causal and mask is None)
        batch, _, seq, _ = out.shape
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(batch, seq, self.dim)))

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._project(x, rope)
        return self._attend(q, k, v, mask, is_causal=True)

    def forward_cached(self, x, rope, cache_k, cache_v, positions, kv_len: int, mask=None) -> torch.Tensor:
        q, k, v = self._project(x, rope)
        cache_k.index_copy_(2, positions, k.to(cache_k.dtype))
        cache_v.index_copy_(2, positions, v.to(cache_v.dtype))
        keys = cache_k[:, :, :kv_len]
        values = cache_v[:, :, :kv_len]
        return self._attend(q, keys, values, mask, is_causal=False)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_head: int | None, hidden_dim: int, norm_eps: float,
                 attn_dropout: float = 0.0, resid_dropout: float = 0.0, ffn_dropout: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.attention = Attention(dim, n_head, n_kv_head, attn_dropout, resid_dropout)
        self.feed_forward = FeedForward(dim, hidden_dim, ffn_dropout)
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, rope, mask=None):
        h = x + self.drop_path(self.attention(self.attention_norm(x), rope, mask))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))

    def forward_cached(self, x, rope, cache_k, cache_v, positions, kv_len, mask=None):
        h = x + self.attention.forward_cached(self.attention_norm(x), rope, cache_k, cache_v, positions,
                                              kv_len, mask)
        return h + self.feed_forward(self.ffn_norm(h))
