"""`SlotDecoder`: argen's one decode loop, over a fixed number of slots of one static KV cache.

Contract:
- The decoder owns the cache: `num_slots` slots of two rows each; row 2i holds image i's conditional
  sequence, row 2i + 1 its unconditional twin (null class / learned null caption). Both are
  allocated, prefilled and retired together. A step (and a prefill) runs the twins only when some
  slot it advances is guided; otherwise it runs the conditional rows alone (a strided view).
- What a request brings is data on its slot: its condition (class id, or caption features with their
  mask), `SamplingParams` (guidance scale, interval and schedule, temperature, top-k, top-p), its
  generator (or pre-drawn uniforms), its forced tokens, its position and its output row. No request
  feature is a class.
- Forced tokens (`SlotRequest.forced`, (max_new_tokens,) int64, -1 where the token is sampled): a
  kept token is given, never sampled, and both rows of a guided slot are fed it. With `PlainStep` a
  run of k kept tokens that a sampled token follows is fed in one forward pass of the slot's rows
  (an extend of k positions into its cache, outside any graph), so an edit takes about as many
  forward passes as it has tokens to regenerate plus runs of kept tokens; a run that ends the image
  takes none. Adjacent slots at one position whose runs have one length (the images of one edit)
  share that forward pass. A sampled token uses the uniform plain sampling draws for its index, so a request whose
  forced tokens are all -1 gives the tokens it gives without them. `JacobiStep` always accepts and
  never drafts a kept position. `SlotRequest.forwards` counts the forward passes a request took
  (prefill, steps and extends).
- How a step advances the active slots is the decoder's step policy, chosen once per decoder:
  `PlainStep` (one token a slot, one uniform per token drawn at admission: `torch.rand(max_new_tokens)`
  from the request's generator, or the request's own `uniforms`) or `argen.engine.jacobi.JacobiStep`
  (a Jacobi iteration of a window). A policy is a set of functions on the decoder's tensors, not a
  decoder: it starts new slots from their prefill logits, runs a graph-safe step, and keeps the host
  bookkeeping. It also says how many cache slots its step needs after the grid (`scratch_slots`: the
  branches of a Jacobi draft tree), which the decoder adds to each cache row.
- `admit(requests)` prefills new requests into free slots (between steps only) and starts them;
  `step()` advances every active slot, then retires the finished slots and returns their tokens;
  `cancel(predicate)` frees slots at once; `run(requests)` does it all. Static batching is a
  scheduling choice on top (`argen.engine.batches`): admit a batch, step it to the end.
- A slot's tokens do not depend on the other slots: its rows attend only to their own cache rows,
  masked by their own position and caption mask, and its tokens are drawn from its own logits,
  parameters and numbers. Greedy decoding gives the reference sampler's tokens.
- Adapters (a model with batched LoRA, `argen.nn.lora`): `SlotRequest.adapter` (0-based index into the
  model's `multi_lora.names`, None = the base) is written to both rows of the slot at admission
  (`state.adapter`, per row: 0 = base, k + 1 = adapter k), moves with the slot, and every forward pass
  runs with the index of the rows it covers (a captured step reads the tensor in place). The slot's
  condition is embedded with its adapter's condition embedding (its own classes or caption projection).
  A plain model ignores the field's absence; a request naming an adapter the model lacks is an error.
- CPU (eager): active slots are kept in slots [0, n) (a retired slot is filled by moving the last
  one into it, cache rows included) and a step runs rows [0, 2n) only, over max(position) + 1 cache
  slots (no position mask when every slot sits at one position). CUDA (`cuda_graphs`): the policy's
  all-slots step, with per-slot positions and parameters in static tensors, is captured once per
  (64-slot kv bucket, the static sampling facts: top-k width, top-p use, guidance) and replayed;
  graphs are dropped and recaptured when the model's weights change. Inactive slots cost compute only.
Not thread-safe: one thread drives a decoder.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from argen.engine.sampler import RowParams, build_row_params, sample_tokens, static_facts
from argen.models.gpt import GPT, prefix_attention_mask
from argen.nn.lora import multi_lora, rows_of
from argen.sampling.logits import SamplingParams
from argen.utils.errors import ArgenError

KV_BUCKET = 64  # cache slots per captured attention length
K_BUCKET = 64  # top-k candidates are rounded up to this in captured steps


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


def draw_uniforms(batch: int, num_tokens: int, device, generator: torch.Generator | None,
                  row_generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """(B, N) float32 U[0, 1): one number per image and token, from one generator for the batch or
    one per row (a row's numbers then do not depend on the batch)."""
    if row_generators is None:
        return torch.rand(batch, num_tokens, generator=generator, device=device)
    return torch.stack([torch.rand(num_tokens, generator=gen, device=device) for gen in row_generators])


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


@dataclass
class SlotRequest:
    """One image: its condition, settings and randomness; `tag` is the caller's handle."""

    cond: torch.Tensor  # () int64 class id (c2i) or (L, D) float caption features (t2i), left padded
    cond_mask: torch.Tensor | None = None  # (L,) 1 on real caption tokens; None = all real
    params: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator | None = None
    max_new_tokens: int | None = None  # default: the whole grid
    tag: object = None
    uniforms: torch.Tensor | None = None  # (max_new_tokens,) pre-drawn U[0, 1) of a plain step; None: drawn
    forced: torch.Tensor | None = None  # (max_new_tokens,) int64: >= 0 a kept token, -1 sampled; None: all sampled
    adapter: int | None = None  # index into the model's served LoRA adapters (multi_lora.names); None: the base
    forwards: int = 0  # set by the decoder: forward passes this request took (prefill, steps, extends)


@dataclass
class _Slot:
    request: SlotRequest
    total: int  # tokens to produce
    steps: int  # tokens produced so far
    pos: int  # sequence position of the next input token (cache slots < pos are filled)
    order: int  # admission order (slots sharing one generator draw in this order)
    masked: bool  # the caption has padding (attention needs a key mask)
    runs: list[int] | None = None  # kept tokens from each index on (a run's remaining length); None: none kept


class _State:
    """The device tensors of all slots (static addresses: graphs read them in place)."""

    def __init__(self, gpt: GPT, slots: int, cache_len: int, device):
        cfg = gpt.config
        n, rows, tokens = slots, 2 * slots, cfg.num_image_tokens
        self.cache = gpt.new_cache(rows, cache_len, device=device)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)  # next input token per row
        self.pos = torch.zeros(n, dtype=torch.long, device=device)  # its position
        self.step = torch.zeros(n, dtype=torch.long, device=device)  # index of the token it predicts
        self.live = torch.zeros(n, dtype=torch.long, device=device)  # 1 = active (advances)
        self.uniforms = torch.full((n, tokens), 0.5, device=device)  # a plain step's numbers
        self.scales = torch.ones(n, tokens, device=device)
        self.temperature = torch.ones(n, 1, device=device)
        self.top_k = torch.zeros(n, 1, dtype=torch.long, device=device)
        self.top_p = torch.ones(n, 1, device=device)
        self.guided_rows = torch.zeros(n, 1, dtype=torch.bool, device=device)
        self.key_valid = torch.ones(rows, cache_len, dtype=torch.bool, device=device)
        # key_valid as attention adds it (0 / -inf in the cache dtype), kept beside it: no per-step mask build
        self.key_bias = torch.zeros(rows, cache_len, dtype=self.cache[0].dtype, device=device)
        self.out = torch.zeros(n, tokens, dtype=torch.long, device=device)
        self.forced = torch.full((n, tokens), -1, dtype=torch.long, device=device)  # kept tokens, -1 sampled
        self.adapter = torch.zeros(rows, dtype=torch.long, device=device)  # per row: 0 base, k + 1 adapter k
        self.extra: tuple[torch.Tensor, ...] = ()  # the step policy's own per-slot tensors (moved with the slot)

    def per_slot(self):
        return (self.pos, self.step, self.live, self.uniforms, self.scales, self.temperature, self.top_k,
                self.top_p, self.guided_rows, self.out, self.forced) + self.extra

    def per_row(self):
        return self.tokens, self.key_valid, self.key_bias, self.adapter


