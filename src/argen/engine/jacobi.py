"""Speculative Jacobi decoding: several image tokens per forward pass, the same distribution.

Contract: `jacobi_generate(gpt, cond, cond_mask, params, window=W, tree=None, ...)` returns (B, N)
int64 tokens distributed exactly as autoregressive sampling with the same `SamplingParams`
(`argen.sampling.reference_generate`), and with top_k=1 exactly the greedy tokens, with or without
a draft tree (`tree`: a `argen.engine.draft_tree.DraftTree` or its spelling "KxD" / "KxDxG").
`jacobi_decode` returns the same tokens with counts (forward passes per image, drafts, accepts,
rescues by the tree).
Both are static batches over the one decode loop (`argen.engine.batches`, `argen.engine.slots`)
with `JacobiStep` as its step policy; the continuous server uses the same policy.

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

Draft tree (K candidates, depth D, G positions): the same forward also feeds, for each of the
tokens n..n+G-1, K-1 alternatives drawn from its draft's proposal without the draft (`extra_candidates`),
each followed by the D-1 spine drafts after it, under a tree mask, their keys/values in scratch cache
slots after the window (the decoder's cache rows are longer by G (K-1) D: `JacobiStep.scratch_slots`).
At the spine's first rejection i < n+G, x_i is decided by recursive rejection over i's alternatives
against what the rejection left, norm(max(0, p_i - q_i)) (`first_token`); if alternative b wins, its
branch's later tokens are verified against the branch's own outputs (`chain`), its keys/values are
moved into place (`commit_branch_cache`) and the next drafts come from its outputs. Each step is
exact by the same identity (docs/engine.md, "Draft trees"). No tree on a moved-back window; a kept
token is never rejected, so it gets no alternatives.

Keys/values written for rejected drafts lie at positions >= the new prefix length; the next forward
rewrites them before any query can see them (attention is causal by position), so they never leak.
Near the end of the grid the window is moved back so that it stays W positions long; the accepted
tokens it covers again are rewritten with the same values and their outputs ignored.

Randomness: each image draws W + (W-1) V uniforms per iteration (W-1 verification tests, one
residual or bonus draw by inverse CDF as in `argen.engine.sampler`, and the Gumbel noise of the
tokens entering the window), then with a tree K + 2D - 1 + G V more (`DraftTree.numbers`: the
alternatives' tests, a residual draw, the branch's tests and closing draws, the alternatives' Gumbel
noise), from its own generator (row_generators) or as one row of a draw from
`generator`. With row generators an image's tokens do not depend on its batch.

`JacobiStep` is the step policy of `argen.engine.slots.SlotDecoder` that runs this iteration for
every active slot (each at its own n, with its own `SamplingParams`): eager on a CPU, captured as a
CUDA graph per kv bucket and static sampling facts on CUDA, like any step. Between steps the host
draws each active slot's numbers into a static buffer (slots sharing one generator draw together, in
admission order: the order of a static batch's images) and reads the accepted counts back (the
step's one host read). Slots that are not active run a parked window whose outputs are ignored.
The tree's part is fixed-shape for a given (W, K, D, G), with no host read and no draw, so it is
captured with the rest of the iteration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from argen.engine.batches import BatchResult, engine_for
from argen.engine.draft_tree import (
    DraftTree,
    chain,
    commit_branch_cache,
    draw,
    extra_candidates,
    first_token,
    parse_tree,
    reject_update,
    tree_inputs,
    tree_layout,
    tree_mask,
    tree_slots,
)
from argen.engine.sampler import RowParams, combine_guidance_pairs, filtered_weights
from argen.engine.slots import SlotRequest, row_slice
from argen.models.gpt import GPT
from argen.nn.lora import rows_of
from argen.sampling.logits import SamplingParams
from argen.utils.errors import ArgenError

DEFAULT_WINDOW = 8
DECODE_MODES = ("ar", "jacobi")
JacobiResult = BatchResult  # tokens, forwards per image, model calls, drafts verified and accepted


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


def check_tree(decode: str, tree: DraftTree | str | None) -> DraftTree | None:
    """Validate a draft tree (a `DraftTree`, its spelling "KxD" / "KxDxG", or None) for a decode mode."""
    if tree is not None and decode != "jacobi":
        raise ArgenError("a draft tree applies to decode='jacobi' only")
    return parse_tree(tree)


def _visible(key_valid: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """(B', 1, T, kv_len) bool for queries at `positions` (B', T): causal by position, padded caption
    slots hidden from all but themselves."""
    keys = torch.arange(kv_len, device=positions.device)
    visible = (keys <= positions[..., None]) & key_valid[:, None, :kv_len]  # (B', T, kv)
    visible |= keys == positions[..., None]
    return visible[:, None]


def verify(p: torch.Tensor, length: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor, uniforms: torch.Tensor,
           forced: torch.Tensor | None = None):
    """One verification step for A images.

    p (A, W, V): p[:, i] is the final distribution of token n+i, valid for i < length (A,) >= 1;
    drafts (A, W-1) for tokens n..n+W-2 with their proposals q (A, W-1, V); uniforms (A, >= W).
    forced (A, W): kept tokens n..n+W-1 (-1: sampled); a kept draft (the kept token itself) is
    always accepted and a kept token at n+a is given, not drawn.
    Returns (accepted drafts a (A,), the token at n+a (A,), the proposals (A, W-1, V) of the next
    drafts, tokens n+a+1..n+a+W-1).
    """
    count, width, vocab = p.shape
    n_drafts = width - 1
    index = torch.arange(width, device=p.device)
    checked = index[None, :n_drafts] < (length - 1)[:, None]  # (A, W-1)
    gained, tokens, _ = chain(p, drafts, q, checked, uniforms[:, :n_drafts],
                              uniforms[:, n_drafts:n_drafts + 1].expand(count, width), forced)
    accepted = gained - 1
    token = tokens.gather(1, accepted[:, None])[:, 0]
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


def open_window(p0: torch.Tensor, width: int, uniforms: torch.Tensor, noise: torch.Tensor):
    """After the prefill: token 0 drawn from p0 (A, V), and the first drafts, tokens 1..W-1, drawn from
    p0 as their proposal. Returns (token (A,), proposals q (A, W-1, V), drafts (A, W-1))."""
    count, vocab = p0.shape
    ones = torch.ones(count, dtype=torch.long, device=p0.device)
    q = p0.new_zeros(count, width - 1, vocab)
    _, token, q = verify(p0[:, None].expand(count, width, vocab), ones, q[..., 0].long(), q, uniforms)
    return token, q, draft(q, noise)


def iterate(gpt: GPT, canvas: torch.Tensor, n: torch.Tensor, q: torch.Tensor, noise: torch.Tensor,
            uniforms: torch.Tensor, fresh: torch.Tensor, cache, key_valid: torch.Tensor, kv_len: int,
            repeat_rows: Callable[[torch.Tensor], torch.Tensor],
            probs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], forced: torch.Tensor | None = None,
            tree: DraftTree | None = None, layout: dict | None = None, tree_numbers: torch.Tensor | None = None):
    """One Jacobi iteration of A images (the module docstring's steps 1-4); graph-safe (no host reads).

    canvas (A, N + W): accepted tokens, then the drafts; q, noise (A, W-1, V): the drafts' proposals
    and Gumbel noise; canvas, q and noise are updated in place. n (A,): accepted tokens per image;
    uniforms (A, W) and fresh Gumbel noise (A, W-1, V): this iteration's numbers. repeat_rows maps
    (A, ...) to the cache's rows (the guidance twins); probs(logits (rows, T, V), token index (A, T))
    gives the final sampling probabilities (A, T, V). forced (A, N + W): kept tokens (-1: sampled),
    accepted without a test and drafted as themselves. tree: a fitted `DraftTree` with its
    `tree_layout` and its numbers (A, tree.numbers(V)): the tree's branches are fed in the same
    forward (their keys/values in scratch slots after the window) and tried at the spine's first
    rejection (`resolve_tree`). Returns (the new n, drafts verified, tokens gained past the first,
    whether an alternative won), each (A,).
    """
    cfg = gpt.config
    width = q.shape[1] + 1
    steps = torch.arange(width, device=canvas.device)
    start = n.clamp(max=cfg.num_image_tokens - width)  # first token index the window predicts
    offset = n - start  # > 0 only where the window was moved back at the end of the grid
    length = width - offset  # p's from token n on
    inputs = start[:, None] - 1 + steps  # (A, W) token index of each input
    drafts = canvas.gather(1, n[:, None] + steps[:width - 1])
    window = None if forced is None else forced.gather(1, n[:, None] + steps)  # (A, W)
    if tree is None:
        positions = repeat_rows(cfg.cond_len + inputs)  # (rows, W)
        h = gpt.embed_tokens(repeat_rows(canvas.gather(1, inputs)))  # (rows, W, C)
        logits = gpt.forward_cached(h, positions, cache, kv_len, _visible(key_valid, positions, kv_len))
        index = start[:, None] + steps
    else:
        k, depth, groups, vocab = tree.candidates, tree.depth, tree.groups, q.shape[-1]
        gumbel = _gumbel(tree_numbers[:, k + 2 * depth - 1:]).view(-1, groups, vocab)
        alternatives, valid = extra_candidates(q[:, :groups], drafts[:, :groups], k - 1, gumbel)  # (A, G, K-1)
        valid &= (offset == 0)[:, None, None]  # no tree on a moved-back window
        if window is not None:  # a kept position is never rejected: no alternatives
            valid &= (window[:, :groups] < 0)[..., None]
        fed = torch.cat([canvas.gather(1, inputs[:, :1]), tree_inputs(canvas.gather(1, inputs[:, 1:]), alternatives,
                                                                       depth)], dim=1)  # (A, T)
        root = cfg.cond_len + inputs[:, 0]  # (A,) slot and position of the root
        slots = repeat_rows(tree_slots(root, layout, root[:, None] + width, depth))  # (rows, T)
        positions = repeat_rows((root[:, None] + layout["depth"]).clamp(max=cfg.cond_len + cfg.num_image_tokens - 1))
        mask = tree_mask(key_valid, repeat_rows(root), slots, layout["ancestors"], kv_len)
        logits = gpt.forward_cached(gpt.embed_tokens(repeat_rows(fed)), positions, cache, kv_len, mask, slots=slots)
        index = (start[:, None] + layout["depth"]).clamp(max=cfg.num_image_tokens - 1)
    p_tree = probs(logits, index)  # (A, T, V)
    p = p_tree[:, :width]
    align = (offset[:, None] + steps).clamp(max=width - 1)
    p = p.gather(1, align[..., None].expand_as(p))
    accepted, token, q_next = (verify(p, length, drafts, q, uniforms) if window is None else
                               verify(p, length, drafts, q, uniforms, window))
    new = n + accepted
    gain = accepted + 1
    if tree is None:
        won = torch.zeros_like(accepted, dtype=torch.bool)
    else:
        token, branch, extra, won, p_branch, node = resolve_tree(p, p_tree, length, drafts, q, accepted, token,
                                                                alternatives, valid, tree_numbers, tree, window)
        gain = gain + extra
        on = extra[:, None] + steps[:width - 1]  # the next drafts' tokens n + gain + i: branch output `on`
        source = (gain[:, None] + steps[:width - 1]).clamp(max=(length - 1)[:, None])
        from_spine = p.gather(1, source[..., None].expand_as(q_next))
        from_branch = p_branch.gather(1, on.clamp(max=depth - 1)[..., None].expand_as(q_next))
        moved = torch.where((on < depth)[..., None], from_branch, from_spine)
        q_next = torch.where(won[:, None, None], moved, q_next)
        t = torch.arange(depth, device=canvas.device)
        commit_branch_cache(cache, repeat_rows(root[:, None] + width + node[:, None] + t),
                            repeat_rows(root[:, None] + 1 + accepted[:, None] + t),
                            repeat_rows(won[:, None] & (t < extra[:, None])))
        after = new[:, None] + 1 + t  # (A, D) the branch's tokens after the alternative
        canvas.scatter_(1, after, torch.where(t < extra[:, None], branch, canvas.gather(1, after)))
    noise.copy_(shift_noise(noise, fresh, gain))
    q.copy_(q_next)
    canvas.scatter_(1, new[:, None], token[:, None])
    ahead = n[:, None] + gain[:, None] + steps[:width - 1]
    drafted = draft(q, noise)
    if forced is not None:
        kept = forced.gather(1, ahead)
        drafted = torch.where(kept >= 0, kept, drafted)
    canvas.scatter_(1, ahead, drafted)
    return n + gain, length - 1, gain - 1, won


def resolve_tree(p: torch.Tensor, p_tree: torch.Tensor, length: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor,
                 accepted: torch.Tensor, token: torch.Tensor, alternatives: torch.Tensor, valid: torch.Tensor,
                 numbers: torch.Tensor, tree: DraftTree, forced: torch.Tensor | None = None):
    """The tree's part of an iteration, after the spine's `verify` (accepted drafts a, token at n+a).

    p (A, W, V): the spine's final distributions of tokens n..n+W-1; p_tree (A, T, V): those of every
    tree input; drafts, q: the spine's drafts (A, W-1) and proposals (A, W-1, V); alternatives, valid
    (A, G, K-1): the candidates fed for tokens n..n+G-1; numbers (A, >= K + 2D - 1) the tree's
    uniforms; forced (A, W): kept tokens n..n+W-1 (-1: sampled). Where the spine's draft of token
    n+a was rejected and a < G, token n+a is drawn by recursive rejection over its alternatives
    (target: what the spine's rejection left, norm(max(0, p - q))); if alternative b wins, the
    branch's later tokens are verified against the branch's own outputs (`chain`). Returns (the
    token at n+a (A,); the branch's tokens n+a+1.. (A, D); how many of them are committed (A,), 0
    unless an alternative won; won (A,) bool; the branch's outputs (A, D, V), distributions of
    tokens n+a+1..n+a+D; the branch's first scratch slot after the window (A,))."""
    count, width, vocab = p.shape
    k, depth, groups = tree.candidates, tree.depth, tree.groups
    rows = torch.arange(count, device=p.device)
    t = torch.arange(depth, device=p.device)
    sizes = [k - 1, 1, depth - 1, depth]
    tested, head_draw, branch_tests, branch_draws = numbers[:, :sum(sizes)].split(sizes, dim=1)
    tried = (accepted < length - 1) & (accepted < groups)  # a rejection at a position with alternatives
    at = accepted.clamp(max=groups - 1)
    spot = accepted.clamp(max=width - 2)
    q_at = q[rows, spot]  # (A, V) the rejected draft's proposal
    target = reject_update(p[rows, accepted], q_at)
    rest = q_at.scatter(-1, drafts[rows, spot][:, None], 0.0)  # the alternatives' proposal: q without the draft
    rest = rest / rest.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    candidates = alternatives[rows, at]  # (A, K-1)
    winner, left = first_token(target, rest, candidates, valid[rows, at] & tried[:, None], tested)
    won = winner < k - 1
    pick = winner.clamp(max=k - 2)
    head = torch.where(won, candidates.gather(1, pick[:, None])[:, 0], draw(left, head_draw[:, 0]))
    token = torch.where(tried, head, token)
    node = (at * (k - 1) + pick) * depth  # the branch's first input after the spine
    p_branch = p_tree.gather(1, (width + node[:, None] + t)[..., None].expand(count, depth, vocab))
    later = accepted[:, None] + 1 + t[:depth - 1]  # the branch's drafts: the spine's of tokens n+a+1..
    spots = later.clamp(max=width - 2)
    kept = None if forced is None else forced.gather(1, (accepted[:, None] + 1 + t).clamp(max=width - 1))
    extra, branch, _ = chain(p_branch, drafts.gather(1, spots), q.gather(1, spots[..., None].expand(-1, -1, vocab)),
                                later < (length - 1)[:, None], branch_tests, branch_draws, kept)
    return token, branch, torch.where(won, extra, 0), won, p_branch, node


def _gumbel(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from U[0, 1) numbers."""
    return -torch.log(-torch.log(u.clamp(min=1e-30)))


def draw_grouped(generators: Sequence[torch.Generator | None], size: int, device,
                 out: torch.Tensor | None = None, rows: Sequence[int] | None = None) -> torch.Tensor:
    """(A, size) U[0, 1) numbers, row i from generators[i]; rows sharing one generator come from one
    draw of that generator, in row order (the numbers a static batch of them draws). With `out`, row i
    is written to out[rows[i]] (default i) and `out` is returned."""
    rows = list(range(len(generators))) if rows is None else list(rows)
    if out is None:
        out = torch.empty(len(generators), size, device=device)
    groups: dict[int, list[int]] = {}
    for i, gen in enumerate(generators):
        groups.setdefault(id(gen), []).append(i)
    for group in groups.values():
        gen = generators[group[0]]
        if len(group) == 1:  # the same numbers as a one-row draw, written in place
            torch.rand(size, generator=gen, device=device, out=out[rows[group[0]]])
        else:
            drawn = torch.rand(len(group), size, generator=gen, device=device)
            out.index_copy_(0, torch.tensor([rows[i] for i in group], device=device), drawn)
    return out


class JacobiStep:
    """Step policy of a `SlotDecoder`: one Jacobi iteration of `window` positions per active slot,
    with a draft tree (`argen.engine.draft_tree.DraftTree`, or its spelling "KxD[xG]") if given."""

    def __init__(self, window: int = DEFAULT_WINDOW, tree: DraftTree | str | None = None):
        self.asked = check_decode("jacobi", window)
        self.asked_tree = parse_tree(tree)
        self.key = ("jacobi", self.asked, self.asked_tree)

    def _fit(self, num_tokens: int, vocab: int) -> tuple[int, DraftTree | None]:
        """The window (moved back at the end of the grid: >= 1 token before it) and the tree it carries."""
        width = max(1, min(self.asked, num_tokens - 1))
        return width, None if self.asked_tree is None else self.asked_tree.fit(width, vocab)

    def scratch_slots(self, config) -> int:
        """Cache slots after the grid for the branches of the tree: G (K-1) D (0 without a tree)."""
        _, tree = self._fit(config.num_image_tokens, config.vocab_size)
        return 0 if tree is None else tree.groups * (tree.candidates - 1) * tree.depth

    def bind(self, decoder) -> None:
        self.decoder = decoder
        n, device, vocab = decoder.num_slots, decoder.device, decoder.vocab_size
        self.window, self.tree = self._fit(decoder.num_tokens, vocab)
        width, tree = self.window, self.tree
        self.layout = None if tree is None else tree_layout(width, tree.candidates, tree.depth, tree.groups, device)
        self.scratch = self.scratch_slots(decoder.gpt.config)
        self.spine_numbers = width + (width - 1) * vocab  # W tests and draws, the entering tokens' noise
        extra = 0 if tree is None else tree.numbers(vocab)  # the tree's numbers come after the spine's
        self.canvas = torch.zeros(n, decoder.num_tokens + width, dtype=torch.long, device=device)  # tokens, drafts
        self.q = torch.zeros(n, width - 1, vocab, device=device)  # the drafts' proposals
        self.noise = torch.zeros(n, width - 1, vocab, device=device)  # their Gumbel noise
        self.accepted = torch.ones(n, dtype=torch.long, device=device)  # n: accepted tokens
        self.u = torch.full((n, self.spine_numbers + extra), 0.5, device=device)  # a step's numbers
        self.checked = torch.zeros(n, dtype=torch.long, device=device)  # a step's drafts verified
        self.kept = torch.zeros(n, dtype=torch.long, device=device)  # and tokens gained past the first
        self.rescued = torch.zeros(n, dtype=torch.long, device=device)  # 1: an alternative of the tree won
        decoder.state.extra = (self.canvas, self.q, self.noise, self.accepted)
        decoder.counters.update(drafted=0, accepted=0, rescued=0)
        self.forcing = False  # some active slot has kept tokens (set before each step)

    def start(self, first: int, requests: list[SlotRequest], totals: list[int], logits: torch.Tensor,
              rp: RowParams) -> None:
        """Token 0 and the first drafts of the new slots, from their prefill logits (rows, V)."""
        d = self.decoder
        k, width, vocab = len(requests), self.window, d.vocab_size
        s = slice(first, first + k)
        p = self.probs(logits[:, None], rp, d.state.scales[s, :1])  # (k, 1, V)
        u = draw_grouped([r.generator for r in requests], self.u.shape[1], d.device)
        noise = _gumbel(u[:, width:self.spine_numbers]).view(k, width - 1, vocab)
        token, q, drafts = open_window(p[:, 0], width, u[:, :width], noise)
        kept = d.state.forced[s, :width]  # a kept token is given and drafted as itself
        token = torch.where(kept[:, 0] >= 0, kept[:, 0], token)
        drafts = torch.where(kept[:, 1:] >= 0, kept[:, 1:], drafts)
        self.canvas[s] = 0
        self.canvas[s, 0] = token
        self.canvas[s, 1:width] = drafts
        self.q[s], self.noise[s] = q, noise
        self.accepted[s] = 1

    def kv_len(self) -> int:
        d = self.decoder
        slots = d.cond_len + max(min(slot.steps, d.num_tokens - self.window) for slot in d.slots) + self.window - 1
        return slots + self.scratch  # the branches' scratch slots after the window

    def before_step(self) -> None:
        """Draw each active slot's numbers for this iteration from its request's generator."""
        slots = self.decoder.slots
        self.forcing = any(slot.runs is not None for slot in slots)
        order = sorted(range(len(slots)), key=lambda i: slots[i].order)
        draw_grouped([slots[i].request.generator for i in order], self.u.shape[1], self.decoder.device,
                     out=self.u, rows=order)

    def facts(self) -> tuple:
        """What the step's shape depends on besides the sampling facts: whether some slot has kept tokens."""
        return (self.forcing,)

    def step_state(self) -> tuple[torch.Tensor, ...]:
        return self.canvas, self.q, self.noise, self.accepted, self.checked, self.kept, self.rescued

    def run(self, n: int, kv: int, rp: RowParams, shared_pos: int | None) -> None:
        """One Jacobi iteration of slots [0, n): live ones advance, the others re-run a parked window
        at token 1 with their outputs ignored. Graph-safe: no host reads, no draws."""
        d = self.decoder
        st, width = d.state, self.window
        live = st.live[:n].bool()
        accepted = self.accepted[:n]
        cur = torch.where(live, accepted, torch.ones_like(accepted))
        scales = st.scales[:n]
        rows = row_slice(n, rp.guided)
        forced = torch.nn.functional.pad(st.forced[:n], (0, width), value=-1) if self.forcing else None  # (n, N + W)
        spine = self.spine_numbers
        with rows_of(d.gpt, d.adapter_index(rows)):
            new, checked, kept, won = iterate(
                d.gpt, self.canvas[:n], cur, self.q[:n], self.noise[:n], self.u[:n, :width],
                _gumbel(self.u[:n, width:spine]).view(n, width - 1, d.vocab_size), [c[:, rows] for c in st.cache],
                st.key_valid[rows], kv,
                (lambda x: x.repeat_interleave(2, dim=0)) if rp.guided else (lambda x: x),  # slot i's rows
                lambda logits, index: self.probs(logits, rp, scales.gather(1, index)), forced,
                self.tree, self.layout, None if self.tree is None else self.u[:n, spine:])
        accepted.copy_(torch.where(live, new, accepted))
        self.checked[:n].copy_(torch.where(live, checked, 0))
        self.kept[:n].copy_(torch.where(live, kept, 0))
        self.rescued[:n].copy_(torch.where(live, won.long(), 0))

    def advance(self) -> None:
        d = self.decoder
        count = len(d.slots)
        for slot, n in zip(d.slots, self.accepted[:count].tolist()):  # the step's one host read
            slot.steps = n
            slot.pos = d.cond_len + n - 1  # cache positions of the accepted tokens before the last
        d.counters["drafted"] += int(self.checked[:count].sum())
        d.counters["accepted"] += int(self.kept[:count].sum())
        if self.tree is not None:
            d.counters["rescued"] += int(self.rescued[:count].sum())

    def tokens(self, i: int, slot) -> torch.Tensor:
        return self.canvas[i, :slot.total]

    def probs(self, logits: torch.Tensor, rp: RowParams, scale: torch.Tensor) -> torch.Tensor:
        """Model logits of A slots at T tokens ((2A, T, V) interleaved twins when rp.guided, else
        (A, T, V)) and guidance scales (A, T) -> (A, T, V) final sampling probabilities: guidance,
        temperature, top-k, top-p, each slot with its own settings."""
        count, length, vocab = scale.shape[0], scale.shape[1], logits.shape[-1]
        flat = logits.float()
        if rp.guided:
            flat = flat.view(count, 2, length, vocab).transpose(1, 2)
        flat = flat.reshape(-1, vocab)  # (A T [x 2], V): a slot's tokens, each with its twin

        def per_token(t: torch.Tensor, read: bool) -> torch.Tensor:  # only what the filters read is expanded
            return t.repeat_interleave(length, dim=0) if read else t

        shared = rp.uniform is not None  # one setting for all: the filters read it, not the tensors
        rows = dataclasses.replace(rp, temperature=per_token(rp.temperature, not shared),
                                   top_k=per_token(rp.top_k, not shared), top_p=per_token(rp.top_p, rp.use_top_p),
                                   guided_rows=per_token(rp.guided_rows, rp.guided and not rp.all_guided))
        weights = filtered_weights(combine_guidance_pairs(flat, rows, scale.reshape(-1, 1)), rows)
        return (weights / weights.sum(dim=-1, keepdim=True)).view(count, length, vocab)


def jacobi_decode(gpt: GPT, cond: torch.Tensor, cond_mask: torch.Tensor | None = None,
                  params: SamplingParams = SamplingParams(), window: int = DEFAULT_WINDOW,
                  generator: torch.Generator | None = None,
                  row_generators: Sequence[torch.Generator] | None = None,
                  max_new_tokens: int | None = None,
                  progress: Callable[[int], None] | None = None, max_batch: int | None = None,
                  cuda_graphs: bool | None = None, forced_tokens: torch.Tensor | None = None,
                  tree: DraftTree | str | None = None) -> JacobiResult:
    """Sample (B, max_new_tokens) tokens with Jacobi iterations of `window` positions per forward.

    A static batch (`argen.engine.batches`) with `JacobiStep(window)`, through the model's cached
    `Batches`. Images are decoded in chunks of up to `max_batch` (default 64 on a CPU, 256 on a GPU).
    progress: called, per chunk, with the number of tokens by which the slowest image advanced (so
    the calls of a chunk add up to max_new_tokens). cuda_graphs: None = on for CUDA devices; True on
    a CPU runs the fixed-shape step uncaptured. The tokens are the same either way.
    forced_tokens: (B, max_new_tokens) int64 kept tokens, -1 where sampled (always accepted, never drafted).
    tree: a draft tree (`DraftTree` or "KxD" / "KxDxG"; None: none), fed and verified in the same
    forward passes (`argen.engine.draft_tree`); the same distribution, fewer forward passes.
    """
    if not isinstance(params, SamplingParams):
        raise ArgenError("Jacobi decoding takes one SamplingParams for the whole batch")
    step = JacobiStep(window, tree)
    return engine_for(gpt, cuda_graphs).run(cond, cond_mask, params, generator, row_generators, max_new_tokens,
                                            progress, step=step, max_batch=max_batch, forced=forced_tokens)


def jacobi_generate(gpt: GPT, cond: torch.Tensor, cond_mask: torch.Tensor | None = None,
                    params: SamplingParams = SamplingParams(), window: int = DEFAULT_WINDOW, **kwargs) -> torch.Tensor:
    """`jacobi_decode(...).tokens`: (B, max_new_tokens) int64 tokens on the model's device."""
    return jacobi_decode(gpt, cond, cond_mask, params, window, **kwargs).tokens
