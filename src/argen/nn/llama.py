"""Llama decoder block: pre-norm RMSNorm, attention with 2D RoPE and optional GQA, SwiGLU FFN.

Two calling modes, never mixed:
- training/teacher forcing: `forward(x, rope, mask=None)` attends causally within x (with dropout
  in train mode);
- cached inference, the fast path every sampler uses: `forward_cached(x, rotation, cache,
  positions, kv_len, mask)` computes fused q/k/v, rotates q and k together with one complex
  multiply, writes this call's keys/values into the caller-owned cache at `positions` (one set of
  positions for all rows, or one per row) and attends over the first `kv_len` cache slots only.
  It never applies dropout, whatever the module's mode, and stores no state between calls.
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
        dtype = q.dtype
        if dtype == torch.bfloat16 and not q.is_cuda:
            # the CPU's bf16 flash-attention backward is about 5x slower than its float32 one (torch 2.14)
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                             is_causal=is_causal and mask is None).to(dtype)
        batch, _, seq, _ = out.shape
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(batch, seq, self.dim)))

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._project(x, rope)
        return self._attend(q, k, v, mask, is_causal=True)

    def forward_cached(self, x: torch.Tensor, rotation: torch.Tensor, cache: torch.Tensor, positions: torch.Tensor,
                       kv_len: int, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, C) normed input; rotation (T, D/2) or (B, T, D/2) complex64 (cos + i sin of each
        query's position); cache (2, B, H_kv, S, D); positions (T,) or (B, T) int64: the cache slots
        the keys/values are written to; mask None or (B, 1, T, kv_len) bool (True = visible) or
        additive float. Returns (B, T, C), no dropout."""
        batch, seq, _ = x.shape
        n_head, n_kv, head_dim = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.wqkv(x).contiguous()  # (B, T, C + 2 kv_dim), rotated in place below
        pairs = qkv[..., :self.dim + n_kv * head_dim].view(batch, seq, n_head + n_kv, head_dim // 2, 2)
        rot = rotation[None, :, None] if rotation.ndim == 2 else rotation[:, :, None]  # (B|1, T, 1, D/2)
        if pairs.dtype == torch.float32:
            torch.view_as_complex(pairs).mul_(rot)  # q and k in one complex multiply
        else:  # rotated in float32, rounded back once
            pairs.copy_(torch.view_as_real(torch.view_as_complex(pairs.float()) * rot))
        q = qkv[..., :self.dim].view(batch, seq, n_head, head_dim).transpose(1, 2)  # (B, H, T, D)
        new_kv = qkv[..., self.dim:].view(batch, seq, 2, n_kv, head_dim).permute(2, 0, 3, 1, 4)  # (2, B, H_kv, T, D)
        if positions.ndim == 1:  # keys and values in one write
            cache.index_copy_(3, positions, new_kv.to(cache.dtype))
        else:  # one position per row and token
            cache.scatter_(3, positions[None, :, None, :, None].expand(new_kv.shape), new_kv.to(cache.dtype))
        cache_k, cache_v = cache[0], cache[1]  # (B, H_kv, S, D)
        keys, values = cache_k[:, :, :kv_len], cache_v[:, :, :kv_len]  # (B, H_kv, kv, D)
        if n_kv != n_head:
            keys = keys.repeat_interleave(n_head // n_kv, dim=1)
            values = values.repeat_interleave(n_head // n_kv, dim=1)
        q = q.to(keys.dtype)
        if seq == 1 and not x.is_cuda:
            # one query on the CPU: two batched matmuls beat the fused kernel, whose fixed cost dominates
            scores = torch.matmul(q, keys.transpose(2, 3)).mul_(head_dim ** -0.5)  # (B, H, 1, kv)
            if mask is not None:
                scores = scores.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else scores.add_(mask)
            att = torch.matmul(scores.softmax(dim=-1), values)  # (B, H, 1, D)
        else:
            att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, H, T, D)
        return self.wo(att.transpose(1, 2).reshape(batch, seq, self.dim).to(x.dtype))  # (B, T, C)


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

    def forward_cached(self, x, rotation, cache, positions, kv_len: int, mask=None) -> torch.Tensor:
        """Cached inference (see `Attention.forward_cached`); no dropout or drop-path."""
        h = x + self.attention.forward_cached(self.attention_norm(x), rotation, cache, positions, kv_len, mask)
        ff = self.feed_forward
        y = self.ffn_norm(h)
        gate = F.silu(ff.w1(y), inplace=True).mul_(ff.w3(y))  # (B, T, hidden)
        return h + ff.w2(gate)  # (B, T, C)
