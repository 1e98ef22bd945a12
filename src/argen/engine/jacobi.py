"""Speculative Jacobi decoding: several image tokens per forward pass, the same distribution.

Contract: `jacobi_generate(gpt, cond, cond_mask, params, window=W, ...)` returns (B, N) int64
tokens distributed exactly as autoregressive sampling with the same `SamplingParams`
(`argen.sampling.reference_generate`), and with top_k=1 exactly the greedy tokens.
`jacobi_decode` returns the same tokens with counts (forward passes per image, drafts, accepts).

Per image the state is the accepted prefix x_0..x_{n-1} (the keys/values of x_0..x_{n-2} are in
the KV cache) and W-1 draft tokens d_n..d_{n+W-2}, each drawn from a recorded proposal q_i. One
iteration is one forward of the model (`GPT.forward_cached`, all images and their guidance twins
together, each row at its own positions):
1. the inputs [x_{n-1}, d_n, ..., d_{n+W-2}] give p_n..p_{n+W-1}, p_i being the final sampling
   distribution of token i given the inputs before it: guidance at index i (its interval and
   schedule), then temperature, top-k and top-p, exactly as the reference computes it. The cond and
   uncond rows of an image are fed the same tokens, so a guidance pair is verified together.
2. Drafts are verified left to right: d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)).
   While every earlier draft is accepted, p_i is the true conditional of token i.
3. At the first rejection i, x_i is drawn from max(0, p_i - q_i), normalised; if all W-1 drafts are
   accepted, x_{n+W-1} is drawn from p_{n+W-1}. An iteration thus adds 1 to W tokens.
4. The positions after the new token get new drafts, drawn from this forward's p of the same
   position (computed with partly rejected drafts as context: a proposal, not the target) or, past
   the window, from the last p computed; each draft's proposal is recorded as its q.
Drafts are Gumbel-max draws, argmax(log q_i + g_i), where the noise g_i (V Gumbels) is drawn once
when token i enters the window and kept until token i is verified (a coupling: a redraft from a
slightly changed q mostly repeats the previous draft, so the context of later drafts settles as in
greedy Jacobi iteration). g_i is used for nothing else, and neither q_i nor the accepted prefix
x_{<i} depends on it (q_i comes from outputs that see only inputs before i), so given x_{<i} the
draft is an exact sample of q_i, verified with fresh uniforms. The speculative-sampling identity
then gives P(x_i = v | x_{<i}) = min(p_i(v), q_i(v)) + the residual's share = p_i(v). Greedy (p
one-hot): a draft is kept iff it is the argmax and the residual of a rejection is the argmax itself.

Keys/values written for rejected drafts lie at positions >= the new prefix length; the next forward
rewrites them before any query can see them (attention is causal by position), so they never leak.
Near the end of the grid the window is moved back so that it stays W positions long; the accepted
tokens it covers again are rewritten with the same values and their outputs ignored.

Randomness: each image draws W + (W-1) V uniforms per iteration (W-1 verification tests, one
residual or bonus draw by inverse CDF as in `argen.engine.sampler`, and the Gumbel noise of the
tokens entering the window), from its own generator (row_generators) or as one row of a draw from
`generator`. With row generators an image's tokens do not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from argen.engine.sampler import _inverse_cdf
from argen.models.gpt import GPT
from argen.sampling.logits import SamplingParams, guidance_scale_at, guided_logits, process_logits
from argen.sampling.reference import prepare_condition
from argen.utils.errors import ArgenError

DEFAULT_WINDOW = 8
DECODE_MODES = ("ar", "jacobi")


@dataclass
class JacobiResult:
    tokens: torch.Tensor  # (B, N) int64
    forwards: torch.Tensor  # (B,) int64: forward passes each image took, prefill included
    model_calls: int  # batched forward passes of the model
    drafted: int  # drafts verified
    accepted: int  # drafts accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)


def check_decode(decode: str, window: int | None) -> int | None:
    """Validate a decode mode and window; returns the window to use (None for 'ar')."""
    if decode not in DECODE_MODES:
        raise ArgenError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    if decode == "ar":
        if window is not None:
            raise ArgenError("window applies to decode='jacobi' only")
        return None
    window = DEFAULT_WINDOW if window is None else window
    if isinstance(window, bool) or int(window) != window or window < 1:
        raise ArgenError(f"window must be an integer >= 1, got {window}")
    return int(window)


def _accept(uniforms: torch.Tensor, q_draft: torch.Tensor, p_draft: torch.Tensor) -> torch.Tensor:
    """The speculative-sampling test: keep a draft with probability min(1, p/q) (q > 0: it was drawn)."""
    return uniforms * q_draft < p_draft


def _visible(key_valid: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """(B', 1, T, kv_len) bool for queries at `positions` (B', T): causal by position, padded caption
    slots hidden from all but themselves."""
    keys = torch.arange(kv_len, device=positions.device)
    visible = (keys <= positions[..., None]) & key_valid[:, None, :kv_len]  # (B', T, kv)
    visible |= keys == positions[..., None]
    return visible[:, None]


def _draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One index per row of unnormalised weights (..., V) with one uniform each -> (...,) int64."""
    shape = weights.shape[:-1]
    return _inverse_cdf(weights.reshape(-1, weights.shape[-1]), uniforms.reshape(-1))[:, 0].view(shape)


