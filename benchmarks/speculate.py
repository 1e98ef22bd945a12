"""Lossless additions to speculative Jacobi decoding: draft trees, maximal-coupling redrafts, windows.

Contract: `speculative_decode(gpt, cond, cond_mask, params, spec, generator=...)` returns (B, N)
int64 tokens distributed exactly as autoregressive sampling with `params`
(`argen.sampling.reference_generate`), with top_k=1 exactly the greedy tokens, and per-image counts
(forward passes, tokens gained per pass). `Spec` picks the pieces:

- window W: the spine, as in `argen.engine.jacobi` (W inputs: the last accepted token and W-1
  drafts of the next positions).
- candidates K, depth D (a draft tree at the first unverified position n, the position after the
  last rejection): besides the spine's draft d_n, K-1 more candidates for token n, drawn from the
  same proposal q_n without replacement, each followed by D-1 tokens (the spine's drafts of
  n+1..n+D-1). All tree nodes go through the same forward (a tree attention mask: a node sees the
  accepted prefix and its own ancestors; extra branches write their keys/values to scratch cache
  slots after the grid, copied into place when their branch is accepted). Token n is decided by
  recursive rejection sampling over the candidates (`first_token`); the accepted branch's later
  tokens are verified against that branch's own outputs, which saw the accepted candidate.
- coupling "gumbel" (argen's Jacobi: a redraft is argmax(log q + g) with noise g kept per position)
  or "max" (SJD-PAC's adaptive continuation, as a coupling: past the new token, the old draft d_j
  of each position is kept with probability min(1, p_j(d_j) / q_j(d_j)), where p_j is this
  forward's output at j, else replaced by a draw from max(0, p_j - q_j); the result is a draw from
  p_j, recorded as the new proposal). Either way nothing past the first rejection is committed:
  p_j there was computed with a rejected draft in context (see docs/engine.md, "What cannot be
  made exact").

It lives in benchmarks/, outside the package, so that argen keeps one decode loop (argen.engine's
SlotDecoder); it is the phase-A form of these pieces: pure functions (`tree_layout`, `tree_mask`,
`extra_candidates`, `first_token`, `chain`, `couple`, `commit_branch_cache`) and one eager loop
(`speculative_decode`) that tests and `benchmarks/bench_speculate.py` run; the pieces are meant to
become the engine's Jacobi step policy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from argen.engine.jacobi import _accept, _draw, _gumbel
from argen.models.gpt import GPT
from argen.sampling.logits import SamplingParams, guidance_scale_at, guided_logits, process_logits
from argen.sampling.reference import prepare_condition
from argen.utils.errors import ArgenError

COUPLINGS = ("gumbel", "max")


@dataclass(frozen=True)
class Spec:
    window: int = 8
    candidates: int = 1  # K: candidates for a token (the spine's draft and K-1 alternatives; 1 = no tree)
    depth: int = 1  # D: tokens on each alternative's branch (the alternative, then D-1 spine drafts)
    groups: int = 1  # G: spine positions n..n+G-1 that carry alternatives (W-1: all)
    coupling: str = "gumbel"

    def check(self, num_tokens: int) -> Spec:
        if self.coupling not in COUPLINGS:
            raise ArgenError(f"coupling must be one of {COUPLINGS}, got {self.coupling!r}")
        if self.window < 2 or min(self.candidates, self.depth, self.groups) < 1 or num_tokens < 3:
            raise ArgenError(f"window >= 2, candidates, depth, groups >= 1 and 3 tokens or more, got {self}")
        window = min(int(self.window), num_tokens - 1)  # the moved-back window needs one accepted token
        tree = self.candidates > 1
        return Spec(window, self.candidates, min(self.depth, window - 1) if tree else 1,
                    min(self.groups, window - 1) if tree else 1, self.coupling)


@dataclass
class SpecResult:
    tokens: torch.Tensor  # (B, N) int64
    forwards: torch.Tensor  # (B,) forward passes per image, prefill included
    gained: torch.Tensor  # (W + 1,) int64: passes (after the prefill) that added 0..W tokens
    rescues: torch.Tensor  # (K + 1,) int64: passes with no rejection, a rejection no alternative
    # rescued (or no alternatives there), and rescued by alternative 1..K-1


# ---------------------------------------------------------------- the tree
def tree_layout(window: int, candidates: int, depth: int, groups: int, device=None) -> dict:
    """The fixed tree of one iteration. Input 0 is the last accepted token (the root), inputs 1..W-1
    the spine (the drafts of tokens n..n+W-2); then, for g < G and b = 1..K-1, branch (g, b): the
    alternative for token n+g (a child of spine input g) and D-1 tokens after it, at inputs
    W + ((g (K-1) + b-1) D + t. Returns depth (T,) (tokens after the root), branch (T,) (0 = spine,
    else 1 + g (K-1) + b-1), step (T,) (t on a branch) and ancestors (T, T) bool (self included)."""
    per = (candidates - 1) * depth
    size = window + groups * per
    g = torch.arange(groups).repeat_interleave(per)
    t = torch.arange(depth).repeat(groups * (candidates - 1))
    node_depth = torch.cat([torch.arange(window), g + 1 + t])
    branch = torch.cat([torch.zeros(window, dtype=torch.long), 1 + torch.arange(groups * (candidates - 1))
                        .repeat_interleave(depth)])
    step = torch.cat([torch.zeros(window, dtype=torch.long), t])
    parent = torch.arange(size) - 1
    parent[window:] = torch.where(t == 0, g, parent[window:])
    ancestors = torch.eye(size, dtype=torch.bool)
    for node in range(1, size):
        ancestors[node] |= ancestors[parent[node]]
    return dict(depth=node_depth.to(device), branch=branch.to(device), step=step.to(device),
                ancestors=ancestors.to(device))


def tree_inputs(spine: torch.Tensor, alternatives: torch.Tensor, depth: int) -> torch.Tensor:
    """Tokens of inputs 1..T-1: the spine drafts (A, W-1), then for each alternative (A, G, K-1) of
    token n+g the alternative and the spine's drafts of tokens n+g+1..n+g+D-1 (past the spine: its
    last draft, never verified)."""
    count, groups, others = alternatives.shape
    later = (torch.arange(groups, device=spine.device)[:, None] + 1 + torch.arange(depth - 1, device=spine.device))
    tails = spine[:, later.clamp(max=spine.shape[1] - 1)]  # (A, G, D-1)
    tails = tails[:, :, None].expand(count, groups, others, depth - 1)
    return torch.cat([spine, torch.cat([alternatives[..., None], tails], dim=-1).flatten(1)], dim=1)


def tree_slots(root: torch.Tensor, layout: dict, scratch: int, depth: int) -> torch.Tensor:
    """Cache slot of every input (R, T) for roots at slot `root` (R,): the root and spine at their
    positions, branch k at scratch + (k-1) D + t."""
    d, b = layout["depth"], layout["branch"]
    return torch.where(b == 0, root[:, None] + d, scratch + (b - 1).clamp(min=0) * depth + layout["step"])


def tree_mask(key_valid: torch.Tensor, root: torch.Tensor, slots: torch.Tensor, ancestors: torch.Tensor,
              kv_len: int) -> torch.Tensor:
    """(R, 1, T, kv_len) bool: each input sees the valid keys before the root's slot and the slots of
    its own ancestors (itself included), nothing else."""
    keys = torch.arange(kv_len, device=root.device)
    prefix = (keys < root[:, None]) & key_valid[:, :kv_len]  # (R, kv)
    onehot = (slots[..., None] == keys).float()  # (R, T, kv)
    tree = torch.einsum("ij,rjk->rik", ancestors.float(), onehot) > 0
    return (prefix[:, None] | tree)[:, None]


def commit_branch_cache(cache: list[torch.Tensor], branch_slots: torch.Tensor, target: torch.Tensor,
                        copy: torch.Tensor) -> None:
    """Move an accepted branch's keys/values into place: for each row, slots branch_slots (R, D)
    -> target (R, D) where copy (R, D) is True."""
    for layer in cache:  # (2, R, H, S, Dh)
        _, rows, heads, _, dim = layer.shape
        src = branch_slots[None, :, None, :, None].expand(2, rows, heads, -1, dim)
        dst = target[None, :, None, :, None].expand(2, rows, heads, -1, dim)
        moved = torch.where(copy[None, :, None, :, None], layer.gather(3, src), layer.gather(3, dst))
        layer.scatter_(3, dst, moved)


# ---------------------------------------------------------------- verification
def extra_candidates(q0: torch.Tensor, first: torch.Tensor, count: int, gumbel: torch.Tensor):
    """`count` more candidates (..., count) for a token whose first candidate `first` (...) was drawn
    from q0 (..., V), with fresh Gumbel noise (..., V): Gumbel-top-k over q0 without `first`, i.e.
    successive draws without replacement. valid (..., count): the candidate has positive proposal
    mass (else it is not tested)."""
    scores = (q0.log() + gumbel).scatter(-1, first[..., None], float("-inf"))
    picked = scores.topk(count, dim=-1).indices
    return picked, q0.gather(-1, picked) > 0


def _reject_update(r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The target after a candidate drawn from q is rejected: max(0, r - q), normalised."""
    rest = (r - q).clamp(min=0.0)
    total = rest.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, rest / total.clamp(min=1e-30), r)


