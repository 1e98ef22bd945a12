"""`Engine`: fast KV-cache decoding of a `GPT` with a static cache and (on CUDA) captured graphs.

Contract: `Engine(gpt).generate(cond, cond_mask, params, generator=...)` samples (B, N) int64
tokens from the same distribution as `argen.sampling.reference_generate`; greedy decoding
(top_k=1) gives the reference's tokens exactly in float32 on the CPU. The random stream differs
(see `argen.engine.sampler`), so sampled tokens for a given seed are the engine's own.

The engine runs the model's own cached forward (`GPT.forward_cached`: fused qkv, one complex
multiply for the RoPE of q and k, attention over the filled prefix only); it holds no layer math
of its own. What it adds:
- the KV cache is allocated once per batch shape (`gpt.new_cache`) and reused across calls;
- attention reads only the filled prefix: on the CPU `kv_len = pos + 1` with no mask for c2i and a
  slice of one precomputed additive key mask for t2i; on CUDA one graph per 64-slot kv bucket with
  the causal limit applied by a mask inside the bucket;
- cond and uncond rows run in one forward; guidance, temperature, top-k, top-p and the draw run on
  the device (see `argen.engine.sampler`) with no host synchronisation inside the decode loop;
- on CUDA the one-token decode step, sampling included, is captured as CUDA graphs and replayed.

The compute dtype is the model's: cast the model (`gpt.to(torch.bfloat16)`, `load_gpt(dtype=...)`)
for bf16. The engine notices when the parameters change (`_version`, storage, dtype), so a model
being trained can be sampled between steps; it drops its graphs then. Dropout is never applied.
Per-row `SamplingParams` and per-row generators serve the HTTP server: a row's tokens depend only
on its own condition, parameters and generator. Continuous batching is `argen.engine.slots`.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from argen.engine.sampler import RowParams, build_row_params, sample_tokens
from argen.models.gpt import GPT, prefix_attention_mask
from argen.sampling.logits import SamplingParams
from argen.sampling.reference import prepare_condition
from argen.utils.errors import ArgenError

KV_BUCKET = 64


def _no_progress(steps: int) -> None:
    pass


def draw_uniforms(batch: int, num_tokens: int, device, generator: torch.Generator | None,
                  row_generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """(B, N) float32 U[0, 1): one number per row and step, all drawn before the decode loop.

    Per-row generators fill their own row, so a row's randomness does not depend on the batch.
    """
    if row_generators is None:
        return torch.rand(batch, num_tokens, generator=generator, device=device)
    return torch.stack([torch.rand(num_tokens, generator=gen, device=device) for gen in row_generators])


def weights_signature(gpt: GPT) -> tuple:
    """Changes whenever a parameter is rebound, edited in place, cast or moved."""
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in gpt.parameters())


def changed_weights(gpt: GPT, device: torch.device, signature: tuple | None, owner: str) -> tuple | None:
    """The model's new `weights_signature` if it differs from `signature` (the caller then drops what
    holds the old weights' addresses), else None. A model moved off `device` is an error naming `owner`."""
    new = weights_signature(gpt)
    if new == signature:
        return None
    if gpt.tok_embeddings.weight.device != device:
        raise ArgenError(f"the model moved to {gpt.tok_embeddings.weight.device}; build a new {owner}")
    return new


def check_compute_dtype(gpt: GPT, dtype: torch.dtype | None) -> None:
    weight = gpt.tok_embeddings.weight
    if dtype is not None and dtype != weight.dtype:
        name = str(dtype).replace("torch.", "")
        raise ArgenError(f"the model is {str(weight.dtype).replace('torch.', '')} but {name} was asked for; cast "
                         f"the model (gpt.to(torch.{name}) or load_gpt(..., dtype=torch.{name}))")


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool visibility -> 0 / -inf in `dtype` (what attention adds to its scores)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


def capture_graphs(device, pool_holder, steps: dict, before_each: Callable[[], None]) -> dict:
    """Capture one CUDA graph per entry of `steps` (key -> callable running the step).

    `before_each()` resets the state a step reads before its warm-up and before its capture.
    Everything happens on `device` (which need not be the current one: under torchrun each rank's
    model sits on its own GPU) and on one side stream, so that kernels, cuBLAS workspaces and
    allocations are set up for that stream by the warm-up, outside capture. "thread_local"
    capture: the server decodes images on another thread meanwhile, and the default ("global")
    mode would turn that thread's allocations and copies into capture errors. `pool_holder` is
    the owner's dict holding the one graph memory pool and side stream (replays never overlap).
    """
    with torch.cuda.device(device):
        if pool_holder.get("pool") is None:
            pool_holder["pool"] = torch.cuda.graph_pool_handle()
        if pool_holder.get("stream") is None:
            pool_holder["stream"] = torch.cuda.Stream(device=device)
        side = pool_holder["stream"]
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for step in steps.values():  # kernels are selected and workspaces allocated outside capture
                before_each()
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graphs = {}
        for key, step in steps.items():
            graph = torch.cuda.CUDAGraph()
            before_each()
            with torch.cuda.graph(graph, pool=pool_holder["pool"], stream=side, capture_error_mode="thread_local"):
                step()
            graphs[key] = graph
        torch.cuda.synchronize(device)
    return graphs


