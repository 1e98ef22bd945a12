"""`Engine`: fast KV-cache decoding of a `GPT` with a static cache and (on CUDA) captured graphs.

Contract: `Engine(gpt).generate(cond, cond_mask, params, generator=...)` samples (B, N) int64
tokens from the same distribution as `argen.sampling.reference_generate`; greedy decoding
(top_k=1) gives the reference's tokens exactly in float32 on the CPU. The random stream differs
(see `argen.engine.sampler`), so sampled tokens for a given seed are the engine's own. It does less
work per token:
- the KV cache is allocated once per batch shape (`gpt.new_cache`) and reused across calls;
- attention reads only the filled prefix: on the CPU `kv_len = pos + 1` with no mask for c2i and a
  slice of a precomputed key-valid mask for t2i; on CUDA one graph per 64-slot kv bucket with the
  causal limit applied by a mask inside the bucket;
- cond and uncond rows run in one forward; guidance, temperature, top-k, top-p and the draw run on
  the device (see `argen.engine.sampler`) with no host synchronisation inside the decode loop;
- the layer stack is a lean loop over the model's own weights (no module dispatch, one complex
  multiply for the RoPE of q and k together); it computes what `GPT.forward_cached` computes, up to
  float rounding order;
- on CUDA the one-token decode step, sampling included, is captured as CUDA graphs and replayed.

The engine reads the model's parameters directly and notices when they change (`_version`,
storage, dtype, device), so a model being trained can be sampled between steps. Dropout is never
applied (inference semantics). Per-row `SamplingParams` and per-row generators serve the HTTP
server: a row's tokens depend only on its own condition, parameters and generator.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F

from argen.engine.sampler import RowParams, build_row_params, sample_tokens
from argen.models.gpt import GPT, prefix_attention_mask
from argen.nn.rope import rope_2d_table
from argen.sampling.logits import SamplingParams
from argen.sampling.reference import prepare_condition
from argen.utils.errors import ArgenError

KV_BUCKET = 64


def _no_progress(steps: int) -> None:
    pass


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 or x.is_cuda:  # fused; in float32 the same bits as the model's RMSNorm
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def draw_uniforms(batch: int, num_tokens: int, device, generator: torch.Generator | None,
                  row_generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """(B, N) float32 U[0, 1): one number per row and step, all drawn before the decode loop.

    Per-row generators fill their own row, so a row's randomness does not depend on the batch.
    """
    if row_generators is None:
        return torch.rand(batch, num_tokens, generator=generator, device=device)
    return torch.stack([torch.rand(num_tokens, generator=gen, device=device) for gen in row_generators])


class _Weights:
    """The model's parameters, cast to the compute dtype, plus a signature to detect changes."""

    def __init__(self, gpt: GPT, dtype: torch.dtype):
        self.signature = _signature(gpt)

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.detach() if t.dtype == dtype else t.detach().to(dtype)

        self.layers = [
            (cast(b.attention_norm.weight), cast(b.attention.wqkv.weight), cast(b.attention.wo.weight),
             cast(b.ffn_norm.weight), cast(b.feed_forward.w1.weight), cast(b.feed_forward.w3.weight),
             cast(b.feed_forward.w2.weight))
            for b in gpt.layers
        ]
        self.eps = [(b.attention_norm.eps, b.ffn_norm.eps) for b in gpt.layers]
        self.norm = cast(gpt.norm.weight)
        self.norm_eps = gpt.norm.eps
        self.output = cast(gpt.output.weight)
        self.embedding = cast(gpt.tok_embeddings.weight)


def _signature(gpt: GPT) -> tuple:
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in gpt.parameters())