def first_token(p: torch.Tensor, q: torch.Tensor, candidates: torch.Tensor, valid: torch.Tensor,
                uniforms: torch.Tensor):
    """Recursive rejection sampling of one token from p (A, V) with candidates (A, K) drawn from q
    (A, V) without replacement (candidate k from q without candidates 0..k-1). Candidate k is kept
    with probability min(1, r_k(c) / q_k(c)); after a rejection r_{k+1} = norm(max(0, r_k - q_k)).
    Returns (winner (A,) in 0..K-1, or K when all are rejected or none valid, the final target r
    (A, V) to draw from when none won)."""
    count, k_max = candidates.shape
    r, qk = p, q
    winner = torch.full((count,), k_max, dtype=torch.long, device=p.device)
    for k in range(k_max):
        c = candidates[:, k:k + 1]
        test = valid[:, k] & (winner == k_max)
        keep = test & _accept(uniforms[:, k], qk.gather(-1, c)[:, 0], r.gather(-1, c)[:, 0])
        winner = torch.where(keep, k, winner)
        rejected = (test & ~keep)[:, None]
        r = torch.where(rejected, _reject_update(r, qk), r)
        without = qk.scatter(-1, c, 0.0)
        qk = torch.where(rejected, without / without.sum(dim=-1, keepdim=True).clamp(min=1e-30), qk)
    return winner, r