class _Session:
    """Static state for one batch shape: cache, token/step buffers, uniforms and (CUDA) graphs."""

    def __init__(self, engine: Engine, rows: int, batch: int, num_tokens: int, rp: RowParams):
        self.rows, self.batch, self.num_tokens = rows, batch, num_tokens
        device = engine.device
        self.cache_len = engine.cache_len
        self.cache = engine.gpt.new_cache(rows, self.cache_len, device=device)
        self.uniforms = torch.zeros(batch, num_tokens, device=device)
        self.graphs: dict[tuple, dict[int, torch.cuda.CUDAGraph]] = {}  # static facts -> kv bucket -> graph
        self.rp = rp  # static copies (graph mode) or the caller's (eager mode)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.out = torch.zeros(batch, num_tokens, dtype=torch.long, device=device)
        self.key_valid = torch.ones(rows, self.cache_len, dtype=torch.bool, device=device)
        self.key_bias: torch.Tensor | None = None  # (B', 1, 1, S) additive key mask (eager t2i)


class _EagerStep:
    """Stands in for a captured graph: `replay()` runs the same static-shape step eagerly."""

    def __init__(self, engine: Engine, session: _Session, srp: RowParams, kv_bucket: int):
        self.args = (session, srp, kv_bucket)
        self.engine = engine

    def replay(self) -> None:
        self.engine._decode_step(*self.args)