def verify(p: torch.Tensor, length: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor, uniforms: torch.Tensor):
    """One verification step for A images.

    p (A, W, V): p[:, i] is the final distribution of token n+i, valid for i < length (A,) >= 1;
    drafts (A, W-1) for tokens n..n+W-2 with their proposals q (A, W-1, V); uniforms (A, >= W).
    Returns (accepted drafts a (A,), the token at n+a (A,), the proposals (A, W-1, V) of the next
    drafts, tokens n+a+1..n+a+W-1).
    """
    count, width, vocab = p.shape
    n_drafts = width - 1
    index = torch.arange(width, device=p.device)
    if n_drafts:
        p_draft = p[:, :n_drafts].gather(-1, drafts[..., None])[..., 0]  # (A, W-1)
        q_draft = q.gather(-1, drafts[..., None])[..., 0]
        checked = index[None, :n_drafts] < (length - 1)[:, None]
        keep = _accept(uniforms[:, :n_drafts], q_draft, p_draft) & checked
        accepted = keep.long().cumprod(dim=1).sum(dim=1)  # (A,) leading accepted drafts
    else:
        accepted = torch.zeros(count, dtype=torch.long, device=p.device)
    at = accepted[:, None, None].expand(count, 1, vocab)
    p_at = p.gather(1, at)[:, 0]  # (A, V)
    if n_drafts:
        q_at = torch.cat([q, q.new_zeros(count, 1, vocab)], dim=1).gather(1, at)[:, 0]
        rejected = (accepted < length - 1)[:, None]
        residual = torch.where(rejected, (p_at - q_at).clamp_(min=0.0), p_at)
        residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_at)
    else:
        residual = p_at
    token = _draw(residual, uniforms[:, n_drafts])
    source = (accepted[:, None] + 1 + index[None, :n_drafts]).minimum(length[:, None] - 1)  # (A, W-1)
    return accepted, token, p.gather(1, source[..., None].expand(count, n_drafts, vocab))


def shift_noise(noise: torch.Tensor, fresh: torch.Tensor, advance: torch.Tensor) -> torch.Tensor:
    """Draft noise (A, W-1, V) of tokens n.. -> that of tokens n+advance..: a token keeps its noise
    while it stays in the window; tokens entering it take `fresh` noise (A, W-1, V)."""
    n_drafts = noise.shape[1]
    source = advance[:, None] + torch.arange(n_drafts, device=noise.device)  # (A, W-1)
    kept = noise.gather(1, source.clamp(max=max(n_drafts - 1, 0))[..., None].expand_as(noise))
    return torch.where((source < n_drafts)[..., None], kept, fresh)