def chain(p: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor, checked: torch.Tensor, uniforms: torch.Tensor,
          draws: torch.Tensor):
    """Left-to-right verification of a chain whose context is exact up to its first draft.

    p (A, L+1, V): p[:, i] the distribution of draft i (i < L) and of the token after the last;
    drafts (A, L) drawn from q (A, L, V); checked (A, L): drafts that may be tested (a leading run);
    uniforms (A, L) tests, draws (A, L+1) uniforms for the closing draw. Returns (count (A,) tokens
    committed, 1..L+1; tokens (A, L+1), valid up to count: the leading accepted drafts, then a draw
    from max(0, p - q) at the first rejection, or from p after the last checked draft; rejected (A,)
    bool; the closing draw's distribution (A, V))."""
    count, length, vocab = p.shape[0], drafts.shape[1], p.shape[-1]
    if length:
        keep = _accept(uniforms, q.gather(-1, drafts[..., None])[..., 0],
                       p[:, :length].gather(-1, drafts[..., None])[..., 0]) & checked
        lead = keep.long().cumprod(dim=1).sum(dim=1)  # (A,)
        rejected = lead < checked.long().sum(dim=1)
        at = lead[:, None, None].expand(count, 1, vocab)
        p_at = p.gather(1, at)[:, 0]
        q_at = torch.cat([q, q.new_zeros(count, 1, vocab)], dim=1).gather(1, at)[:, 0]
        weights = torch.where(rejected[:, None], _reject_update(p_at, q_at), p_at)
    else:
        lead = torch.zeros(count, dtype=torch.long, device=p.device)
        weights = p[:, 0]
    last = _draw(weights, draws.gather(1, lead[:, None])[:, 0])
    tokens = torch.cat([drafts, drafts.new_zeros(count, 1)], dim=1).scatter(1, lead[:, None], last[:, None])
    return lead + 1, tokens, rejected if length else torch.zeros_like(lead, dtype=torch.bool), weights