def kept_runs(forced: list[int]) -> list[int]:
    """For each index, how many kept tokens (>= 0) start there in a row (0 where the token is sampled)."""
    runs = [0] * (len(forced) + 1)
    for i in range(len(forced) - 1, -1, -1):
        runs[i] = runs[i + 1] + 1 if forced[i] >= 0 else 0
    return runs[:-1]


def row_slice(n: int, guided: bool) -> slice:
    """Cache rows of slots [0, n): both twins when guided, else the conditional rows only."""
    return slice(0, 2 * n, 1 if guided else 2)


class PlainStep:
    """Step policy: every active slot samples one token (autoregressive decoding)."""

    key = ("plain",)

    def bind(self, decoder: SlotDecoder) -> None:
        self.decoder = decoder

    def start(self, first: int, requests: list[SlotRequest], totals: list[int], logits: torch.Tensor,
              rp: RowParams) -> None:
        """Token 0 of the new slots [first, first + k) from their prefill logits (rows, V)."""
        d = self.decoder
        st, k = d.state, len(requests)
        s = slice(first, first + k)
        for i, (r, total) in enumerate(zip(requests, totals)):
            drawn = r.uniforms if r.uniforms is not None else torch.rand(total, generator=r.generator, device=d.device)
            st.uniforms[first + i, :total] = drawn
        token = sample_tokens(logits, rp, st.scales[s, :1], st.uniforms[s, 0])
        kept = st.forced[s, 0]
        token = torch.where(kept >= 0, kept, token)
        st.out[s, 0] = token
        st.tokens[2 * first:2 * (first + k)] = token.repeat_interleave(2)
        self.feed_kept(range(first, first + k))

    def scratch_slots(self, config) -> int:
        """Cache slots the step needs after the grid (for a model of this `GPTConfig`): none."""
        return 0

    def kv_len(self) -> int:
        return max(slot.pos for slot in self.decoder.slots) + 1

    def before_step(self) -> None:
        """Host work before a step (eager or replayed): none, the uniforms are pre-drawn."""

    def facts(self) -> tuple:
        """What the step's shape depends on besides the sampling facts (part of a graph's key)."""
        return ()

    def step_state(self) -> tuple[torch.Tensor, ...]:
        """The tensors a step changes (besides the cache), put back after a capture."""
        st = self.decoder.state
        return st.tokens, st.pos, st.step, st.out

    def run(self, n: int, kv: int, rp: RowParams, shared_pos: int | None) -> None:
        """One step of slots [0, n): reads tokens/pos/step, writes out[:, step], advances live slots.
        Graph-safe when shared_pos is None: no host reads, shapes fixed by (n, kv, rp's static facts).
        shared_pos (eager only): every slot's input sits at this position."""
        d = self.decoder
        gpt, st = d.gpt, d.state
        twins = 2 if rp.guided else 1
        rows = row_slice(n, rp.guided)
        cache = [c[:, rows] for c in st.cache]
        if shared_pos is not None:
            positions = d.positions[shared_pos:shared_pos + 1]  # (1,) shared by every row
            masked = any(slot.masked for slot in d.slots[:n])
            mask = st.key_bias[rows, None, None, :kv] if masked else None  # (rows, 1, 1, kv)
        else:
            pos = st.pos[:n, None].expand(n, twins).reshape(-1)  # (rows,) the rows of a slot at its position
            ahead = d.positions[:kv] > pos[:, None]  # (rows, kv) slots past a row's position
            mask = st.key_bias[rows, :kv].masked_fill(ahead, float("-inf"))[:, None, None, :]  # (rows, 1, 1, kv)
            positions = pos[:, None]
        h = gpt.embed_tokens(st.tokens[rows, None])  # (rows, 1, C)
        with rows_of(gpt, d.adapter_index(rows)):
            logits = gpt.forward_cached(h, positions, cache, kv, mask)[:, 0]  # (rows, V)

        def first(t: torch.Tensor) -> torch.Tensor:  # no view when the step covers every slot (graphs)
            return t if n == t.shape[0] else t[:n]

        index = first(st.step).clamp(max=d.num_tokens - 1)[:, None]  # (n, 1)
        token = sample_tokens(logits, rp, first(st.scales).gather(1, index), first(st.uniforms).gather(1, index)[:, 0])
        first(st.out).scatter_(1, index, token[:, None])
        st.tokens[:2 * n].copy_(token[:, None].expand(n, 2).reshape(2 * n))
        live = first(st.live)
        first(st.pos).add_(live)
        first(st.step).add_(live)

    def advance(self) -> None:
        """Host-side bookkeeping after a step: every slot sampled one token; then kept runs are fed."""
        for slot in self.decoder.slots:
            slot.steps += 1
            slot.pos += 1
        self.feed_kept(range(len(self.decoder.slots)))

    def feed_kept(self, slots: range) -> None:
        """Write the kept tokens that come next in these slots; for each run that does not end its
        image, feed the slot's last input and all of the run but its last token (the next step's
        input) into its cache. Adjacent slots at one position with runs of one length share one
        forward pass (an edit's images keep the same runs). Eager."""
        d = self.decoder
        st, pending = d.state, []
        for i in slots:
            slot = d.slots[i]
            j = slot.steps
            if slot.runs is None or j >= slot.total or not slot.runs[j]:
                continue
            k = min(slot.runs[j], slot.total - j)
            st.out[i, j:j + k] = st.forced[i, j:j + k]
            slot.steps += k
            st.step[i] += k
            if slot.steps < slot.total:
                pending.append((i, k))
        groups: list[list[tuple[int, int]]] = []
        for i, k in pending:
            last = groups[-1][-1] if groups else None
            if last is not None and last[0] == i - 1 and last[1] == k and d.slots[last[0]].pos == d.slots[i].pos:
                groups[-1].append((i, k))
            else:
                groups.append([(i, k)])
        for group in groups:
            self._extend([i for i, _ in group], group[0][1])

    def _extend(self, slots: list[int], k: int) -> None:
        """One forward of k positions for the adjacent slots `slots` (all at one position): inputs are
        each slot's last input and its kept tokens j .. j+k-2; the kept token j+k-1 becomes its next input."""
        d = self.decoder
        gpt, st = d.gpt, d.state
        first, n, pos = slots[0], len(slots), d.slots[slots[0]].pos
        guided = any(d.slots[i].request.params.guided for i in slots)
        twins = 2 if guided else 1
        rows = slice(2 * first, 2 * (first + n), 1 if guided else 2)
        j = torch.tensor([d.slots[i].steps - k for i in slots], device=d.device)  # (n,) first kept index
        kept = st.forced[first:first + n].gather(1, j[:, None] + torch.arange(k, device=d.device))  # (n, k)
        inputs = torch.cat([st.tokens[2 * first:2 * (first + n):2, None], kept[:, :-1]], dim=1)  # (n, k)
        positions = d.positions[pos:pos + k]  # (k,)
        kv = pos + k
        visible = (d.positions[:kv] <= positions[:, None]) & st.key_valid[rows, None, :kv]  # (rows, k, kv)
        h = gpt.embed_tokens(inputs.repeat_interleave(twins, dim=0))  # (rows, k, C)
        with rows_of(gpt, d.adapter_index(rows)):
            gpt.forward_cached(h, positions, [c[:, rows] for c in st.cache], kv, visible[:, None], last_only=True)
        st.tokens[2 * first:2 * (first + n)] = kept[:, -1].repeat_interleave(2)
        for i in slots:
            d.slots[i].pos += k
            d.slots[i].request.forwards += 1
        st.pos[first:first + n] += k
        d.counters["extends"] += 1

    def tokens(self, i: int, slot: _Slot) -> torch.Tensor:
        """The finished slot i's (total,) tokens."""
        return self.decoder.state.out[i, :slot.total]


