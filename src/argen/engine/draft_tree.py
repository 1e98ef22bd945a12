"""Draft trees for speculative Jacobi decoding: the setting, the tree's layout and its verification.

Contract: `DraftTree(candidates=K, depth=D, groups=G)` (CLI spelling "KxD" or "KxDxG", `parse_tree`)
asks `argen.engine.jacobi.JacobiStep` to feed, besides the window's spine (the last accepted token
and the drafts d_n..d_{n+W-2}), K-1 *alternatives* for each of the first G unverified tokens
n..n+G-1 (G None: every spine position, W-1), each followed by D-1 tokens (the spine's drafts of
the tokens after it), all in the same forward pass. The functions here are pure, fixed-shape tensor
ops for a given (W, K, D, G) (no host reads, no random draws: graph-safe):

- `tree_layout`, `tree_inputs`, `tree_slots`, `tree_mask`: the tree's nodes, their tokens, the cache
  slots their keys/values go to (the spine at its positions, the branches in scratch slots) and the
  attention mask (a node sees the valid keys before the root and its own ancestors);
- `extra_candidates`: the alternatives, successive draws without replacement from the draft's own
  proposal q_j without the draft (Gumbel-top-k with fresh noise);
- `first_token`: recursive rejection sampling of token j over the alternatives after the spine's
  draft was rejected (target r_1 = norm(max(0, p_j - q_j)));
- `chain`: left-to-right verification of the accepted alternative's branch against the branch's own
  outputs (which saw the alternative);
- `commit_branch_cache`: the accepted branch's keys/values moved into their positions.

The token law: given the accepted prefix, a candidate is a draw from the proposal recorded for it,
tested with fresh uniforms against the true conditional (every earlier input on its path is an
accepted token), and "keep c ~ q_k with probability min(1, r_k(c)/q_k(c)), else draw from
norm(max(0, r_k - q_k))" is a draw from r_k for any q_k; so every token is an exact sample of the
autoregressive conditional (docs/engine.md, "Draft trees"). `accept` and `draw` are the acceptance
test and the inverse-CDF draw that `argen.engine.jacobi` uses too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from argen.engine.sampler import _inverse_cdf
from argen.utils.errors import ArgenError


@dataclass(frozen=True)
class DraftTree:
    """K candidates (the spine's draft and K-1 alternatives) for each of the first G unverified
    tokens (None: every spine position), each alternative followed by D-1 spine drafts."""

    candidates: int
    depth: int = 1
    groups: int | None = None

    def __post_init__(self):
        for name in ("candidates", "depth", "groups"):
            value = getattr(self, name)
            if value is None and name == "groups":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ArgenError(f"draft tree {name} must be an integer, got {value!r}")
        if self.candidates < 2:
            raise ArgenError(f"a draft tree needs candidates >= 2 (the draft and an alternative), "
                             f"got {self.candidates}")
        if self.depth < 1 or (self.groups is not None and self.groups < 1):
            raise ArgenError(f"draft tree depth and groups must be >= 1, got {self.depth} and {self.groups}")

    def __str__(self) -> str:
        return f"{self.candidates}x{self.depth}" + ("" if self.groups is None else f"x{self.groups}")

    def fit(self, window: int, vocab: int) -> DraftTree | None:
        """The tree a window of `window` positions and `vocab` codes can carry: depth and groups cut
        to W-1, candidates to the vocabulary; None when there is no spine draft (W < 2) or one code."""
        if window < 2 or vocab < 2:
            return None
        groups = window - 1 if self.groups is None else min(self.groups, window - 1)
        return DraftTree(min(self.candidates, vocab), min(self.depth, window - 1), groups)

    def numbers(self, vocab: int) -> int:
        """Uniforms one iteration of a fitted tree draws per image (after the spine's): K-1 tests of
        the alternatives, 1 draw of the token when none is kept, D-1 tests and D closing draws of the
        branch, G V for the alternatives' Gumbel noise."""
        return self.candidates + 2 * self.depth - 1 + self.groups * vocab


def parse_tree(value: DraftTree | str | None) -> DraftTree | None:
    """None, a DraftTree, or its spelling "KxD" / "KxDxG" (e.g. "4x2": 4 candidates at every
    position, branches of 2 tokens) -> DraftTree or None."""
    if value is None or isinstance(value, DraftTree):
        return value
    if not isinstance(value, str) or not re.fullmatch(r"\d+x\d+(x\d+)?", value.strip()):
        raise ArgenError(f"a draft tree is spelled KxD or KxDxG (candidates x depth [x groups], e.g. 4x2), "
                         f"got {value!r}")
    return DraftTree(*(int(x) for x in value.strip().split("x")))


# ---------------------------------------------------------------- sampling primitives
def accept(uniforms: torch.Tensor, q_draft: torch.Tensor, p_draft: torch.Tensor) -> torch.Tensor:
    """The speculative-sampling test: keep a draft with probability min(1, p/q) (q > 0: it was drawn)."""
    return uniforms * q_draft < p_draft


def draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One index per row of unnormalised weights (..., V) with one uniform each -> (...,) int64."""
    shape = weights.shape[:-1]
    return _inverse_cdf(weights.reshape(-1, weights.shape[-1]), uniforms.reshape(-1))[:, 0].view(shape)


def reject_update(r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The target after a candidate drawn from q is rejected: max(0, r - q), normalised (r where
    nothing is left)."""
    rest = (r - q).clamp(min=0.0)
    total = rest.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, rest / total.clamp(min=1e-30), r)


# ---------------------------------------------------------------- the tree
def tree_layout(window: int, candidates: int, depth: int, groups: int, device=None) -> dict:
    """The fixed tree of one iteration. Input 0 is the last accepted token (the root), inputs 1..W-1
    the spine (the drafts of tokens n..n+W-2); then, for g < G and b = 1..K-1, branch (g, b): the
    alternative for token n+g (a child of spine input g) and D-1 tokens after it, at inputs
    W + (g (K-1) + b-1) D + t. Returns depth (T,) (tokens after the root), branch (T,) (0 = spine,
    else 1 + g (K-1) + b-1), step (T,) (t on a branch) and ancestors (T, T) bool (self included)."""
    per = (candidates - 1) * depth
    size = window + groups * per
    g = torch.arange(groups).repeat_interleave(per)
    t = torch.arange(depth).repeat(groups * (candidates - 1))
    node_depth = torch.cat([torch.arange(window), g + 1 + t])
    branch = torch.cat([torch.zeros(window, dtype=torch.long),
                        1 + torch.arange(groups * (candidates - 1)).repeat_interleave(depth)])
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
    later = torch.arange(groups, device=spine.device)[:, None] + 1 + torch.arange(depth - 1, device=spine.device)
    tails = spine[:, later.clamp(max=spine.shape[1] - 1)]  # (A, G, D-1)
    tails = tails[:, :, None].expand(count, groups, others, depth - 1)
    return torch.cat([spine, torch.cat([alternatives[..., None], tails], dim=-1).flatten(1)], dim=1)


def tree_slots(root: torch.Tensor, layout: dict, scratch: torch.Tensor | int, depth: int) -> torch.Tensor:
    """Cache slot of every input (R, T) for roots at slot `root` (R,): the root and spine at their
    positions, branch k at scratch + (k-1) D + t (scratch: an int or (R, 1))."""
    d, b = layout["depth"], layout["branch"]
    return torch.where(b == 0, root[:, None] + d, scratch + (b - 1).clamp(min=0) * depth + layout["step"])


def tree_mask(key_valid: torch.Tensor, root: torch.Tensor, slots: torch.Tensor, ancestors: torch.Tensor,
              kv_len: int) -> torch.Tensor:
    """(R, 1, T, kv_len) bool: each input sees the valid keys before the root's slot and the slots of
    its own ancestors (itself included), nothing else."""
    keys = torch.arange(kv_len, device=root.device)
    prefix = (keys < root[:, None]) & key_valid[:, :kv_len]  # (R, kv)
    onehot = (slots[..., None] == keys).to(torch.float32)  # (R, T, kv)
    tree = torch.einsum("ij,rjk->rik", ancestors.to(torch.float32), onehot) > 0
    return (prefix[:, None] | tree)[:, None]


def commit_branch_cache(cache: list[torch.Tensor], branch_slots: torch.Tensor, target: torch.Tensor,
                        copy: torch.Tensor) -> None:
    """Move an accepted branch's keys/values into place: for each row, slots branch_slots (R, D)
    -> target (R, D) where copy (R, D) is True (everything is read before anything is written)."""
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
        keep = test & accept(uniforms[:, k], qk.gather(-1, c)[:, 0], r.gather(-1, c)[:, 0])
        winner = torch.where(keep, k, winner)
        rejected = (test & ~keep)[:, None]
        r = torch.where(rejected, reject_update(r, qk), r)
        without = qk.scatter(-1, c, 0.0)
        qk = torch.where(rejected, without / without.sum(dim=-1, keepdim=True).clamp(min=1e-30), qk)
    return winner, r


def chain(p: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor, checked: torch.Tensor, uniforms: torch.Tensor,
          draws: torch.Tensor, forced: torch.Tensor | None = None):
    """Left-to-right verification of a chain whose context is exact up to its first draft (the Jacobi
    window's spine, and an accepted tree branch).

    p (A, L+1, V): p[:, i] the distribution of draft i (i < L) and of the token after the last;
    drafts (A, L) drawn from q (A, L, V); checked (A, L): drafts that may be tested (a leading run);
    uniforms (A, L) tests, draws (A, L+1) uniforms for the closing draw; forced (A, L+1): kept
    tokens (-1: sampled), a kept draft always accepted and a kept closing token given. Returns
    (count (A,) tokens committed, 1..L+1; tokens (A, L+1), valid up to count: the leading accepted
    drafts, then a draw from max(0, p - q) at the first rejection, or from p after the last checked
    draft; rejected (A,) bool)."""
    count, length, vocab = p.shape[0], drafts.shape[1], p.shape[-1]
    if length:
        keep = accept(uniforms, q.gather(-1, drafts[..., None])[..., 0],
                      p[:, :length].gather(-1, drafts[..., None])[..., 0])
        if forced is not None:
            keep |= forced[:, :length] >= 0
        keep &= checked
        lead = keep.long().cumprod(dim=1).sum(dim=1)  # (A,) leading accepted drafts
        rejected = lead < checked.long().sum(dim=1)
    else:
        lead = torch.zeros(count, dtype=torch.long, device=p.device)
        rejected = torch.zeros(count, dtype=torch.bool, device=p.device)
    at = lead[:, None, None].expand(count, 1, vocab)
    weights = p.gather(1, at)[:, 0]  # (A, V)
    if length:  # at a rejection lead < L: q_at is the rejected draft's proposal; unnormalised residual
        q_at = q.gather(1, at.clamp(max=length - 1))[:, 0]
        residual = torch.where(rejected[:, None], (weights - q_at).clamp_(min=0.0), weights)
        weights = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, weights)
    last = draw(weights, draws.gather(1, lead[:, None])[:, 0])
    if forced is not None:
        given = forced.gather(1, lead[:, None])[:, 0]
        last = torch.where(given >= 0, given, last)
    tokens = torch.cat([drafts, drafts.new_zeros(count, 1)], dim=1).scatter(1, lead[:, None], last[:, None])
    return lead + 1, tokens, rejected
