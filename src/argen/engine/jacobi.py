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

On CUDA (`cuda_graphs`) an iteration is a replayed CUDA graph with static buffers (`JacobiGraphs`:
what is inside the graph and what the host does between replays); the tokens are the same.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from argen.engine.engine import KV_BUCKET, capture_graphs, changed_weights
from argen.engine.sampler import _inverse_cdf
from argen.models.gpt import GPT
from argen.sampling.logits import SamplingParams, guidance_scale_at, guided_logits, process_logits
from argen.sampling.reference import prepare_condition
from argen.utils.errors import ArgenError

DEFAULT_WINDOW = 8
DECODE_MODES = ("ar", "jacobi")
MAX_GRAPH_SETS = 4  # captured settings (temperature, top-k, top-p) kept per batch shape


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
            probs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """One Jacobi iteration of A images (the module docstring's steps 1-4); graph-safe (no host reads).

    canvas (A, N + W): accepted tokens, then the drafts; q, noise (A, W-1, V): the drafts' proposals
    and Gumbel noise; canvas, q and noise are updated in place. n (A,): accepted tokens per image;
    uniforms (A, W) and fresh Gumbel noise (A, W-1, V): this iteration's numbers. repeat_rows maps
    (A, ...) to the cache's rows (the guidance twins); probs(logits (rows, W, V), token index (A, W))
    gives the final sampling probabilities (A, W, V). Returns (the new n, drafts verified, drafts
    accepted), each (A,).
    """
    cfg = gpt.config
    width = q.shape[1] + 1
    steps = torch.arange(width, device=canvas.device)
    start = n.clamp(max=cfg.num_image_tokens - width)  # first token index the window predicts
    offset = n - start  # > 0 only where the window was moved back at the end of the grid
    length = width - offset  # p's from token n on
    inputs = start[:, None] - 1 + steps  # (A, W) token index of each input
    positions = repeat_rows(cfg.cond_len + inputs)  # (rows, W)
    h = repeat_rows(gpt.embed_tokens(canvas.gather(1, inputs)))  # (rows, W, C)
    logits = gpt.forward_cached(h, positions, cache, kv_len, _visible(key_valid, positions, kv_len))
    p = probs(logits, start[:, None] + steps)  # (A, W, V)
    align = (offset[:, None] + steps).clamp(max=width - 1)
    p = p.gather(1, align[..., None].expand_as(p))
    drafts = canvas.gather(1, n[:, None] + steps[:width - 1])
    accepted, token, q_next = verify(p, length, drafts, q, uniforms)
    new = n + accepted
    noise.copy_(shift_noise(noise, fresh, accepted + 1))
    q.copy_(q_next)
    canvas.scatter_(1, new[:, None], token[:, None])
    canvas.scatter_(1, new[:, None] + 1 + steps[:width - 1], draft(q, noise))
    return new + 1, length - 1, accepted


def _stacked_twins(twins: int, x: torch.Tensor) -> torch.Tensor:
    """(A, ...) -> (twins A, ...): the rows of the cond images, then those of their uncond twins."""
    return x.repeat(twins, *[1] * (x.ndim - 1))


def _final_probs(params: SamplingParams, scales: torch.Tensor, logits: torch.Tensor,
                 index: torch.Tensor) -> torch.Tensor:
    """(R A, T, V) float32 logits (cond rows, then uncond) of image tokens `index` (A, T) -> (A, T, V)
    sampling probabilities, guided with `scales` (N,) at each token's index."""
    if params.guided:
        count = index.shape[0]
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
    return u[:, :width], _gumbel(u[:, width:]).view(count, width - 1, vocab)


