"""Per-row sampling on the device: guidance, temperature, top-k, top-p and a sync-free draw.

Semantics are exactly those of `argen.sampling.logits.process_logits` + `torch.multinomial`, but
every parameter may differ per row (the server batches requests with different settings):
- guidance: `uncond + s * (cond - uncond)` with s = `scales[:, t]` (precomputed with
  `guidance_scale_at`); rows that are not guided at all take their conditional logits unchanged;
- temperature divides the logits; top-k keeps every candidate >= the row's k-th largest (ties kept
  among the K candidates; an exact float tie with the k-th logit that `torch.topk` left outside the
  candidates is dropped, where the reference would keep it);
  top-p keeps the sorted prefix whose preceding mass is <= p (the top token always stays);
- filtering works on the top-K candidates only (K = the largest k in the batch, or the whole
  vocabulary when a row needs it); the draw is an inverse-CDF lookup in token-id order with one
  U[0, 1) number per row and step (`uniforms`, drawn before the loop from the caller's
  generator), so a step costs a top-k, a softmax and a cumulative sum instead of V random
  numbers, and a row's token depends only on its own logits, parameters and number. With
  top_k=1 this is exactly greedy decoding. Nothing here reads a value back to the host.

`RowParams` holds the per-row tensors plus the static facts (largest k, whether any row uses top-p,
guidance) that fix the shape of the computation, so a captured CUDA graph stays valid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from argen.sampling.logits import SamplingParams, guidance_scale_at


@dataclass
class RowParams:
    temperature: torch.Tensor  # (B, 1) float32
    top_k: torch.Tensor  # (B, 1) int64, 0 = off
    top_p: torch.Tensor  # (B, 1) float32, 1.0 = off
    guided_rows: torch.Tensor  # (B, 1) bool: row uses guidance at all
    scales: torch.Tensor  # (B, N) float32 guidance scale per row and token index
    guided: bool  # any row guided: the batch carries uncond twins
    all_guided: bool
    k_max: int  # candidates kept per row (0: no filter at all, sample the full softmax)
    use_top_p: bool
    uniform: SamplingParams | None  # set when every row shares one SamplingParams

    @property
    def batch(self) -> int:
        return self.temperature.shape[0]


def build_row_params(params: SamplingParams | Sequence[SamplingParams], batch: int, num_tokens: int,
                     vocab_size: int, device, k_bucket: int = 1) -> RowParams:
    """Per-row tensors for `batch` rows from one shared or a per-row list of SamplingParams.

    `k_bucket` rounds the top-k width up (the server uses it so that graphs can be reused).
    """
    if isinstance(params, SamplingParams):
        rows = [params] * batch
        uniform = params
    else:
        rows = list(params)
        if len(rows) != batch:
            raise ValueError(f"{len(rows)} SamplingParams for {batch} rows")
        uniform = rows[0] if all(p == rows[0] for p in rows) else None
    ks = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in rows]
    k_max, use_top_p = static_facts(rows, vocab_size, k_bucket)
    guided_flags = [p.guided for p in rows]
    scales = torch.tensor([[guidance_scale_at(p, t, num_tokens) for t in range(num_tokens)] for p in rows],
                          dtype=torch.float32).reshape(batch, num_tokens)
    return RowParams(
        temperature=torch.tensor([max(p.temperature, 1e-5) for p in rows], dtype=torch.float32).view(-1, 1).to(device),
        top_k=torch.tensor(ks, dtype=torch.long).view(-1, 1).to(device),
        top_p=torch.tensor([p.top_p for p in rows], dtype=torch.float32).view(-1, 1).to(device),
        guided_rows=torch.tensor(guided_flags, dtype=torch.bool).view(-1, 1).to(device),
        scales=scales.to(device),
        guided=any(guided_flags), all_guided=all(guided_flags), k_max=k_max, use_top_p=use_top_p,
        uniform=uniform,
    )


def static_facts(params: Sequence[SamplingParams], vocab_size: int, k_bucket: int = 1) -> tuple[int, bool]:
    """(k_max, use_top_p) for rows with these parameters: the candidate width K every row is
    filtered from (0: no filter; the vocabulary when some row needs every candidate) and whether
    any row uses top-p. These fix the shape of the sampling computation (and so a CUDA graph)."""
    ks = [p.top_k if 0 < p.top_k < vocab_size else 0 for p in params]
    use_top_p = any(p.top_p < 1.0 for p in params)
    if (any(ks) and not all(ks)) or (use_top_p and not all(ks)):
        return vocab_size, use_top_p  # some row needs every candidate
    if any(ks):
        k_max = min(vocab_size, max(ks))
        return min(vocab_size, k_bucket * math.ceil(k_max / k_bucket)), use_top_p
    return 0, use_top_p


def combine_guidance_pairs(logits: torch.Tensor, rp: RowParams, scale: torch.Tensor) -> torch.Tensor:
    """Guided logits (B, V) from the model's logits: (2B, V) interleaved twins (row 2i cond, row 2i + 1
    uncond of image i: the slot layout of `argen.engine.slots`) when `rp.guided`, else (B, V) cond
    logits, returned as they are. Unguided rows of a guided batch keep their conditional logits."""
    if not rp.guided:
        return logits
    pairs = logits.view(-1, 2, logits.shape[-1])  # (B, 2, V)
    cond, uncond = pairs[:, 0], pairs[:, 1]
    mixed = uncond + scale * (cond - uncond)
    return mixed if rp.all_guided else torch.where(rp.guided_rows, mixed, cond)


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index drawn from unnormalised non-negative (B, K) weights with one U[0, 1) per row.

    The cumulative sum is taken in float64; x = u * total < total because u is a float32 below 1,
    so the returned index always has a positive weight.
    """
    cdf = weights.double().cumsum(dim=-1)  # (B, K)
    target = uniforms.double()[:, None] * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, target, right=True).clamp_(max=weights.shape[-1] - 1)  # (B, 1)