class SlotDecoder:
    """The decoder of one `GPT` with `num_slots` image slots; `step` is its step policy (default
    `PlainStep()`; `argen.engine.jacobi.JacobiStep(window)` for Jacobi decoding).

    cuda_graphs: None = on for CUDA devices; True on a CPU runs the same fixed-shape step eagerly
    (or captured, under a graph simulator) to test the graph path. weak: hold the model by weak
    reference (the per-model caches of `argen.engine.batches` never keep a model alive).
    """

    def __init__(self, gpt: GPT, num_slots: int, step=None, cuda_graphs: bool | None = None,
                 kv_bucket: int = KV_BUCKET, dtype: torch.dtype | None = None, weak: bool = False):
        if num_slots < 1:
            raise ArgenError(f"the number of slots must be >= 1, got {num_slots}")
        check_compute_dtype(gpt, dtype)
        self._gpt = weakref.ref(gpt) if weak else (lambda: gpt)
        cfg = gpt.config
        self.device = gpt.tok_embeddings.weight.device
        self.num_slots = num_slots
        self.num_tokens = cfg.num_image_tokens
        self.cond_len = cfg.cond_len
        self.vocab_size = cfg.vocab_size
        self.use_graphs = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        self._capture_on_device = self.use_graphs and self.device.type == "cuda"
        self.kv_bucket = kv_bucket
        self.policy = step if step is not None else PlainStep()
        full = cfg.cond_len + cfg.num_image_tokens + self.policy.scratch_slots(cfg)  # + the step's scratch slots
        self.cache_len = kv_bucket * math.ceil(full / kv_bucket) if self.use_graphs else full
        self.positions = torch.arange(self.cache_len, device=self.device)
        self.state = _State(gpt, num_slots, self.cache_len, self.device)
        self.slots: list[_Slot] = []  # active slots, in slot order (slot i holds cache rows 2i, 2i + 1)
        self.graphs: dict[tuple, object] = {}
        self._graph_pool: dict = {}
        self._signature = None
        self._admitted = 0
        self.counters = {"prefills": 0, "decode_steps": 0, "slot_steps": 0, "extends": 0}
        self.lora = multi_lora(gpt)
        self.policy.bind(self)

    @property
    def gpt(self) -> GPT:
        gpt = self._gpt()
        if gpt is None:
            raise RuntimeError("the decoder's model has been garbage-collected")
        return gpt

    # ------------------------------------------------------------------ public
    @property
    def active(self) -> int:
        return len(self.slots)

    @property
    def free(self) -> int:
        return self.num_slots - len(self.slots)

    def admit(self, requests: Sequence[SlotRequest]) -> None:
        """Prefill `requests` into free slots and start them (call between steps)."""
        if not requests:
            return
        if len(requests) > self.free:
            raise ArgenError(f"{len(requests)} requests for {self.free} free slots")
        self._check_weights()
        with torch.inference_mode():
            self._prefill(list(requests))

    def step(self) -> list[tuple[SlotRequest, torch.Tensor]]:
        """Advance every active slot; return (request, (max_new_tokens,) int64 tokens on the device)
        of each slot that finished (at this step or at its prefill), and free those slots."""
        done = self._retire_finished()
        if not self.slots:
            return done
        if self.use_graphs:  # only graphs hold the weights' addresses (an eager step reads them anew)
            self._check_weights()
        for slot in self.slots:
            slot.request.forwards += 1
        with torch.inference_mode():
            self.policy.before_step()
            self._run_step()
            self.policy.advance()
        self.counters["decode_steps"] += 1
        self.counters["slot_steps"] += len(self.slots)
        return done + self._retire_finished()

    def cancel(self, predicate: Callable[[SlotRequest], bool]) -> int:
        """Free the slots whose request matches; returns how many."""
        doomed = [i for i, slot in enumerate(self.slots) if predicate(slot.request)]
        with torch.inference_mode():
            for i in reversed(doomed):
                self._free(i)
        return len(doomed)

    def run(self, requests: Sequence[SlotRequest]) -> list[torch.Tensor]:
        """All requests in arrival order, admitted as slots free up; their tokens, in request order."""
        pending = list(requests)
        results: dict[int, torch.Tensor] = {}
        while pending or self.slots:
            take, pending = pending[:self.free], pending[self.free:]
            self.admit(take)
            for request, tokens in self.step():
                results[id(request)] = tokens
        return [results[id(r)] for r in requests]

    def adapter_index(self, rows: slice) -> torch.Tensor | None:
        """The adapter index of these cache rows (a view of the state: captured steps read it in place),
        or None for a plain model."""
        return self.state.adapter[rows] if self.lora is not None else None

    def bucket(self, kv_len: int) -> int:
        """The captured attention length that covers `kv_len` cache slots."""
        return min(self.cache_len, self.kv_bucket * math.ceil(kv_len / self.kv_bucket))

    # ------------------------------------------------------------------ internals
    def _check_weights(self) -> None:
        signature = changed_weights(self.gpt, self.device, self._signature, "decoder")
        if signature is not None:
            self._signature = signature
            self.graphs.clear()

    def _adapters(self, requests: list[SlotRequest]) -> list[int]:
        """Each request's row index (0 base, k + 1 adapter k); refuses adapters the model does not serve."""
        names = self.lora.names if self.lora is not None else []
        out = []
        for r in requests:
            if r.adapter is not None and not (isinstance(r.adapter, int) and 0 <= r.adapter < len(names)):
                served = f"its adapters are 0..{len(names) - 1} ({', '.join(names)})" if names else "it has none"
                raise ArgenError(f"adapter {r.adapter!r} is not served by this model; {served}")
            out.append(0 if r.adapter is None else r.adapter + 1)
        return out

    def _rows(self, requests: list[SlotRequest], adapters: list[int]):
        """Conditions of the requests -> (2k interleaved cond/uncond rows, (2k, L) bool key mask or None)."""
        gpt, device, k = self.gpt, self.device, len(requests)
        lora = self.lora if self.lora is not None and any(adapters) else None  # adapters: their own embeddings
        if gpt.config.kind == "c2i":
            cond = torch.stack([torch.as_tensor(r.cond).reshape(()) for r in requests]).to(torch.long)
            if lora is None:
                gpt.check_condition(cond)
            else:
                lora.check_classes(gpt, cond, adapters)
            null = gpt.null_condition(k, device) if lora is None else lora.null_condition(gpt, adapters, device)
            cond = cond.to(device)
            return torch.stack([cond, null], dim=1).reshape(2 * k), None
        cond = torch.stack([torch.as_tensor(r.cond, dtype=torch.float32) for r in requests])  # (k, L, D)
        mask = torch.stack([torch.ones(cond.shape[1]) if r.cond_mask is None else torch.as_tensor(r.cond_mask)
                            for r in requests]).float()  # (k, L)
        gpt.check_condition(cond, mask)
        cond, mask = cond.to(device), mask.to(device).bool()
        null = (gpt.null_condition(k, device) if lora is None else lora.null_condition(gpt, adapters, device))
        null = null.to(cond.dtype)
        rows = torch.stack([cond, null], dim=1).reshape(2 * k, *cond.shape[1:])  # (2k, L, D)
        return rows, mask.repeat_interleave(2, dim=0)

    def _totals(self, requests: list[SlotRequest]) -> list[int]:
        totals = []
        for r in requests:
            total = self.num_tokens if r.max_new_tokens is None else int(r.max_new_tokens)
            if not 1 <= total <= self.num_tokens:
                raise ArgenError(f"max_new_tokens must lie in [1, {self.num_tokens}], got {total}")
            if r.generator is not None and r.generator.device.type != self.device.type:
                raise ArgenError(f"the generator is on {r.generator.device} but the model is on {self.device}; "
                                 f"create it with torch.Generator(device={str(self.device)!r})")
            if r.uniforms is not None and tuple(r.uniforms.shape) != (total,):
                raise ArgenError(f"a request's uniforms must have shape ({total},), got {tuple(r.uniforms.shape)}")
            if r.forced is not None:
                forced = torch.as_tensor(r.forced)
                if tuple(forced.shape) != (total,) or forced.dtype not in (torch.int32, torch.int64):
                    raise ArgenError(f"forced tokens must be a ({total},) integer tensor, got "
                                     f"{tuple(forced.shape)} {forced.dtype}")
                if forced.numel() and (int(forced.min()) < -1 or int(forced.max()) >= self.vocab_size):
                    raise ArgenError(f"forced tokens must lie in [0, {self.vocab_size - 1}] (or -1: sampled)")
            totals.append(total)
        return totals

    def _prefill(self, requests: list[SlotRequest]) -> None:
        gpt, st, k = self.gpt, self.state, len(requests)
        first, length = len(self.slots), self.cond_len
        totals = self._totals(requests)
        adapters = self._adapters(requests)
        rows, key_mask = self._rows(requests, adapters)
        params = [r.params for r in requests]
        rp = self._row_params(k, first, params)
        pick = slice(None, None, 1 if rp.guided else 2)  # the twins only when some request is guided
        r0, r1 = 2 * first, 2 * (first + k)
        cache = [c[:, r0:r1:pick.step] for c in st.cache]  # views of these slots' rows
        mask = None if key_mask is None else prefix_attention_mask(key_mask[pick], length)
        if self.lora is None:
            h = gpt.embed_condition(rows[pick])
        else:
            st.adapter[r0:r1] = torch.tensor(adapters, device=self.device).repeat_interleave(2)
            h = self.lora.embed_condition(gpt, rows[pick], [a for a in adapters for _ in range(2)][pick])
        with rows_of(gpt, self.adapter_index(slice(r0, r1, pick.step))):
            logits = gpt.forward_cached(h, self.positions[:length], cache, length, mask,
                                        last_only=True)[:, 0]  # (rows, V)
        st.key_valid[r0:r1] = True
        if key_mask is not None:
            st.key_valid[r0:r1, :length] = key_mask
        st.key_bias[r0:r1] = additive_mask(st.key_valid[r0:r1], st.key_bias.dtype)
        built = build_row_params(params, k, self.num_tokens, self.vocab_size, self.device)
        s = slice(first, first + k)
        for name in ("temperature", "top_k", "top_p", "guided_rows", "scales"):
            getattr(st, name)[s] = getattr(built, name)
        st.forced[s] = -1
        st.pos[s] = length
        st.step[s] = 1
        st.live[s] = 1
        masked = [key_mask is not None and not bool(key_mask[2 * i].all()) for i in range(k)]
        for i, (r, total, m) in enumerate(zip(requests, totals, masked)):
            runs = None
            if r.forced is not None:
                forced = torch.as_tensor(r.forced).long()
                st.forced[first + i, :total] = forced.to(self.device)
                runs = kept_runs(forced.tolist())
            r.forwards = 1
            self.slots.append(_Slot(r, total, 1, length, self._admitted, m, runs))
            self._admitted += 1
        self.policy.start(first, requests, totals, logits, rp)
        self.counters["prefills"] += k

    def _row_params(self, n: int, first: int, params: Sequence[SamplingParams], k_bucket: int = 1,
                    static: bool = False) -> RowParams:
        """Slots [first, first + n) with these parameters (those of the slots a step advances; the
        static facts follow from them). static (a graph): never the shortcut for batches that share
        one setting, which bakes the setting into the step."""
        st = self.state
        s = slice(first, first + n)
        k_max, use_top_p = static_facts(params, self.vocab_size, k_bucket)
        uniform = params[0] if not static and all(p == params[0] for p in params) else None
        return RowParams(st.temperature[s], st.top_k[s], st.top_p[s], st.guided_rows[s], st.scales[s],
                         guided=any(p.guided for p in params), all_guided=all(p.guided for p in params),
                         k_max=k_max, use_top_p=use_top_p, uniform=uniform)

    def _run_step(self) -> None:
        params = [slot.request.params for slot in self.slots]
        kv = self.policy.kv_len()
        n = len(self.slots)
        if not self.use_graphs:
            shared = self.slots[0].pos if all(slot.pos == self.slots[0].pos for slot in self.slots) else None
            self.policy.run(n, kv, self._row_params(n, 0, params), shared)
            return
        kv = self.bucket(kv)
        rp = self._row_params(self.num_slots, 0, params, K_BUCKET, static=True)
        key = (kv, rp.k_max, rp.use_top_p, rp.guided, rp.all_guided) + self.policy.facts()
        if key not in self.graphs:
            self.graphs[key] = (self._capture(kv, rp), rp)  # the graph reads rp's tensors: keep them
        self.graphs[key][0].replay()

    def _capture(self, kv: int, rp: RowParams):
        """A graph of the policy's all-slots step for this kv bucket and these static facts (the state
        it changes is put back afterwards, so capturing mid-run is safe)."""
        changed = self.policy.step_state()
        saved = [t.clone() for t in changed]

        def restore():
            for t, copy in zip(changed, saved):
                t.copy_(copy)

        def run():
            self.policy.run(self.num_slots, kv, rp, None)

        if not self._capture_on_device:
            return _EagerGraph(run)
        graph = capture_graphs(self.device, self._graph_pool, {kv: run}, restore)[kv]
        restore()
        return graph

    def _retire_finished(self) -> list[tuple[SlotRequest, torch.Tensor]]:
        done = []
        with torch.inference_mode():
            for i in reversed(range(len(self.slots))):
                slot = self.slots[i]
                if slot.steps >= slot.total:
                    done.append((slot.request, self.policy.tokens(i, slot).clone()))
                    self._free(i)
        done.reverse()
        return done

    def _free(self, i: int) -> None:
        """Free slot i: move the last active slot into it (state and filled cache rows)."""
        st, last = self.state, len(self.slots) - 1
        if i != last:
            moved = self.slots[last]
            for t in st.per_slot():
                t[i] = t[last]
            for t in st.per_row():
                t[2 * i:2 * i + 2] = t[2 * last:2 * last + 2]
            filled = moved.pos
            for c in st.cache:
                c[:, 2 * i:2 * i + 2, :, :filled] = c[:, 2 * last:2 * last + 2, :, :filled]
            self.slots[i] = moved
        self.slots.pop()
        st.adapter[2 * last:2 * last + 2] = 0
        st.live[last] = 0
        st.pos[last] = 0
        st.step[last] = 0
        st.key_valid[2 * last:2 * last + 2] = True
        st.key_bias[2 * last:2 * last + 2] = 0


class _EagerGraph:
    """Stands in for a captured graph on a CPU: `replay()` runs the fixed-shape step eagerly."""

    def __init__(self, run: Callable[[], None]):
        self.replay = run