def _gumbel(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from U[0, 1) numbers."""
    return -torch.log(-torch.log(u.clamp(min=1e-30)))


def jacobi_decode(gpt: GPT, cond: torch.Tensor, cond_mask: torch.Tensor | None = None,
                  params: SamplingParams = SamplingParams(), window: int = DEFAULT_WINDOW,
                  generator: torch.Generator | None = None,
                  row_generators: Sequence[torch.Generator] | None = None,
                  max_new_tokens: int | None = None,
                  progress: Callable[[int], None] | None = None, max_batch: int | None = None,
                  cuda_graphs: bool | None = None, _graphs: JacobiGraphs | None = None) -> JacobiResult:
    """Sample (B, max_new_tokens) tokens with Jacobi iterations of `window` positions per forward.

    Images are decoded in chunks of up to `max_batch` (default 64 on a CPU, 256 on a GPU).
    progress: called, per chunk, with the number of tokens by which the slowest image advanced (so
    the calls of a chunk add up to max_new_tokens). cuda_graphs: None = on for CUDA devices: the
    verify step is captured and replayed (`JacobiGraphs`, cached per model); True on a CPU runs that
    fixed-shape step uncaptured. The tokens are the same either way for the same generators.
    """
    if not isinstance(params, SamplingParams):
        raise ArgenError("Jacobi decoding takes one SamplingParams for the whole batch")
    device = gpt.tok_embeddings.weight.device
    if _graphs is None and (device.type == "cuda" if cuda_graphs is None else cuda_graphs):
        _graphs = graphs_for(gpt)
    if _graphs is not None:
        _graphs.check_weights()
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
                                 max_new_tokens, progress, _graphs))
    return JacobiResult(torch.cat([r.tokens for r in parts]).clone(),  # a normal tensor outside inference mode
                        torch.cat([r.forwards for r in parts]), sum(r.model_calls for r in parts),
                        sum(r.drafted for r in parts), sum(r.accepted for r in parts))


def _decode(gpt, cond, cond_mask, params, window, generator, row_generators, max_new_tokens, progress, graphs=None):
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
    progress = progress or (lambda steps: None)
    if graphs is not None:
        return _decode_graphs(graphs, gpt, rows, key_mask, params, width, twins, batch, max_new, generator,
                              row_generators, progress)
    cond_len, vocab = cfg.cond_len, cfg.vocab_size
    cache_len = cond_len + num_tokens
    cache = gpt.new_cache(rows.shape[0], cache_len)
    key_valid = torch.ones(rows.shape[0], cache_len, dtype=torch.bool, device=device)
    if key_mask is not None:
        key_valid[:, :cond_len] = key_mask
    scales = torch.tensor([guidance_scale_at(params, i, num_tokens) for i in range(num_tokens)],
                          dtype=torch.float32, device=device)

    # prefill: the condition prefix gives p_0; token 0 and the first drafts are drawn from it
    prefix_pos = torch.arange(cond_len, device=device).expand(rows.shape[0], cond_len)
    logits = gpt.forward_cached(gpt.embed_condition(rows), prefix_pos[0], cache, cond_len,
                                _visible(key_valid, prefix_pos, cond_len))[:, -1:]
    p = _final_probs(params, scales, logits, torch.zeros(batch, 1, dtype=torch.long, device=device))
    slots = torch.arange(batch, device=device)  # image id of each active slot
    uniforms, noise = _random(batch, width, vocab, device, generator, row_generators, slots)
    token, q, drafts = open_window(p[:, 0], width, uniforms, noise)
    canvas = torch.zeros(batch, num_tokens + width, dtype=torch.long, device=device)  # accepted, then drafts
    canvas[:, 0] = token
    canvas[:, 1:width] = drafts
    n = torch.ones(batch, dtype=torch.long, device=device)  # accepted tokens per slot
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
        kv_len = cond_len + int(n.clamp(max=num_tokens - width).max()) + width - 1
        uniforms, fresh = _random(count, width, vocab, device, generator, row_generators, slots)
        n, checked, accepted = iterate(gpt, canvas, n, q, noise, uniforms, fresh, cache, key_valid, kv_len,
                                       functools.partial(_stacked_twins, twins),
                                       functools.partial(_final_probs, params, scales))
        forwards[slots.cpu()] += 1
        model_calls += 1
        drafted += int(checked.sum())
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


# ---------------------------------------------------------------- captured verify step (CUDA graphs)
class JacobiGraphs:
    """Jacobi decoding of one `GPT` with the verify step captured as CUDA graphs (one per kv bucket).

    The graph holds one iteration for a fixed batch (padded to a power of two): the W-position
    forward (`GPT.forward_cached` on the static KV cache, the visibility mask built inside from the
    static key mask), the final probabilities (guidance from the static per-token scales,
    temperature, top-k, top-p), `verify` (acceptance tests, residual or bonus draw), the Gumbel
    transform of the pre-drawn uniforms, `shift_noise`, the redrafts, the canvas writes and the
    advance of n. Outside the graph, once per iteration: the host reads n back (the one sync), copies
    the images that finished to the output, picks the kv bucket of the live images, draws the
    iteration's uniforms from the caller's generators into the static buffer (the same numbers, in
    the same order, as the uncaptured loop) and counts forwards, drafts and accepts from n. The
    prefill is eager. Rows that finished (or pad the batch) stay in the batch with their window
    parked at token 1; their outputs are ignored.

    cuda_graphs: None = capture on CUDA; True on a CPU runs the same fixed-shape step uncaptured.
    """

    def __init__(self, gpt: GPT, cuda_graphs: bool | None = None, kv_bucket: int = KV_BUCKET,
                 max_batch: int | None = None, max_sessions: int = 2):
        self._gpt = weakref.ref(gpt)
        self.device = gpt.tok_embeddings.weight.device
        self.use_graphs = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        self._capture_on_device = self.use_graphs and self.device.type == "cuda"
        self.max_batch = max_batch or (256 if self.device.type == "cuda" else 64)
        cfg = gpt.config
        self.kv_bucket = kv_bucket
        full = cfg.cond_len + cfg.num_image_tokens
        self.cache_len = kv_bucket * math.ceil(full / kv_bucket)
        self._sessions: OrderedDict[tuple, dict] = OrderedDict()
        self.max_sessions = max_sessions
        self._graph_pool: dict = {}
        self._signature: tuple | None = None

    @property
    def gpt(self) -> GPT:
        gpt = self._gpt()
        if gpt is None:
            raise RuntimeError("the model has been garbage-collected")
        return gpt

    def check_weights(self) -> None:
        """Drop sessions and graphs (which hold the old weights' addresses) when the model changed."""
        signature = changed_weights(self.gpt, self.device, self._signature, "decoder")
        if signature is not None:
            self._signature = signature
            self._sessions.clear()

    def decode(self, cond, cond_mask=None, params: SamplingParams = SamplingParams(), window: int = DEFAULT_WINDOW,
               **kwargs) -> JacobiResult:
        """`jacobi_decode` through this decoder's step (same arguments, the same tokens)."""
        kwargs.setdefault("max_batch", self.max_batch)
        return jacobi_decode(self.gpt, cond, cond_mask, params, window, _graphs=self, **kwargs)

    def _session(self, batch: int, width: int, twins: int) -> dict:
        key = (batch, width, twins)
        session = self._sessions.get(key)
        if session is None:
            while len(self._sessions) >= self.max_sessions:
                self._sessions.popitem(last=False)
            gpt, device = self.gpt, self.device
            cfg = gpt.config
            vocab, rows = cfg.vocab_size, twins * batch
            session = dict(
                cache=gpt.new_cache(rows, self.cache_len, device=device),
                key_valid=torch.ones(rows, self.cache_len, dtype=torch.bool, device=device),
                scales=torch.ones(cfg.num_image_tokens, device=device),
                canvas=torch.zeros(batch, cfg.num_image_tokens + width, dtype=torch.long, device=device),
                q=torch.zeros(batch, width - 1, vocab, device=device),
                noise=torch.zeros(batch, width - 1, vocab, device=device),
                n=torch.ones(batch, dtype=torch.long, device=device),
                live=torch.zeros(batch, dtype=torch.bool, device=device),
                u=torch.full((batch, width + (width - 1) * vocab), 0.5, device=device),
                graphs={})
            self._sessions[key] = session
        self._sessions.move_to_end(key)
        return session

    def _bucket(self, kv_len: int) -> int:
        return min(self.cache_len, self.kv_bucket * math.ceil(kv_len / self.kv_bucket))

    def _graph(self, session: dict, params: SamplingParams, kv: int):
        facts = (params.guided, params.temperature, params.top_k, params.top_p)  # constants in the graph
        sets = session["graphs"]
        if facts not in sets and len(sets) >= MAX_GRAPH_SETS:
            sets.pop(next(iter(sets)))  # the oldest settings' graphs
        graphs = sets.setdefault(facts, {})
        if kv not in graphs:
            def step():
                self._step(session, params, kv)

            if not self._capture_on_device:
                graphs[kv] = _Uncaptured(step)
            else:
                names = ("canvas", "q", "noise", "n", "live", "u")
                saved = [session[name].clone() for name in names]

                def reset():
                    session["canvas"].zero_()
                    session["n"].fill_(1)
                    session["live"].fill_(True)

                graphs[kv] = capture_graphs(self.device, self._graph_pool, {kv: step}, reset)[kv]
                for name, copy in zip(names, saved):
                    session[name].copy_(copy)
        return graphs[kv]

    def _step(self, session: dict, params: SamplingParams, kv: int) -> None:
        """One fixed-shape iteration on the session's buffers (graph-safe: no host reads, no draws)."""
        canvas, q, noise, n, live, u = (session[k] for k in ("canvas", "q", "noise", "n", "live", "u"))
        count, width = canvas.shape[0], q.shape[1] + 1
        twins = session["key_valid"].shape[0] // count
        cur = torch.where(live, n, torch.ones_like(n))  # parked rows re-run the window at token 1
        fresh = _gumbel(u[:, width:]).view(count, width - 1, q.shape[2])
        new, _, _ = iterate(self.gpt, canvas, cur, q, noise, u[:, :width], fresh, session["cache"],
                            session["key_valid"], kv, functools.partial(_stacked_twins, twins),
                            functools.partial(_final_probs, params, session["scales"]))
        n.copy_(torch.where(live, new, n))


class _Uncaptured:
    """Stands in for a graph on a CPU: `replay()` runs the fixed-shape step eagerly."""

    def __init__(self, step: Callable[[], None]):
        self.replay = step


def _decode_graphs(decoder: JacobiGraphs, gpt, rows, key_mask, params, width, twins, batch, max_new, generator,
                   row_generators, progress) -> JacobiResult:
    """The iteration loop around the captured step (see `JacobiGraphs`)."""
    cfg = gpt.config
    device, num_tokens, vocab, cond_len = decoder.device, cfg.num_image_tokens, cfg.vocab_size, cfg.cond_len
    padded = max(batch, min(decoder.max_batch, 1 << (batch - 1).bit_length()))
    if padded > batch:  # extra rows repeat the last condition; they are never live
        extra = padded - batch
        pad = rows.view(twins, batch, *rows.shape[1:])
        rows = torch.cat([pad, pad[:, -1:].expand(twins, extra, *rows.shape[1:])], dim=1).flatten(0, 1)
        if key_mask is not None:
            km = key_mask.view(twins, batch, -1)
            key_mask = torch.cat([km, km[:, -1:].expand(twins, extra, km.shape[-1])], dim=1).flatten(0, 1)
    session = decoder._session(padded, width, twins)
    scales = torch.tensor([guidance_scale_at(params, i, num_tokens) for i in range(num_tokens)],
                          dtype=torch.float32, device=device)
    session["scales"].copy_(scales)
    key_valid = session["key_valid"]
    key_valid.fill_(True)
    if key_mask is not None:
        key_valid[:, :cond_len] = key_mask
    for kv in sorted({decoder._bucket(cond_len + s + width - 1) for s in range(1, num_tokens - width + 1)}):
        decoder._graph(session, params, kv)  # capture before the prefill fills the buffers

    prefix_pos = torch.arange(cond_len, device=device).expand(rows.shape[0], cond_len)
    logits = gpt.forward_cached(gpt.embed_condition(rows), prefix_pos[0], session["cache"], cond_len,
                                _visible(key_valid, prefix_pos, cond_len))[:, -1:]
    p = _final_probs(params, scales, logits, torch.zeros(padded, 1, dtype=torch.long, device=device))
    real = torch.arange(batch, device=device)
    uniforms, noise = _random(batch, width, vocab, device, generator, row_generators, real)
    token, q, drafts = open_window(p[:batch, 0], width, uniforms, noise)
    canvas = session["canvas"]
    canvas.zero_()
    canvas[:batch, 0] = token
    canvas[:batch, 1:width] = drafts
    session["q"][:batch] = q
    session["noise"][:batch] = noise
    session["n"].fill_(1)
    out = torch.empty(batch, max_new, dtype=torch.long, device=device)
    forwards = torch.ones(batch, dtype=torch.long)
    model_calls, drafted, accepted_total = 1, 0, 0
    done_before = 1
    progress(1)
    active = torch.zeros(padded, dtype=torch.bool)
    active[:batch] = True
    n_before = None
    while True:
        n_host = session["n"].to("cpu", copy=True)  # the one host sync of an iteration
        if n_before is not None:  # the last iteration's bookkeeping
            moved = n_host[active]
            accepted_total += int((moved - n_before[active] - 1).sum())
            done_now = min(int(moved.min()), max_new)
            if done_now > done_before:
                progress(done_now - done_before)
                done_before = done_now
        finished = active & (n_host >= max_new)
        if bool(finished.any()):
            index = finished.nonzero()[:, 0].to(device)
            out[index] = canvas[index, :max_new]
            active &= ~finished
            if not bool(active.any()):
                break
        live = active.nonzero()[:, 0]
        start = n_host[live].clamp(max=num_tokens - width)
        drafted += int((width - (n_host[live] - start) - 1).sum())
        kv = decoder._bucket(cond_len + int(start.max()) + width - 1)
        session["live"].copy_(active.to(device))
        if row_generators is None:
            draws = torch.rand(live.shape[0], session["u"].shape[1], generator=generator, device=device)
        else:
            draws = torch.stack([torch.rand(session["u"].shape[1], generator=row_generators[i], device=device)
                                 for i in live.tolist()])
        session["u"].index_copy_(0, live.to(device), draws)
        decoder._graph(session, params, kv).replay()
        forwards[live] += 1
        model_calls += 1
        n_before = n_host
    if done_before < max_new:
        progress(max_new - done_before)
    return JacobiResult(out, forwards, model_calls, drafted, accepted_total)


_DECODERS: weakref.WeakKeyDictionary[GPT, JacobiGraphs] = weakref.WeakKeyDictionary()


def graphs_for(gpt: GPT) -> JacobiGraphs:
    """The cached captured-step decoder of `gpt` (CUDA), created on first use."""
    weight = gpt.tok_embeddings.weight
    decoder = _DECODERS.get(gpt)
    if decoder is None or decoder.device != weight.device:
        decoder = JacobiGraphs(gpt, cuda_graphs=True)
        _DECODERS[gpt] = decoder
    return decoder