def couple(old: torch.Tensor, q_old: torch.Tensor, p_new: torch.Tensor, uniforms: torch.Tensor,
           draws: torch.Tensor) -> torch.Tensor:
    """Maximal coupling: a draw from p_new (..., V) that keeps `old` (...,), a draw from q_old, with
    probability min(1, p_new(old) / q_old(old)) and else draws from max(0, p_new - q_old)."""
    keep = _accept(uniforms, q_old.gather(-1, old[..., None])[..., 0], p_new.gather(-1, old[..., None])[..., 0])
    return torch.where(keep, old, _draw(_reject_update(p_new, q_old), draws))




# ---------------------------------------------------------------- the loop
def _numbers(spec: Spec, vocab: int) -> dict:
    """Sizes of one iteration's uniforms per image, in draw order."""
    w, k, g = spec.window, spec.candidates, spec.groups
    return dict(chain=w - 1, draws=w, alternatives=k - 1, head=1, branch=spec.depth - 1, branch_draws=spec.depth,
                couple=w - 1, couple_draws=w - 1, gumbel=g * vocab if k > 1 else 0,
                noise=(w - 1) * vocab if spec.coupling == "gumbel" else 0)


def _split(u: torch.Tensor, sizes: dict) -> dict:
    out, at = {}, 0
    for name, size in sizes.items():
        out[name] = u[:, at:at + size]
        at += size
    return out


def _twins(twins: int, x: torch.Tensor) -> torch.Tensor:
    """(A, ...) -> (twins A, ...): the rows of the cond images, then those of their uncond twins."""
    return x.repeat(twins, *[1] * (x.ndim - 1))