def sample_filtered(logits: torch.Tensor, rp: RowParams, uniforms: torch.Tensor) -> torch.Tensor:
    """Temperature, top-k, top-p and the draw on float32 logits (B, V) -> (B,) int64 tokens."""
    return _inverse_cdf(filtered_weights(logits, rp), uniforms)[:, 0]


def filtered_weights(logits: torch.Tensor, rp: RowParams) -> torch.Tensor:
    """Temperature, top-k and top-p on float32 logits (B, V) -> (B, V) sampling weights in token-id
    order: the reference's probabilities, except that top-p's cut is not renormalised."""
    uni = rp.uniform
    logits = logits / max(uni.temperature, 1e-5) if uni is not None else logits / rp.temperature
    if rp.k_max == 0:
        return logits.softmax(dim=-1)
    values, indices = torch.topk(logits, rp.k_max, dim=-1)  # (B, K) sorted descending
    if uni is not None:
        kth = values[:, uni.top_k - 1:uni.top_k] if 0 < uni.top_k < values.shape[1] else None
    else:
        k_index = (rp.top_k - 1).clamp(min=0, max=rp.k_max - 1)
        kth = torch.where(rp.top_k > 0, values.gather(1, k_index), float("-inf"))  # (B, 1)
    kept = values if kth is None else values.masked_fill(values < kth, float("-inf"))
    weights = kept.softmax(dim=-1)  # (B, K): the reference's probabilities after top-k
    if rp.use_top_p:
        cumulative = weights.cumsum(dim=-1)
        n_keep = 1 + (cumulative[:, :-1] <= rp.top_p).sum(dim=-1, keepdim=True)  # (B, 1)
        rank = torch.arange(rp.k_max, device=logits.device)
        weights = weights.masked_fill(rank >= n_keep, 0.0)
    # back to token-id order, so that a row's draw does not depend on K (i.e. on the other rows)
    return torch.zeros_like(logits).scatter_(1, indices, weights)


def sample_tokens(logits: torch.Tensor, rp: RowParams, scale: torch.Tensor, uniforms: torch.Tensor):
    """Full sampling step: model logits (2B or B, V; see `combine_guidance_pairs`), guidance scales
    (B, 1) and uniforms (B,) -> (B,) tokens. No host synchronisation."""
    return sample_filtered(combine_guidance_pairs(logits.float(), rp, scale), rp, uniforms)
