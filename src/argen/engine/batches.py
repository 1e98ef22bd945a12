"""Static batching over the one decode loop: a batch is admitted at step 0 and stepped to the end.

Contract: `Batches(gpt).generate(cond, cond_mask, params, generator=...)` samples (B, N) int64 tokens
from the same distribution as `argen.sampling.reference_generate`; greedy decoding (top_k=1) gives the
reference's tokens exactly in float32 on the CPU. `run(..., step=JacobiStep(window))` does the same
with Jacobi iterations and returns the counts too (`BatchResult`). There is no decoding here: each
chunk of up to `max_batch` images is admitted into a `SlotDecoder` (`argen.engine.slots`) of as many
slots (a power of two with CUDA graphs, so that few graph sets serve every batch size) and stepped
until every image is done. The decoders, with their caches and graphs, are kept per (slots, step
policy), `max_sessions` of them, least recently used first out.

Randomness, as before this layer existed: plain steps use one U[0, 1) per image and token drawn
before the loop (`torch.rand(B, N)` from `generator`, padded to the slot count with graphs, or
`torch.rand(N)` from each of `row_generators`); Jacobi steps draw each iteration's numbers from the
image's generator, images sharing one generator drawing together in image order. With row generators
an image's tokens depend only on its own condition, parameters and seed.

`Engine` is this class under its earlier name (`argen.engine.Engine`).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from copy import copy
from dataclasses import dataclass

import torch

from argen.engine.slots import KV_BUCKET, PlainStep, SlotDecoder, SlotRequest, check_compute_dtype, draw_uniforms
from argen.models.gpt import GPT
from argen.sampling.logits import SamplingParams
from argen.utils.errors import ArgenError


@dataclass
class BatchResult:
    tokens: torch.Tensor  # (B, N) int64
    forwards: torch.Tensor  # (B,) int64: forward passes each image took (prefill, steps, extends of kept runs)
    model_calls: int  # forward passes of the model (prefill, batched steps, extends of kept runs)
    drafted: int  # drafts verified (Jacobi)
    accepted: int  # tokens gained past the first of each Jacobi iteration (accepted drafts, with a tree its branch's)
    rescued: int = 0  # Jacobi iterations in which an alternative of the draft tree won

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)


def _no_progress(steps: int) -> None:
    pass


class Batches:
    """Static batches of one `GPT`. Reuse one instance: decoders (caches, graphs) persist across calls.

    dtype: must be None or the model's dtype (cast the model instead). cuda_graphs: None = on for
    CUDA devices; True on a CPU runs the same fixed-shape step eagerly. max_batch: images per chunk
    (larger requests are split). weak: hold the model by weak reference.
    """

    def __init__(self, gpt: GPT, dtype: torch.dtype | None = None, cuda_graphs: bool | None = None,
                 max_batch: int | None = None, kv_bucket: int = KV_BUCKET, max_sessions: int = 2,
                 weak: bool = False):
        check_compute_dtype(gpt, dtype)
        self._gpt = weakref.ref(gpt) if weak else (lambda: gpt)
        self.device = gpt.tok_embeddings.weight.device
        self.use_graphs = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        self._capture_on_device = self.use_graphs and self.device.type == "cuda"
        self.max_batch = max_batch or (256 if self.device.type == "cuda" else 64)
        self.kv_bucket = kv_bucket
        self.max_sessions = max_sessions
        self._decoders: OrderedDict[tuple, SlotDecoder] = OrderedDict()
        self._graph_pool: dict = {}  # one CUDA graph memory pool and side stream for all captures

    @property
    def gpt(self) -> GPT:
        gpt = self._gpt()
        if gpt is None:
            raise RuntimeError("the engine's model has been garbage-collected")
        return gpt

    @property
    def dtype(self) -> torch.dtype:
        return self.gpt.tok_embeddings.weight.dtype

    def generate(self, cond: torch.Tensor, cond_mask: torch.Tensor | None = None,
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 generator: torch.Generator | None = None,
                 row_generators: Sequence[torch.Generator] | None = None,
                 max_new_tokens: int | None = None, progress: Callable[[int], None] | None = None,
                 forced: torch.Tensor | None = None, adapters: Sequence[int | None] | None = None) -> torch.Tensor:
        """(B,) class ids or (B, L, D) captions -> (B, max_new_tokens) int64 tokens on the model's device.

        params: one SamplingParams for all rows or one per row. generator: one generator for the
        whole batch; row_generators: one per row (the server), so that each row's randomness is its own.
        progress: called after each step of each chunk with the tokens by which its slowest image
        advanced (plain steps: 1 per token), from the host loop. forced: (B, max_new_tokens) int64 kept
        tokens (-1 where sampled; see `argen.engine.slots`). adapters: one per row, the index of the
        model's served LoRA adapter (`SlotRequest.adapter`) or None for the base; rows of different
        adapters share every step.
        """
        return self.run(cond, cond_mask, params, generator, row_generators, max_new_tokens, progress,
                        forced=forced, adapters=adapters).tokens

    def run(self, cond: torch.Tensor, cond_mask: torch.Tensor | None = None,
            params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
            generator: torch.Generator | None = None, row_generators: Sequence[torch.Generator] | None = None,
            max_new_tokens: int | None = None, progress: Callable[[int], None] | None = None,
            step=None, max_batch: int | None = None, forced: torch.Tensor | None = None,
            adapters: Sequence[int | None] | None = None) -> BatchResult:
        """`generate` with a step policy (default `PlainStep()`), returning the tokens and counts."""
        gpt = self.gpt
        num_tokens = gpt.config.num_image_tokens
        total = num_tokens if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= total <= num_tokens:
            raise ArgenError(f"max_new_tokens must lie in [1, {num_tokens}], got {total}")
        batch = cond.shape[0] if cond.ndim else 0
        if row_generators is not None and len(row_generators) != batch:
            raise ArgenError(f"{len(row_generators)} row generators for {batch} rows")
        for gen in [generator] + list(row_generators or []):
            if gen is not None and gen.device.type != self.device.type:
                raise ArgenError(f"the generator is on {gen.device} but the model is on {self.device}; "
                                 f"create it with torch.Generator(device={str(self.device)!r})")
        rows = [params] * batch if isinstance(params, SamplingParams) else list(params)
        if len(rows) != batch:
            raise ArgenError(f"{len(rows)} SamplingParams for {batch} rows")
        if adapters is not None and len(adapters) != batch:
            raise ArgenError(f"{len(adapters)} adapters for {batch} rows")
        if adapters is None or gpt.config.kind != "c2i" or not any(a is not None for a in adapters):
            gpt.check_condition(cond, cond_mask)  # else an adapter's own classes: checked per row at admission
        if forced is not None and (not isinstance(forced, torch.Tensor) or tuple(forced.shape) != (batch, total)):
            raise ArgenError(f"forced tokens must be a ({batch}, {total}) int64 tensor, got "
                             f"{tuple(getattr(forced, 'shape', ()))}")
        step = step if step is not None else PlainStep()
        results = []
        chunk = max_batch or self.max_batch
        for start in range(0, batch, chunk):
            stop = min(batch, start + chunk)
            gens = None if row_generators is None else list(row_generators)[start:stop]
            results.append(self._chunk(cond[start:stop], None if cond_mask is None else cond_mask[start:stop],
                                       rows[start:stop], generator, gens, total, progress or _no_progress, step,
                                       chunk, None if forced is None else forced[start:stop].cpu(),
                                       None if adapters is None else list(adapters)[start:stop]))
        if not results:
            return BatchResult(torch.empty(0, total, dtype=torch.long, device=self.device),
                               torch.zeros(0, dtype=torch.long), 0, 0, 0)
        return BatchResult(torch.cat([r.tokens for r in results]), torch.cat([r.forwards for r in results]),
                           sum(r.model_calls for r in results), sum(r.drafted for r in results),
                           sum(r.accepted for r in results), sum(r.rescued for r in results))

    def _decoder(self, slots: int, step) -> SlotDecoder:
        key = (slots,) + step.key
        decoder = self._decoders.get(key)
        if decoder is None:
            while len(self._decoders) >= self.max_sessions:
                self._decoders.popitem(last=False)
            decoder = SlotDecoder(self.gpt, slots, copy(step), cuda_graphs=self.use_graphs, kv_bucket=self.kv_bucket,
                                  weak=True)
            decoder._capture_on_device = self._capture_on_device
            decoder._graph_pool = self._graph_pool
            self._decoders[key] = decoder
        self._decoders.move_to_end(key)
        return decoder

    def _chunk(self, cond, cond_mask, params, generator, row_generators, total, progress, step,
               chunk, forced, adapters) -> BatchResult:
        batch = cond.shape[0]
        slots = min(chunk, 1 << (batch - 1).bit_length()) if self.use_graphs else batch
        decoder = self._decoder(slots, step)
        uniforms = None
        if isinstance(step, PlainStep):  # drawn as for the padded batch, so that seeds keep their tokens
            count = batch if row_generators is not None else slots
            uniforms = draw_uniforms(count, total, self.device, generator, row_generators)
        requests = [SlotRequest(cond[i], None if cond_mask is None else cond_mask[i], params[i],
                                generator if row_generators is None else row_generators[i], total, tag=i,
                                uniforms=None if uniforms is None else uniforms[i],
                                forced=None if forced is None else forced[i],
                                adapter=None if adapters is None else adapters[i]) for i in range(batch)]
        counters = dict(decoder.counters)
        decoder.admit(requests)
        progress(1)
        done_before, out = 1, {}
        while len(out) < batch:
            for request, tokens in decoder.step():
                out[request.tag] = tokens
            done_now = min([slot.steps for slot in decoder.slots] + [total])
            if done_now > done_before:
                progress(done_now - done_before)
                done_before = done_now
        gained = {k: decoder.counters.get(k, 0) - counters.get(k, 0) for k in decoder.counters}
        forwards = torch.tensor([r.forwards for r in requests], dtype=torch.long)
        return BatchResult(torch.stack([out[i] for i in range(batch)]), forwards,
                           1 + gained["decode_steps"] + gained["extends"],
                           gained.get("drafted", 0), gained.get("accepted", 0), gained.get("rescued", 0))


Engine = Batches  # the earlier name of the static-batch entry point

_ENGINES: weakref.WeakKeyDictionary[GPT, dict] = weakref.WeakKeyDictionary()


def engine_for(gpt: GPT, cuda_graphs: bool | None = None) -> Batches:
    """The cached `Batches` of `gpt` (created on first use; rebuilt when its device or dtype changes)."""
    weight = gpt.tok_embeddings.weight
    per_model = _ENGINES.setdefault(gpt, {})
    engine = per_model.get(cuda_graphs)
    if engine is None or engine.device != weight.device or engine.dtype != weight.dtype:
        engine = Batches(gpt, cuda_graphs=cuda_graphs, weak=True)
        per_model[cuda_graphs] = engine
    return engine