class _Session:
    """Static state for one batch shape: cache, token/step buffers, uniforms and (CUDA) graphs."""

    def __init__(self, engine: Engine, rows: int, batch: int, num_tokens: int, rp: RowParams):
        self.rows, self.batch, self.num_tokens = rows, batch, num_tokens
        device = engine.device
        self.cache_len = engine.cache_len
        self.cache = engine.gpt.new_cache(rows, self.cache_len, dtype=engine.dtype, device=device)
        self.uniforms = torch.zeros(batch, num_tokens, device=device)
        self.graphs: dict[tuple, dict[int, torch.cuda.CUDAGraph]] = {}  # static facts -> kv bucket -> graph
        self.rp = rp  # static copies (graph mode) or the caller's (eager mode)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.out = torch.zeros(batch, num_tokens, dtype=torch.long, device=device)
        self.key_valid = torch.ones(rows, self.cache_len, dtype=torch.bool, device=device)


class _EagerStep:
    """Stands in for a captured graph: `replay()` runs the same static-shape step eagerly."""

    def __init__(self, engine: Engine, w: _Weights, session: _Session, srp: RowParams, kv_bucket: int):
        self.args = (w, session, srp, kv_bucket)
        self.engine = engine

    def replay(self) -> None:
        self.engine._decode_step(*self.args)