class Engine:
    """Fast generator for one `GPT`. Reuse one instance: caches and graphs persist across calls.

    dtype: must be None or the model's dtype (cast the model instead). cuda_graphs: None = on for
    CUDA devices; True on a CPU runs the same static-shape, bucket-masked step eagerly (to test the
    graph path without a GPU). max_batch: images per chunk (larger requests are split). weak: hold
    the model by weak reference (the per-model cache of `argen.generate` uses this so that the
    cache never keeps a model alive).
    """

    def __init__(self, gpt: GPT, dtype: torch.dtype | None = None, cuda_graphs: bool | None = None,
                 max_batch: int | None = None, kv_bucket: int = KV_BUCKET, max_sessions: int = 2,
                 weak: bool = False):
        check_compute_dtype(gpt, dtype)
        self._gpt = weakref.ref(gpt) if weak else (lambda: gpt)
        self.device = gpt.tok_embeddings.weight.device
        self.use_graphs = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        self.max_batch = max_batch or (256 if self.device.type == "cuda" else 64)
        self.kv_bucket = kv_bucket
        cfg = gpt.config
        self.cond_len = cfg.cond_len
        full = cfg.cond_len + cfg.num_image_tokens
        self.cache_len = kv_bucket * math.ceil(full / kv_bucket) if self.use_graphs else full
        self.positions = torch.arange(self.cache_len, device=self.device)  # sliced, never rebuilt
        self._signature: tuple | None = None
        self._sessions: OrderedDict[tuple, _Session] = OrderedDict()
        self.max_sessions = max_sessions
        self._graph_pool: dict = {}  # one CUDA graph memory pool and side stream for all captures
        self._capture_on_device = self.use_graphs and self.device.type == "cuda"

    @property
    def gpt(self) -> GPT:
        gpt = self._gpt()
        if gpt is None:
            raise RuntimeError("the engine's model has been garbage-collected")
        return gpt

    @property
    def dtype(self) -> torch.dtype:
        return self.gpt.tok_embeddings.weight.dtype

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
        self._check_weights()
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
    def _check_weights(self) -> None:
        """Drop caches and graphs (which hold the old weights' addresses) when the model changed."""
        signature = changed_weights(self.gpt, self.device, self._signature, "Engine")
        if signature is not None:
            self._signature = signature
            self._sessions.clear()

    def _generate_chunk(self, cond, cond_mask, params, generator, row_generators, max_new_tokens, progress):
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
            cfg = self.gpt.config  # guidance schedules span the whole grid, whatever max_new_tokens is
            rp = build_row_params(params, cond.shape[0], cfg.num_image_tokens, cfg.vocab_size, self.device,
                                  k_bucket=64 if self.use_graphs else 1)
            if self.use_graphs:
                out = self._run_graphs(rows, key_mask, rp, generator, row_generators, max_new_tokens, progress)
            else:
                out = self._run_eager(rows, key_mask, rp, generator, row_generators, max_new_tokens, progress)
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

    def _prefill(self, rows, key_mask, cache) -> torch.Tensor:
        """Condition prefix of every row through the model -> (B', V) logits of the first token."""
        gpt = self.gpt
        length = self.cond_len
        mask = None if key_mask is None else prefix_attention_mask(key_mask, length)
        logits = gpt.forward_cached(gpt.embed_condition(rows), self.positions[:length], cache, length, mask,
                                    last_only=True)
        return logits[:, 0]

    def _run_eager(self, rows, key_mask, rp: RowParams, generator, row_generators, num_tokens, progress):
        batch, n_rows = rp.batch, rows.shape[0]
        gpt = self.gpt
        session = self._session(("eager", n_rows, batch, num_tokens),
                                lambda: _Session(self, n_rows, batch, num_tokens, rp))
        uniforms = draw_uniforms(batch, num_tokens, self.device, generator, row_generators)
        cache = session.cache
        length = self.cond_len
        key_bias = None
        if key_mask is not None:
            session.key_valid[:, :length] = key_mask
            key_bias = additive_mask(session.key_valid, self.dtype)[:, None, None, :]  # (B', 1, 1, S)
        uniform_scales = rp.scales[0].tolist() if rp.uniform is not None else None
        out = session.out
        logits = self._prefill(rows, key_mask, cache)
        for t in range(num_tokens):
            scale = uniform_scales[t] if uniform_scales is not None else rp.scales[:, t:t + 1]
            token = sample_tokens(logits, rp, scale, uniforms[:, t])
            out[:, t] = token
            progress(1)
            if t + 1 == num_tokens:
                break
            tokens = torch.cat([token, token]) if rp.guided else token  # (B',)
            pos = length + t
            mask = None if key_bias is None else key_bias[..., :pos + 1]
            logits = gpt.forward_cached(gpt.embed_tokens(tokens[:, None]), self.positions[pos:pos + 1], cache,
                                        pos + 1, mask)[:, 0]
        return out

    # ------------------------------------------------------------ CUDA graphs
    def _run_graphs(self, rows, key_mask, rp: RowParams, generator, row_generators, num_tokens, progress):
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
            buckets = sorted({self._bucket(t) for t in range(1, num_tokens)})
            if self._capture_on_device:
                session.uniforms.fill_(0.5)
                steps = {kv: (lambda kv=kv: self._decode_step(session, srp, kv)) for kv in buckets}
                graphs = capture_graphs(self.device, self._graph_pool, steps, lambda: session.step.fill_(1))
            else:  # the static-shape step without capture, kept like graphs so that a CPU tests their reuse
                graphs = {kv: _EagerStep(self, session, srp, kv) for kv in buckets}
            session.graphs[flags] = graphs
        for name in ("temperature", "top_k", "top_p", "guided_rows", "scales"):
            getattr(srp, name).copy_(getattr(rp, name))
        session.key_valid.fill_(True)
        if key_mask is not None:
            session.key_valid[:, :self.cond_len] = key_mask
        session.uniforms.copy_(draw_uniforms(batch, num_tokens, self.device, generator, row_generators))
        logits = self._prefill(rows, key_mask, session.cache)
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

    def _decode_step(self, session: _Session, srp: RowParams, kv_bucket: int) -> None:
        """One graph-safe decode step: reads session.tokens/step, writes out[:, step], advances step."""
        gpt = self.gpt
        step = session.step
        pos = step + (self.cond_len - 1)  # (1,) position of the input token
        visible = (self.positions[:kv_bucket] <= pos) & session.key_valid[:, :kv_bucket]  # (B', kv)
        mask = additive_mask(visible, self.dtype)[:, None, None, :]  # (B', 1, 1, kv), once per step
        logits = gpt.forward_cached(gpt.embed_tokens(session.tokens[:, None]), pos, session.cache, kv_bucket,
                                    mask)[:, 0]
        scale = srp.scales.index_select(1, step)  # (B, 1)
        token = sample_tokens(logits, srp, scale, session.uniforms.index_select(1, step)[:, 0])
        session.out.index_copy_(1, step, token[:, None])
        session.tokens.copy_(torch.cat([token, token]) if srp.guided else token)
        step.add_(1)
