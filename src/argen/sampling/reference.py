"""The reference sampler: a plain KV-cache loop, one token per step, obviously right.

For each step it runs the conditional and (when guided) unconditional rows in one batch, combines
their logits, filters them with `process_logits` and draws with `torch.multinomial` from the
caller's generator. The fast engine is tested against this function.
"""

from __future__ import annotations

import torch

from argen.models.gpt import GPT
from argen.sampling.logits import SamplingParams, guidance_scale_at, guided_logits, process_logits


def prepare_condition(model: GPT, cond: torch.Tensor, cond_mask: torch.Tensor | None, guided: bool):
    """Validate the condition; return (cond rows, key mask (B', cond_len) bool or None), with the
    unconditional rows appended when guided. The uncond rows reuse their twin's caption mask."""
    model.check_condition(cond, cond_mask)
    device = model.tok_embeddings.weight.device
    cond = cond.to(device)
    batch = cond.shape[0]
    if model.config.kind == "t2i" and cond_mask is None:
        cond_mask = torch.ones(cond.shape[:2], device=device)
    if guided:
        cond = torch.cat([cond, model.null_condition(batch, device).to(cond.dtype)])
        if cond_mask is not None:
            cond_mask = torch.cat([cond_mask, cond_mask])
    key_mask = None if cond_mask is None else cond_mask.to(device).bool()
    return cond, key_mask


def _step_mask(key_mask: torch.Tensor | None, positions: torch.Tensor, kv_len: int) -> torch.Tensor | None:
    """(B, 1, T, kv_len) boolean mask for queries at `positions`: causal, padded prefix hidden,
    each query sees itself."""
    if key_mask is None and positions.numel() == 1:
        return None
    device = positions.device
    keys = torch.arange(kv_len, device=device)
    allowed = keys[None, :] <= positions[:, None]  # (T, kv_len)
    if key_mask is None:
        return allowed[None, None]
    valid = torch.ones(key_mask.shape[0], kv_len, dtype=torch.bool, device=device)
    valid[:, :key_mask.shape[1]] = key_mask
    mask = allowed[None] & valid[:, None, :]
    mask |= keys[None, None, :] == positions[None, :, None]
    return mask[:, None]


@torch.no_grad()
def reference_generate(model: GPT, cond: torch.Tensor, cond_mask: torch.Tensor | None = None,
                       cfg_scale: float = 1.0, cfg_interval: int = -1, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0, generator: torch.Generator | None = None,
                       max_new_tokens: int | None = None, cfg_schedule: str = "constant",
                       cfg_power: float = 1.0, forced_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Sample (B, max_new_tokens) image tokens (default: the full grid).

    forced_tokens: (B, max_new_tokens) int64, a token to keep (>= 0) or -1 where it is sampled; a kept
    token replaces the draw at its position (one token per forward, the plain loop: the oracle of
    the engine's forced tokens)."""
    params = SamplingParams(cfg_scale, cfg_interval, cfg_schedule, cfg_power, temperature, top_k, top_p)
    cfg = model.config
    num_tokens = cfg.num_image_tokens
    max_new_tokens = num_tokens if max_new_tokens is None else max_new_tokens
    rows, key_mask = prepare_condition(model, cond, cond_mask, params.guided)
    batch = cond.shape[0]
    cache = model.new_cache(rows.shape[0], cfg.cond_len + num_tokens)
    device = rows.device
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)

    h = model.embed_condition(rows)
    positions = torch.arange(cfg.cond_len, device=device)
    for step in range(max_new_tokens):
        kv_len = int(positions[-1]) + 1
        logits = model.forward_cached(h, positions, cache, kv_len, _step_mask(key_mask, positions, kv_len))
        logits = logits[:, -1]  # (B', V)
        if params.guided:
            cond_logits, uncond_logits = logits.split(batch)
            logits = guided_logits(cond_logits, uncond_logits, guidance_scale_at(params, step, num_tokens))
        probs = process_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
        token = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        if forced_tokens is not None:
            kept = forced_tokens[:, step:step + 1].to(device)
            token = torch.where(kept >= 0, kept, token)
        out[:, step] = token[:, 0]
        tokens = torch.cat([token, token]) if params.guided else token
        h = model.embed_tokens(tokens)
        positions = positions[-1:] + 1
    return out