class Engine:
    """Fast generator for one `GPT`. Reuse one instance: caches and graphs persist across calls.

    dtype: compute dtype of weights and cache (default: the model's); bf16 weights are cast copies
    when the model is float32. cuda_graphs: None = on for CUDA devices; True on a CPU runs the
    same static-shape, bucket-masked step eagerly (to test the graph path without a GPU). max_batch: images per chunk
    (larger requests are split). weak: hold the model by weak reference (the per-model cache of
    `argen.generate` uses this so that the cache never keeps a model alive).
    """

    def __init__(self, gpt: GPT, dtype: torch.dtype | None = None, cuda_graphs: bool | None = None,
                 max_batch: int | None = None, kv_bucket: int = KV_BUCKET, max_sessions: int = 2,
                 weak: bool = False):
        self._gpt = weakref.ref(gpt) if weak else (lambda: gpt)
        weight = gpt.tok_embeddings.weight
        self.device = weight.device
        self.dtype = dtype or weight.dtype
        self.use_graphs = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        self.max_batch = max_batch or (256 if self.device.type == "cuda" else 64)
        self.kv_bucket = kv_bucket
        cfg = gpt.config
        self.cond_len = cfg.cond_len
        full = cfg.cond_len + cfg.num_image_tokens
        self.cache_len = kv_bucket * math.ceil(full / kv_bucket) if self.use_graphs else full
        table = rope_2d_table(cfg.grid_size, cfg.head_dim, cfg.rope_base, cfg.cond_len).to(self.device)
        self.rotation = torch.complex(table[:, None, :, 0], table[:, None, :, 1])  # (S, 1, D/2): cos + i sin
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self._weights: _Weights | None = None
        self._sessions: OrderedDict[tuple, _Session] = OrderedDict()
        self.max_sessions = max_sessions
        self._pool = None  # one CUDA graph memory pool for all captures (replays never overlap)
        self._stream = None  # the side stream of every warm-up and capture (see `_capture`)
        self._capture_on_device = self.use_graphs and self.device.type == "cuda"

    @property
    def gpt(self) -> GPT:
        gpt = self._gpt()
        if gpt is None:
            raise RuntimeError("the engine's model has been garbage-collected")
        return gpt

    # ------------------------------------------------------------ public
    def generate(self, cond: torch.Tensor, cond_mask: torch.Tensor | None = None,
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 generator: torch.Generator | None = None,
                 row_generators: Sequence[torch.Generator] | None = None,
                 max_new_tokens: int | None = None, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """(B,) class ids or (B, L, D) captions -> (B, max_new_tokens) int64 tokens on the model's device.

        params: one SamplingParams for all rows or one per row. generator: one generator for the
        whole batch; row_generators: one per row (the server), so that each row's randomness is its own.
        progress: called with 1 after each token step of each chunk, from the host loop (it never
        waits for the device, so on CUDA it may run ahead of the kernels).
        """
        cfg = self.gpt.config
        num_tokens = cfg.num_image_tokens
        max_new_tokens = num_tokens if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= max_new_tokens <= num_tokens:
            raise ArgenError(f"max_new_tokens must lie in [1, {num_tokens}], got {max_new_tokens}")
        batch = cond.shape[0] if cond.ndim else 0
        if row_generators is not None and len(row_generators) != batch:
            raise ArgenError(f"{len(row_generators)} row generators for {batch} rows")
        for gen in [generator] + list(row_generators or []):
            if gen is not None and gen.device.type != self.device.type:
                raise ArgenError(f"the generator is on {gen.device} but the model is on {self.device}; "
                                 f"create it with torch.Generator(device={str(self.device)!r})")
        if not isinstance(params, SamplingParams) and len(params) != batch:
            raise ArgenError(f"{len(params)} SamplingParams for {batch} rows")
        self.gpt.check_condition(cond, cond_mask)
        if batch == 0:
            return torch.empty(0, max_new_tokens, dtype=torch.long, device=self.device)
        pieces = []
        for start in range(0, batch, self.max_batch):
            stop = min(batch, start + self.max_batch)
            sub_params = params if isinstance(params, SamplingParams) else list(params)[start:stop]
            sub_mask = None if cond_mask is None else cond_mask[start:stop]
            sub_gens = None if row_generators is None else list(row_generators)[start:stop]
            pieces.append(self._generate_chunk(cond[start:stop], sub_mask, sub_params, generator, sub_gens,
                                               max_new_tokens, progress or _no_progress))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    # ------------------------------------------------------------ internals
    def _current_weights(self) -> _Weights:
        if self._weights is None or self._weights.signature != _signature(self.gpt):
            if self.gpt.tok_embeddings.weight.device != self.device:
                raise ArgenError(f"the model moved to {self.gpt.tok_embeddings.weight.device}; build a new Engine")
            self._weights = _Weights(self.gpt, self.dtype)
            self._sessions.clear()  # graphs hold the old weights' addresses
        return self._weights

    def _generate_chunk(self, cond, cond_mask, params, generator, row_generators, max_new_tokens, progress):
        weights = self._current_weights()
        if isinstance(params, SamplingParams):
            guided = params.guided
        else:
            guided = any(p.guided for p in params)
        batch = cond.shape[0]
        if self.use_graphs:  # pad to a power of two so that few graph sets serve every batch size
            padded = min(self.max_batch, 1 << (batch - 1).bit_length())
            if padded > batch:
                cond, cond_mask, params, row_generators = self._pad(cond, cond_mask, params, row_generators,
                                                                   padded - batch)
        with torch.inference_mode():
            rows, key_mask = prepare_condition(self.gpt, cond, cond_mask, guided)
            rp = build_row_params(params, cond.shape[0], max_new_tokens, self.gpt.config.vocab_size, self.device,
                                  k_bucket=64 if self.use_graphs else 1)
            if self.use_graphs:
                out = self._run_graphs(weights, rows, key_mask, rp, generator, row_generators, max_new_tokens,
                                       progress)
            else:
                out = self._run_eager(weights, rows, key_mask, rp, generator, row_generators, max_new_tokens,
                                      progress)
        return out[:batch].clone()  # a normal tensor, usable outside inference mode

    def _pad(self, cond, cond_mask, params, row_generators, extra: int):
        """Repeat the last row `extra` times (its output is dropped)."""
        cond = torch.cat([cond, cond[-1:].expand(extra, *cond.shape[1:])])
        if cond_mask is not None:
            cond_mask = torch.cat([cond_mask, cond_mask[-1:].expand(extra, *cond_mask.shape[1:])])
        if not isinstance(params, SamplingParams):
            params = list(params) + [params[-1]] * extra
        if row_generators is not None:
            row_generators = list(row_generators) + [torch.Generator(device=self.device) for _ in range(extra)]
        return cond, cond_mask, params, row_generators

    def _session(self, key: tuple, make) -> _Session:
        session = self._sessions.get(key)
        if session is None:
            while len(self._sessions) >= self.max_sessions:
                self._sessions.popitem(last=False)
            session = make()
            self._sessions[key] = session
        self._sessions.move_to_end(key)
        return session

    def _forward(self, w: _Weights, h: torch.Tensor, rot: torch.Tensor, pos, kv_len: int,
                 mask: torch.Tensor | None, cache: list[torch.Tensor]) -> torch.Tensor:
        """Layer stack on h (B', T, C) at positions pos.. (int: slice writes; (1,) tensor: index
        writes); rot (T, 1, D/2) complex rotations of those positions."""
        batch, seq, dim = h.shape
        n_head, n_kv, head_dim = self.n_head, self.n_kv_head, self.head_dim
        kv_dim = n_kv * head_dim
        for (attn_norm, wqkv, wo, ffn_norm, w1, w3, w2), (eps1, eps2), layer_cache in zip(w.layers, w.eps, cache):
            qkv = F.linear(_rms(h, attn_norm, eps1), wqkv)  # (B', T, C + 2 kv_dim)
            pairs = qkv[..., :dim + kv_dim].float().view(batch, seq, n_head + n_kv, head_dim // 2, 2)
            rotated = torch.view_as_real(torch.view_as_complex(pairs) * rot).flatten(3)
            rotated = rotated.to(h.dtype)  # (B', T, H + H_kv, D)
            q = rotated[:, :, :n_head].transpose(1, 2)
            k = rotated[:, :, n_head:].transpose(1, 2)
            v = qkv[..., dim + kv_dim:].view(batch, seq, n_kv, head_dim).transpose(1, 2)
            cache_k, cache_v = layer_cache[0], layer_cache[1]  # (B', H_kv, S, D)
            if isinstance(pos, int):
                cache_k[:, :, pos:pos + seq] = k
                cache_v[:, :, pos:pos + seq] = v
            else:
                cache_k.index_copy_(2, pos, k)
                cache_v.index_copy_(2, pos, v)
            keys, values = cache_k[:, :, :kv_len], cache_v[:, :, :kv_len]
            if n_kv != n_head:
                keys = keys.repeat_interleave(n_head // n_kv, dim=1)
                values = values.repeat_interleave(n_head // n_kv, dim=1)
            att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B', H, T, D)
            h = h + F.linear(att.transpose(1, 2).reshape(batch, seq, dim), wo)
            x = _rms(h, ffn_norm, eps2)
            h = h + F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
        return h

    def _decode_cpu(self, w: _Weights, h: torch.Tensor, pos: int, mask: torch.Tensor | None,
                    cache: list[torch.Tensor]) -> torch.Tensor:
        """One-token step on the CPU with 2-D activations h (B', C): the same arithmetic as
        `_forward`, with fewer dispatched ops and two batched matmuls instead of the flash kernel,
        whose fixed cost dominates for a single query."""
        rows, dim = h.shape
        n_head, n_kv, head_dim = self.n_head, self.n_kv_head, self.head_dim
        kv_dim = n_kv * head_dim
        kv_len = pos + 1
        rot = self.rotation[pos]  # (1, D/2) complex: cos + i sin
        for (attn_norm, wqkv, wo, ffn_norm, w1, w3, w2), (eps1, eps2), layer_cache in zip(w.layers, w.eps, cache):
            qkv = F.linear(_rms(h, attn_norm, eps1), wqkv)  # (B', C + 2 kv_dim)
            pairs = torch.view_as_complex(qkv[:, :dim + kv_dim].float().view(rows, n_head + n_kv, head_dim // 2, 2))
            rotated = torch.view_as_real(pairs * rot).view(rows, n_head + n_kv, head_dim).to(h.dtype)
            layer_cache[0, :, :, pos] = rotated[:, n_head:]
            layer_cache[1, :, :, pos] = qkv[:, dim + kv_dim:].view(rows, n_kv, head_dim)
            keys = layer_cache[0, :, :, :kv_len]  # (B', H_kv, kv, D)
            values = layer_cache[1, :, :, :kv_len]
            if n_kv != n_head:
                keys = keys.repeat_interleave(n_head // n_kv, dim=1)
                values = values.repeat_interleave(n_head // n_kv, dim=1)
            q = rotated[:, :n_head].reshape(rows * n_head, 1, head_dim)
            scores = torch.bmm(q, keys.flatten(0, 1).transpose(1, 2)).mul_(self.scale)  # (B' H, 1, kv)
            if mask is not None:
                scores = scores.masked_fill_(~mask, float("-inf"))
            att = torch.bmm(scores.softmax(dim=-1), values.flatten(0, 1)).view(rows, dim)
            h = h + F.linear(att, wo)
            x = _rms(h, ffn_norm, eps2)
            h = h + F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
        return F.linear(_rms(h, w.norm, w.norm_eps), w.output).float()  # (B', V)

    def _head(self, w: _Weights, h: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms(h[:, -1], w.norm, w.norm_eps), w.output).float()  # (B', V)

    def _prefill(self, w: _Weights, rows, key_mask, cache) -> torch.Tensor:
        prefix = self.gpt.embed_condition(rows).to(self.dtype)  # (B', L, C)
        length = self.cond_len
        mask = None if key_mask is None else prefix_attention_mask(key_mask, length)
        h = self._forward(w, prefix, self.rotation[:length], 0, length, mask, cache)
        return self._head(w, h)

    def _run_eager(self, w, rows, key_mask, rp: RowParams, generator, row_generators, num_tokens, progress):
        batch, n_rows = rp.batch, rows.shape[0]
        session = self._session(("eager", n_rows, batch, num_tokens),
                                lambda: _Session(self, n_rows, batch, num_tokens, rp))
        uniforms = draw_uniforms(batch, num_tokens, self.device, generator, row_generators)
        cache = session.cache
        length = self.cond_len
        lean = self.device.type == "cpu"
        step_mask = None
        if key_mask is not None:
            session.key_valid[:, :length] = key_mask
            if lean:  # (B' H, 1, S): one row per (row, head) pair, as the batched matmuls see it
                step_mask = session.key_valid.repeat_interleave(self.n_head, dim=0)[:, None, :]
            else:
                step_mask = session.key_valid[:, None, None, :]  # (B', 1, 1, S)
        uniform_scales = rp.scales[0].tolist() if rp.uniform is not None else None
        out = session.out
        logits = self._prefill(w, rows, key_mask, cache)
        embedding = w.embedding
        for t in range(num_tokens):
            scale = uniform_scales[t] if uniform_scales is not None else rp.scales[:, t:t + 1]
            token = sample_tokens(logits, rp, scale, uniforms[:, t])
            out[:, t] = token
            progress(1)
            if t + 1 == num_tokens:
                break
            tokens = torch.cat([token, token]) if rp.guided else token  # (B',)
            pos = length + t
            mask = None if step_mask is None else step_mask[..., :pos + 1]
            if lean:
                logits = self._decode_cpu(w, F.embedding(tokens, embedding), pos, mask, cache)
            else:
                h = F.embedding(tokens[:, None], embedding)  # (B', 1, C)
                h = self._forward(w, h, self.rotation[pos:pos + 1], pos, pos + 1, mask, cache)
                logits = self._head(w, h)
        return out

    # ------------------------------------------------------------ CUDA graphs
    def _run_graphs(self, w, rows, key_mask, rp: RowParams, generator, row_generators, num_tokens, progress):
        batch, n_rows = rp.batch, rows.shape[0]

        def make():
            static = RowParams(rp.temperature.clone(), rp.top_k.clone(), rp.top_p.clone(), rp.guided_rows.clone(),
                               rp.scales.clone(), rp.guided, rp.all_guided, rp.k_max, rp.use_top_p, uniform=None)
            return _Session(self, n_rows, batch, num_tokens, static)

        session = self._session(("graph", n_rows, batch, num_tokens), make)
        flags = (rp.k_max, rp.use_top_p, rp.guided, rp.all_guided)
        srp = replace(session.rp, k_max=rp.k_max, use_top_p=rp.use_top_p, guided=rp.guided,
                      all_guided=rp.all_guided)  # same static tensors, this batch's static facts
        graphs = session.graphs.get(flags)
        if graphs is None:
            if self._capture_on_device:
                graphs = self._capture(w, session, srp, num_tokens)
            else:  # the static-shape step without capture, kept like graphs so that a CPU tests their reuse
                graphs = {kv: _EagerStep(self, w, session, srp, kv) for kv in {self._bucket(t)
                                                                              for t in range(1, num_tokens)}}
            session.graphs[flags] = graphs
        for name in ("temperature", "top_k", "top_p", "guided_rows", "scales"):
            getattr(srp, name).copy_(getattr(rp, name))
        session.key_valid.fill_(True)
        if key_mask is not None:
            session.key_valid[:, :self.cond_len] = key_mask
        session.uniforms.copy_(draw_uniforms(batch, num_tokens, self.device, generator, row_generators))
        logits = self._prefill(w, rows, key_mask, session.cache)
        token = sample_tokens(logits, srp, srp.scales[:, :1], session.uniforms[:, 0])
        session.out[:, 0] = token
        session.tokens.copy_(torch.cat([token, token]) if srp.guided else token)
        session.step.fill_(1)
        progress(1)
        for t in range(1, num_tokens):
            graphs[self._bucket(t)].replay()
            progress(1)
        return session.out

    def _bucket(self, t: int) -> int:
        return min(self.cache_len, self.kv_bucket * math.ceil((self.cond_len + t) / self.kv_bucket))

    def _decode_step(self, w: _Weights, session: _Session, srp: RowParams, kv_bucket: int) -> None:
        """One graph-safe decode step: reads session.tokens/step, writes out[:, step], advances step."""
        step = session.step
        pos = step + (self.cond_len - 1)  # (1,) position of the input token
        h = F.embedding(session.tokens[:, None], w.embedding)  # (B', 1, C)
        keys = torch.arange(kv_bucket, device=self.device)
        visible = (keys <= pos) & session.key_valid[:, :kv_bucket]  # (B', kv)
        # additive mask built once per step (a bool mask would be converted inside every layer)
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(~visible, float("-inf"))
        h = self._forward(w, h, self.rotation.index_select(0, pos), pos, kv_bucket, mask[:, None, None, :],
                          session.cache)
        logits = self._head(w, h)
        scale = srp.scales.index_select(1, step)  # (B, 1)
        token = sample_tokens(logits, srp, scale, session.uniforms.index_select(1, step)[:, 0])
        session.out.index_copy_(1, step, token[:, None])
        session.tokens.copy_(torch.cat([token, token]) if srp.guided else token)
        step.add_(1)

    def _capture(self, w: _Weights, session: _Session, srp: RowParams, num_tokens: int) -> dict:
        """Capture one graph per kv bucket. Capturing runs nothing; the warm-up does run, but only
        writes state (cache slots, out, step) that every real run overwrites before reading.

        Everything happens on the engine's device (which need not be the current one: under torchrun
        each rank's model sits on its own GPU) and on one side stream, so that kernels, cuBLAS
        workspaces and allocations are set up for that stream by the warm-up, outside capture.
        "thread_local" capture: the server decodes images on another thread meanwhile, and the
        default ("global") mode would turn that thread's allocations and copies into capture errors.
        """
        session.uniforms.fill_(0.5)
        buckets = sorted({self._bucket(t) for t in range(1, num_tokens)})
        with torch.cuda.device(self.device):
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=self.device)
            side = self._stream
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for kv in buckets:  # kernels are selected and workspaces allocated outside capture
                    session.step.fill_(1)
                    self._decode_step(w, session, srp, kv)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graphs = {}
            for kv in buckets:
                graph = torch.cuda.CUDAGraph()
                session.step.fill_(1)
                with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                    self._decode_step(w, session, srp, kv)
                graphs[kv] = graph
            torch.cuda.synchronize(self.device)
        return graphs