def draft(q: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Gumbel-max draws (A, W-1) from the proposals q (A, W-1, V) with per-token Gumbel noise."""
    return (q.log() + noise).argmax(dim=-1)


def _final_probs(logits: torch.Tensor, params: SamplingParams, scales: torch.Tensor, index: torch.Tensor,
                 count: int) -> torch.Tensor:
    """(R A, T, V) float32 logits of image tokens `index` (A, T) -> (A, T, V) sampling probabilities."""
    if params.guided:
        cond, uncond = logits[:count], logits[count:]
        logits = guided_logits(cond, uncond, scales[index][..., None])
    return process_logits(logits, params.temperature, params.top_k, params.top_p).softmax(dim=-1)


def _random(count: int, width: int, vocab: int, device, generator, row_generators, slots: torch.Tensor):
    """One iteration's numbers per image: W uniforms (A, W) and Gumbel noise (A, W-1, V)."""
    size = width + (width - 1) * vocab
    if row_generators is None:
        u = torch.rand(count, size, generator=generator, device=device)
    else:
        u = torch.stack([torch.rand(size, generator=row_generators[i], device=device) for i in slots.tolist()])
    gumbel = -torch.log(-torch.log(u[:, width:].clamp(min=1e-30)))
    return u[:, :width], gumbel.view(count, width - 1, vocab)


def jacobi_decode(gpt: GPT, cond: torch.Tensor, cond_mask: torch.Tensor | None = None,
                  params: SamplingParams = SamplingParams(), window: int = DEFAULT_WINDOW,
                  generator: torch.Generator | None = None,
                  row_generators: Sequence[torch.Generator] | None = None,
                  max_new_tokens: int | None = None,
                  progress: Callable[[int], None] | None = None, max_batch: int | None = None) -> JacobiResult:
    """Sample (B, max_new_tokens) tokens with Jacobi iterations of `window` positions per forward.

    Images are decoded in chunks of up to `max_batch` (default 64 on a CPU, 256 on a GPU).
    progress: called, per chunk, with the number of tokens by which the slowest image advanced (so
    the calls of a chunk add up to max_new_tokens).
    """
    if not isinstance(params, SamplingParams):
        raise ArgenError("Jacobi decoding takes one SamplingParams for the whole batch")
    device = gpt.tok_embeddings.weight.device
    max_batch = max_batch or (256 if device.type == "cuda" else 64)
    batch = cond.shape[0] if cond.ndim else 0
    if row_generators is not None and len(row_generators) != batch:
        raise ArgenError(f"{len(row_generators)} row generators for {batch} rows")
    parts = []
    with torch.inference_mode():
        for start in range(0, max(batch, 1), max_batch):
            stop = min(batch, start + max_batch)
            parts.append(_decode(gpt, cond[start:stop], None if cond_mask is None else cond_mask[start:stop],
                                 params, window, generator,
                                 None if row_generators is None else list(row_generators)[start:stop],
                                 max_new_tokens, progress))
    return JacobiResult(torch.cat([r.tokens for r in parts]).clone(),  # a normal tensor outside inference mode
                        torch.cat([r.forwards for r in parts]), sum(r.model_calls for r in parts),
                        sum(r.drafted for r in parts), sum(r.accepted for r in parts))


def _decode(gpt, cond, cond_mask, params, window, generator, row_generators, max_new_tokens, progress):
    cfg = gpt.config
    num_tokens = cfg.num_image_tokens
    max_new = num_tokens if max_new_tokens is None else int(max_new_tokens)
    if not 1 <= max_new <= num_tokens:
        raise ArgenError(f"max_new_tokens must lie in [1, {num_tokens}], got {max_new}")
    window = check_decode("jacobi", window)
    device = gpt.tok_embeddings.weight.device
    batch = cond.shape[0] if cond.ndim else 0
    for gen in [generator] + list(row_generators or []):
        if gen is not None and gen.device.type != device.type:
            raise ArgenError(f"the generator is on {gen.device} but the model is on {device}; "
                             f"create it with torch.Generator(device={str(device)!r})")
    rows, key_mask = prepare_condition(gpt, cond, cond_mask, params.guided)
    if batch == 0:
        empty = torch.empty(0, max_new, dtype=torch.long, device=device)
        return JacobiResult(empty, torch.zeros(0, dtype=torch.long), 0, 0, 0)
    width = max(1, min(window, num_tokens - 1))  # the moved-back window needs one accepted token before it
    twins = 2 if params.guided else 1
    cond_len, vocab = cfg.cond_len, cfg.vocab_size
    cache_len = cond_len + num_tokens
    cache = gpt.new_cache(rows.shape[0], cache_len)
    key_valid = torch.ones(rows.shape[0], cache_len, dtype=torch.bool, device=device)
    if key_mask is not None:
        key_valid[:, :cond_len] = key_mask
    scales = torch.tensor([guidance_scale_at(params, i, num_tokens) for i in range(num_tokens)],
                          dtype=torch.float32, device=device)
    steps = torch.arange(width, device=device)
    progress = progress or (lambda steps: None)

    # prefill: the condition prefix gives p_0; token 0 and the first drafts are drawn from it
    prefix_pos = torch.arange(cond_len, device=device).expand(rows.shape[0], cond_len)
    logits = gpt.forward_cached(gpt.embed_condition(rows), prefix_pos[0], cache, cond_len,
                                _visible(key_valid, prefix_pos, cond_len))[:, -1:]
    p = _final_probs(logits, params, scales, torch.zeros(batch, 1, dtype=torch.long, device=device), batch)
    slots = torch.arange(batch, device=device)  # image id of each active slot
    uniforms, noise = _random(batch, width, vocab, device, generator, row_generators, slots)
    ones = torch.ones(batch, dtype=torch.long, device=device)
    q = p.new_zeros(batch, width - 1, vocab)
    _, token, q = verify(p.expand(batch, width, vocab), ones, torch.zeros_like(q[..., 0], dtype=torch.long), q,
                         uniforms)
    drafts = draft(q, noise)
    canvas = torch.zeros(batch, num_tokens + width, dtype=torch.long, device=device)  # accepted, then drafts
    canvas[:, 0] = token
    canvas[:, 1:width] = drafts
    n = ones.clone()  # accepted tokens per slot
    out = torch.empty(batch, max_new, dtype=torch.long, device=device)
    forwards = torch.ones(batch, dtype=torch.long)
    model_calls, drafted, accepted_total = 1, 0, 0
    done_before = 1
    progress(1)

    while True:
        finished = n >= max_new
        if bool(finished.any()):
            out[slots[finished]] = canvas[finished, :max_new]
            keep = ~finished
            if not bool(keep.any()):
                break
            row_keep = keep.repeat(twins)
            cache = [layer[:, row_keep] for layer in cache]
            key_valid, canvas, q, n, slots = key_valid[row_keep], canvas[keep], q[keep], n[keep], slots[keep]
            noise = noise[keep]
        count = slots.shape[0]
        start = n.clamp(max=num_tokens - width)  # first token index the window predicts
        offset = n - start  # > 0 only where the window was moved back
        length = width - offset  # p's from token n on
        inputs = start[:, None] - 1 + steps  # (A, W) token index of each input
        positions = (cond_len + inputs).repeat(twins, 1)  # (R A, W)
        kv_len = int(positions.max()) + 1
        h = gpt.embed_tokens(canvas.gather(1, inputs)).repeat(twins, 1, 1)  # (R A, W, C)
        logits = gpt.forward_cached(h, positions, cache, kv_len, _visible(key_valid, positions, kv_len))
        p = _final_probs(logits, params, scales, start[:, None] + steps, count)  # (A, W, V)
        if bool((offset > 0).any()):
            align = (offset[:, None] + steps).clamp(max=width - 1)
            p = p.gather(1, align[..., None].expand(count, width, vocab))
        drafts = canvas.gather(1, n[:, None] + steps[:width - 1])
        uniforms, fresh = _random(count, width, vocab, device, generator, row_generators, slots)
        accepted, token, q = verify(p, length, drafts, q, uniforms)
        new = n + accepted
        noise = shift_noise(noise, fresh, accepted + 1)
        drafts = draft(q, noise)
        canvas.scatter_(1, new[:, None], token[:, None])
        canvas.scatter_(1, new[:, None] + 1 + steps[:width - 1], drafts)
        n = new + 1
        forwards[slots.cpu()] += 1
        model_calls += 1
        drafted += int((length - 1).sum())
        accepted_total += int(accepted.sum())
        done_now = min(int(n.min()), max_new)
        if done_now > done_before:
            progress(done_now - done_before)
            done_before = done_now
    if done_before < max_new:
        progress(max_new - done_before)
    return JacobiResult(out, forwards, model_calls, drafted, accepted_total)


def jacobi_generate(gpt: GPT, cond: torch.Tensor, cond_mask: torch.Tensor | None = None,
                    params: SamplingParams = SamplingParams(), window: int = DEFAULT_WINDOW, **kwargs) -> torch.Tensor:
    """`jacobi_decode(...).tokens`: (B, max_new_tokens) int64 tokens on the model's device."""
    return jacobi_decode(gpt, cond, cond_mask, params, window, **kwargs).tokens