def _probs(params: SamplingParams, scales: torch.Tensor, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(twins A, T, V) float32 logits of image tokens `index` (A, T) -> (A, T, V) sampling
    probabilities: guided with the scale of each token's index, then temperature, top-k, top-p."""
    if params.guided:
        count = index.shape[0]
        logits = guided_logits(logits[:count], logits[count:], scales[index][..., None])
    return process_logits(logits, params.temperature, params.top_k, params.top_p).softmax(dim=-1)


def _pick(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (A, M, ...) at index (A,) -> (A, ...)."""
    return x[torch.arange(x.shape[0], device=x.device), index]


def speculative_decode(gpt: GPT, cond: torch.Tensor, cond_mask: torch.Tensor | None = None,
                       params: SamplingParams = SamplingParams(), spec: Spec = Spec(),
                       generator: torch.Generator | None = None, max_new_tokens: int | None = None,
                       row_generators: list[torch.Generator] | None = None) -> SpecResult:
    """Sample (B, max_new_tokens) tokens with draft trees and the chosen coupling (module docstring).
    One batch, eager: the measurement and test loop of these pieces. Each pass draws every image's
    numbers as one row of a draw from `generator`, or from the image's own generator
    (`row_generators`: then an image's tokens do not depend on its batch)."""
    cfg = gpt.config
    num_tokens, cond_len, vocab = cfg.num_image_tokens, cfg.cond_len, cfg.vocab_size
    max_new = num_tokens if max_new_tokens is None else int(max_new_tokens)
    spec = spec.check(num_tokens)
    w, k_max, depth, groups = spec.window, spec.candidates, spec.depth, spec.groups
    device = gpt.tok_embeddings.weight.device
    with torch.inference_mode():
        rows, key_mask = prepare_condition(gpt, cond, cond_mask, params.guided)
        batch = cond.shape[0]
        twins = 2 if params.guided else 1
        repeat = functools.partial(_twins, twins)
        probs = functools.partial(_probs, params,
                                  torch.tensor([guidance_scale_at(params, i, num_tokens) for i in range(num_tokens)],
                                               dtype=torch.float32, device=device))
        scratch = cond_len + num_tokens
        cache_len = scratch + groups * (k_max - 1) * depth
        cache = gpt.new_cache(rows.shape[0], cache_len)
        key_valid = torch.ones(rows.shape[0], cache_len, dtype=torch.bool, device=device)
        if key_mask is not None:
            key_valid[:, :cond_len] = key_mask
        layout = tree_layout(w, k_max, depth, groups, device)
        sizes = _numbers(spec, vocab)

        if row_generators is not None and len(row_generators) != batch:
            raise ArgenError(f"{len(row_generators)} row generators for {batch} rows")

        def numbers(count: int) -> dict:
            size = sum(sizes.values())
            if row_generators is None:
                return _split(torch.rand(count, size, generator=generator, device=device), sizes)
            return _split(torch.stack([torch.rand(size, generator=row_generators[i], device=device)
                                       for i in ids.tolist()]), sizes)

        # prefill: token 0 from p_0, the first drafts drawn from p_0
        prefix = torch.arange(cond_len, device=device)
        mask = ((prefix <= prefix[:, None])[None] & key_valid[:, None, :cond_len]) | (prefix == prefix[:, None])[None]
        logits = gpt.forward_cached(gpt.embed_condition(rows), prefix, cache, cond_len, mask[:, None])[:, -1:]
        p0 = probs(logits, torch.zeros(batch, 1, dtype=torch.long, device=device))[:, 0]  # (B, V)
        ids = torch.arange(batch, device=device)
        u = numbers(batch)
        canvas = torch.zeros(batch, num_tokens + w + depth, dtype=torch.long, device=device)
        canvas[:, 0] = _draw(p0, u["draws"][:, 0])
        q = p0[:, None].expand(batch, w - 1, vocab).contiguous()
        noise = _gumbel(u["noise"]).view(batch, w - 1, vocab) if spec.coupling == "gumbel" else None
        canvas[:, 1:w] = (q.log() + noise).argmax(-1) if noise is not None else _draw(q, u["couple_draws"])
        n = torch.ones(batch, dtype=torch.long, device=device)
        out = torch.empty(batch, max_new, dtype=torch.long, device=device)
        forwards = torch.ones(batch, dtype=torch.long)
        gained = torch.zeros(w + 1, dtype=torch.long)
        rescues = torch.zeros(k_max + 1, dtype=torch.long)
        steps = torch.arange(w + depth, device=device)
        last_slot = canvas.shape[1] - 1

        while True:
            done = n >= max_new
            if bool(done.any()):
                out[ids[done]] = canvas[done, :max_new]
                keep = ~done
                if not bool(keep.any()):
                    break
                row_keep = keep.repeat(twins)
                cache = [layer[:, row_keep] for layer in cache]
                key_valid = key_valid[row_keep]
                canvas, q, n, ids = canvas[keep], q[keep], n[keep], ids[keep]
                noise = None if noise is None else noise[keep]
            count = ids.shape[0]
            rows_of = torch.arange(count, device=device)
            u = numbers(count)
            start = n.clamp(max=num_tokens - w)
            offset = n - start  # > 0 only where the window was moved back at the end of the grid
            length = w - offset
            tree = offset == 0
            spine = canvas.gather(1, n[:, None] + steps[:w - 1])  # drafts d_n..d_{n+W-2}
            spine_in = canvas.gather(1, start[:, None] + steps[:w - 1])  # the window's inputs 1..W-1
            if k_max > 1:  # K-1 alternatives per grouped position, without replacement after the draft
                gumbel = _gumbel(u["gumbel"]).view(count, groups, vocab)
                alternatives, valid = extra_candidates(q[:, :groups], spine[:, :groups], k_max - 1, gumbel)
                valid &= tree[:, None, None]
            else:
                alternatives = spine.new_zeros(count, groups, 0)
            inputs = torch.cat([canvas.gather(1, start[:, None] - 1), tree_inputs(spine_in, alternatives, depth)], 1)
            root = repeat(cond_len + start - 1)  # (R,) slot and position of the root
            positions = (root[:, None] + layout["depth"]).clamp(max=scratch - 1)
            slots = tree_slots(root, layout, scratch, depth)
            mask = tree_mask(key_valid, root, slots, layout["ancestors"], cache_len)
            logits = gpt.forward_cached(repeat(gpt.embed_tokens(inputs)), positions, cache, cache_len, mask,
                                        slots=slots)
            p = probs(logits, (start[:, None] + layout["depth"]).clamp(max=num_tokens - 1))  # (A, T, V)
            align = (offset[:, None] + steps[:w]).clamp(max=w - 1)
            p_spine = p[:, :w].gather(1, align[..., None].expand(count, w, vocab))  # p_spine[:, i]: token n+i

            # the spine: leading accepted drafts, then a rejection at n + lead (or the bonus token)
            checked = steps[None, :w - 1] < (length - 1)[:, None]
            s_count, new, rejected, r = chain(p_spine, spine, q, checked, u["chain"], u["draws"])
            lead = s_count - 1
            gain = s_count
            new = torch.cat([new, new.new_zeros(count, depth)], dim=1)  # (A, W + D): tokens n..
            status = torch.where(rejected, 1, 0)
            if k_max > 1:  # a rejection at a grouped position: its alternatives, by recursive rejection
                at = lead.clamp(max=groups - 1)
                tried = rejected & (lead < groups)
                q_at = _pick(q, lead.clamp(max=w - 2))
                q_rest = q_at.scatter(-1, _pick(spine, lead.clamp(max=w - 2))[:, None], 0.0)
                q_rest = q_rest / q_rest.sum(-1, keepdim=True).clamp(min=1e-30)
                winner, r_last = first_token(r, q_rest, _pick(alternatives, at), _pick(valid, at) & tried[:, None],
                                             u["alternatives"])
                won = winner < k_max - 1
                b = winner.clamp(max=k_max - 2)
                head = torch.where(won, _pick(alternatives, at).gather(1, b[:, None])[:, 0],
                                   _draw(r_last, u["head"][:, 0]))
                new = torch.where(tried[:, None], new.scatter(1, lead[:, None], head[:, None]), new)
                # the winning branch: its later tokens against its own outputs
                branch = 1 + at * (k_max - 1) + b  # (A,) branch id
                nodes = w + (branch - 1)[:, None] * depth + steps[:depth]  # (A, D) its inputs
                p_branch = p.gather(1, nodes[..., None].expand(count, depth, vocab))  # p of tokens n+lead+1..
                later = (lead[:, None] + 1 + steps[:depth - 1]).clamp(max=w - 2)
                b_checked = (lead[:, None] + 1 + steps[:depth - 1]) < (length - 1)[:, None]
                b_count, b_tokens, _, _ = chain(p_branch, spine.gather(1, later),
                                                q.gather(1, later[..., None].expand(count, depth - 1, vocab)),
                                                b_checked, u["branch"], u["branch_draws"])
                new = torch.where(won[:, None], new.scatter(1, lead[:, None] + 1 + steps[:depth], b_tokens), new)
                gain = torch.where(won, gain + b_count, gain)
                status = torch.where(won, 2 + b, status)
                # its keys/values into place (tokens n+lead.. of the branch that were committed)
                src = repeat(scratch + (branch - 1)[:, None] * depth + steps[:depth])
                dst = (root[:, None] + 1 + repeat(lead)[:, None] + steps[:depth]).clamp(max=scratch - 1)
                commit_branch_cache(cache, src, dst, repeat(won[:, None] & (steps[:depth] < b_count[:, None])))
            index = (n[:, None] + steps).clamp(max=last_slot)
            canvas.scatter_(1, index, torch.where(steps < gain[:, None], new, canvas.gather(1, index)))

            # the next drafts, for tokens n + gain onwards, from the accepted path's outputs
            ahead = gain[:, None] + steps[:w - 1]  # token n + ahead
            p_next = p_spine.gather(1, ahead.clamp(max=w - 1)[..., None].expand(count, w - 1, vocab))
            if k_max > 1:
                t = ahead - lead[:, None] - 1  # branch input t gives p of token n + lead + 1 + t
                on_branch = won[:, None] & (t < depth)
                p_next = torch.where(on_branch[..., None],
                                     p_branch[rows_of[:, None], t.clamp(min=0, max=depth - 1)], p_next)
            has_old = ahead < w - 1
            old_index = ahead.clamp(max=w - 2)
            if noise is not None:
                kept = noise.gather(1, old_index[..., None].expand_as(noise))
                noise = torch.where(has_old[..., None], kept, _gumbel(u["noise"]).view(count, w - 1, vocab))
                redraft = (p_next.log() + noise).argmax(-1)
            else:
                coupled = couple(spine.gather(1, old_index), q.gather(1, old_index[..., None].expand_as(q)), p_next,
                                 u["couple"], u["couple_draws"])
                redraft = torch.where(has_old, coupled, _draw(p_next, u["couple_draws"]))
            q = p_next
            n = n + gain
            canvas.scatter_(1, (n[:, None] + steps[:w - 1]).clamp(max=last_slot), redraft)
            forwards[ids.cpu()] += 1
            gained += torch.bincount(gain.cpu(), minlength=w + 1)[:w + 1]
            rescues += torch.bincount(status.cpu(), minlength=k_max + 1)
    return SpecResult(out.clone(), forwards, gained, rescues)
