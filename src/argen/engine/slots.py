"""`SlotDecoder`: continuous batching over a fixed number of slots of one static KV cache.

Contract:
- The cache has `num_slots` slots of two rows each: row 2i holds image i's conditional sequence,
  row 2i + 1 its unconditional twin (null class / learned null caption). Both are allocated,
  prefilled and retired together; an unguided request still runs its twin (its logits are unused).
- Each slot carries its own position, condition (class id, or caption features with their mask),
  `SamplingParams` (guidance scale, interval and schedule, temperature, top-k, top-p), its
  pre-drawn uniforms (from the request's own generator: `torch.rand(max_new_tokens)`, the numbers
  `Engine.generate` draws for that image with `row_generators`) and its output row.
- `admit(requests)` prefills new requests into free slots (between steps only) and samples their
  first token; `step()` advances every active slot by one token, then retires the finished slots
  and returns their tokens; `cancel(predicate)` frees slots at once. Freed slots are reused by the
  next `admit`.
- A slot's tokens do not depend on the other slots: its rows attend only to their own cache rows,
  masked by their own position (`key <= position`) and caption mask, and its token is drawn from
  its own logits, parameters and uniform. Greedy decoding gives the reference sampler's tokens.
- CPU (eager): active slots are kept in slots [0, n) (a retired slot is filled by moving the last
  one into it, cache rows included) and a step runs rows [0, 2n) only, attending over
  max(position) + 1 cache slots. CUDA (`cuda_graphs`): the step runs all slots with per-slot
  positions and parameters held in tensors, captured once per (64-slot kv bucket, top-k width,
  top-p use) and replayed; inactive slots are masked out of nothing but compute.
Not thread-safe: one thread drives a decoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from argen.engine.engine import KV_BUCKET, additive_mask, capture_graphs, changed_weights, check_compute_dtype
from argen.engine.sampler import RowParams, build_row_params, combine_guidance_pairs, sample_filtered, static_facts
from argen.models.gpt import GPT, prefix_attention_mask
from argen.sampling.logits import SamplingParams
from argen.utils.errors import ArgenError

K_BUCKET = 64


@dataclass
class SlotRequest:
    """One image: its condition, settings and generator; `tag` is the caller's handle."""

    cond: torch.Tensor  # () int64 class id (c2i) or (L, D) float caption features (t2i), left padded
    cond_mask: torch.Tensor | None = None  # (L,) 1 on real caption tokens; None = all real
    params: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator | None = None
    max_new_tokens: int | None = None  # default: the whole grid
    tag: object = None


@dataclass
class _Slot:
    request: SlotRequest
    total: int  # tokens to sample
    steps: int  # tokens sampled so far
    pos: int  # sequence position of the next input token (cache slots < pos are filled)


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
        self.uniforms = torch.full((n, tokens), 0.5, device=device)
        self.scales = torch.ones(n, tokens, device=device)
        self.temperature = torch.ones(n, 1, device=device)
        self.top_k = torch.zeros(n, 1, dtype=torch.long, device=device)
        self.top_p = torch.ones(n, 1, device=device)
        self.guided_rows = torch.zeros(n, 1, dtype=torch.bool, device=device)
        self.key_valid = torch.ones(rows, cache_len, dtype=torch.bool, device=device)
        self.out = torch.zeros(n, tokens, dtype=torch.long, device=device)
        self.extra: tuple[torch.Tensor, ...] = ()  # a subclass's own per-slot tensors (moved with the slot)

    def per_slot(self):
        return (self.pos, self.step, self.live, self.uniforms, self.scales, self.temperature, self.top_k,
                self.top_p, self.guided_rows, self.out) + self.extra

    def per_row(self):
        return self.tokens, self.key_valid


class SlotDecoder:
    """Continuous-batching decoder for one `GPT` with `num_slots` image slots.

    cuda_graphs: None = on for CUDA devices; True on a CPU runs the same fixed-shape step eagerly
    (or captured, under a graph simulator) to test the graph path.
    """

    def __init__(self, gpt: GPT, num_slots: int, cuda_graphs: bool | None = None, kv_bucket: int = KV_BUCKET,
                 dtype: torch.dtype | None = None):
        if num_slots < 1:
            raise ArgenError(f"the number of slots must be >= 1, got {num_slots}")
        check_compute_dtype(gpt, dtype)
        self.gpt = gpt
        cfg = gpt.config
        self.device = gpt.tok_embeddings.weight.device
        self.num_slots = num_slots
        self.num_tokens = cfg.num_image_tokens
        self.cond_len = cfg.cond_len
        self.vocab_size = cfg.vocab_size
        self.use_graphs = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        self._capture_on_device = self.use_graphs and self.device.type == "cuda"
        self.kv_bucket = kv_bucket
        full = cfg.cond_len + cfg.num_image_tokens
        self.cache_len = kv_bucket * math.ceil(full / kv_bucket) if self.use_graphs else full
        self.positions = torch.arange(self.cache_len, device=self.device)
        self.state = _State(gpt, num_slots, self.cache_len, self.device)
        self.slots: list[_Slot] = []  # active slots, in slot order (slot i holds cache rows 2i, 2i + 1)
        self.graphs: dict[tuple, object] = {}
        self._graph_pool: dict = {}
        self._signature = None
        self.counters = {"prefills": 0, "decode_steps": 0, "slot_steps": 0}

    # ------------------------------------------------------------------ public
    @property
    def active(self) -> int:
        return len(self.slots)

    @property
    def free(self) -> int:
        return self.num_slots - len(self.slots)

    def admit(self, requests: Sequence[SlotRequest]) -> None:
        """Prefill `requests` into free slots and sample their first token (call between steps)."""
        if not requests:
            return
        if len(requests) > self.free:
            raise ArgenError(f"{len(requests)} requests for {self.free} free slots")
        self._check_weights()
        with torch.inference_mode():
            self._prefill(list(requests))

    def step(self) -> list[tuple[SlotRequest, torch.Tensor]]:
        """Advance every active slot by one token; return (request, (max_new_tokens,) int64 tokens on
        the device) of each slot that finished (at this step or at its prefill), and free those slots."""
        done = self._retire_finished()
        if not self.slots:
            return done
        self._check_weights()
        with torch.inference_mode():
            self._decode()
        self._advance()
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

    # ------------------------------------------------------------------ internals
    def _advance(self) -> None:
        """Host-side bookkeeping after a step: every slot sampled one token."""
        for slot in self.slots:
            slot.steps += 1
            slot.pos += 1

    def _tokens(self, i: int, slot: _Slot) -> torch.Tensor:
        """The finished slot i's (total,) tokens."""
        return self.state.out[i, :slot.total]

    def _check_weights(self) -> None:
        signature = changed_weights(self.gpt, self.device, self._signature, "decoder")
        if signature is not None:
            self._signature = signature
            self.graphs.clear()

    def _rows(self, requests: list[SlotRequest]):
        """Conditions of the requests -> (2k interleaved cond/uncond rows, (2k, L) bool key mask or None)."""
        gpt, device, k = self.gpt, self.device, len(requests)
        if gpt.config.kind == "c2i":
            cond = torch.stack([torch.as_tensor(r.cond).reshape(()) for r in requests]).to(torch.long)
            gpt.check_condition(cond)
            cond = cond.to(device)
            return torch.stack([cond, gpt.null_condition(k, device)], dim=1).reshape(2 * k), None
        cond = torch.stack([torch.as_tensor(r.cond, dtype=torch.float32) for r in requests])  # (k, L, D)
        mask = torch.stack([torch.ones(cond.shape[1]) if r.cond_mask is None else torch.as_tensor(r.cond_mask)
                            for r in requests]).float()  # (k, L)
        gpt.check_condition(cond, mask)
        cond, mask = cond.to(device), mask.to(device).bool()
        null = gpt.null_condition(k, device).to(cond.dtype)
        rows = torch.stack([cond, null], dim=1).reshape(2 * k, *cond.shape[1:])  # (2k, L, D)
        return rows, mask.repeat_interleave(2, dim=0)

    def _prefill(self, requests: list[SlotRequest]) -> None:
        gpt, st, k = self.gpt, self.state, len(requests)
        first, length = len(self.slots), self.cond_len
        totals = []
        for r in requests:
            total = self.num_tokens if r.max_new_tokens is None else int(r.max_new_tokens)
            if not 1 <= total <= self.num_tokens:
                raise ArgenError(f"max_new_tokens must lie in [1, {self.num_tokens}], got {total}")
            if r.generator is not None and r.generator.device.type != self.device.type:
                raise ArgenError(f"the generator is on {r.generator.device} but the model is on {self.device}")
            totals.append(total)
        rows, key_mask = self._rows(requests)
        s, r0, r1 = slice(first, first + k), 2 * first, 2 * (first + k)
        cache = [c[:, r0:r1] for c in st.cache]  # (2, 2k, H_kv, S, D) views of these slots' rows
        mask = None if key_mask is None else prefix_attention_mask(key_mask, length)
        logits = gpt.forward_cached(gpt.embed_condition(rows), self.positions[:length], cache, length, mask,
                                    last_only=True)[:, 0]  # (2k, V)
        st.key_valid[r0:r1] = True
        if key_mask is not None:
            st.key_valid[r0:r1, :length] = key_mask
        params = [r.params for r in requests]
        rp = build_row_params(params, k, self.num_tokens, self.vocab_size, self.device)
        for name in ("temperature", "top_k", "top_p", "guided_rows", "scales"):
            getattr(st, name)[s] = getattr(rp, name)
        self._start(requests, totals, first, logits)
        st.pos[s] = length
        st.step[s] = 1
        st.live[s] = 1
        self.slots.extend(_Slot(r, total, 1, length) for r, total in zip(requests, totals))
        self.counters["prefills"] += k

    def _start(self, requests: list[SlotRequest], totals: list[int], first: int, logits: torch.Tensor) -> None:
        """Sample the first token of the new slots [first, first + k) from their prefill logits (2k, V)."""
        st, k = self.state, len(requests)
        s = slice(first, first + k)
        for i, (r, total) in enumerate(zip(requests, totals)):
            st.uniforms[first + i, :total] = torch.rand(total, generator=r.generator, device=self.device)
        rp = self._row_params(k, first, [r.params for r in requests])
        token = sample_filtered(combine_guidance_pairs(logits, rp, st.scales[s, :1]), rp, st.uniforms[s, 0])
        st.out[s, 0] = token
        st.tokens[2 * first:2 * (first + k)] = token.repeat_interleave(2)

    def _row_params(self, n: int, first: int, params: Sequence[SamplingParams], k_bucket: int = 1,
                    static: bool = False) -> RowParams:
        """Slots [first, first + n) with these parameters; static (a graph): the per-row tensors
        only, never the shortcuts for batches that share one setting."""
        st = self.state
        s = slice(first, first + n)
        k_max, use_top_p = static_facts(params, self.vocab_size, k_bucket)
        uniform = params[0] if not static and all(p == params[0] for p in params) else None
        all_guided = not static and all(p.guided for p in params)
        return RowParams(st.temperature[s], st.top_k[s], st.top_p[s], st.guided_rows[s], st.scales[s], guided=True,
                         all_guided=all_guided, k_max=k_max, use_top_p=use_top_p, uniform=uniform)

    def _kv_len(self) -> int:
        """Cache slots the next step attends over (before bucketing)."""
        return max(slot.pos for slot in self.slots) + 1

    def _before_step(self) -> None:
        """Host work before a step (eager or replayed): none here; the uniforms are pre-drawn."""

    def _step_state(self) -> tuple[torch.Tensor, ...]:
        """The tensors a step changes (besides the cache), put back after a capture."""
        st = self.state
        return st.tokens, st.pos, st.step, st.out

    def _decode(self) -> None:
        params = [slot.request.params for slot in self.slots]
        kv = self._kv_len()
        self._before_step()
        if not self.use_graphs:
            self._decode_step(len(self.slots), kv, self._row_params(len(self.slots), 0, params))
            return
        kv = min(self.cache_len, self.kv_bucket * math.ceil(kv / self.kv_bucket))
        rp = self._row_params(self.num_slots, 0, params, K_BUCKET, static=True)
        key = (kv, rp.k_max, rp.use_top_p)
        if key not in self.graphs:
            self.graphs[key] = (self._capture(kv, rp), rp)  # the graph reads rp's tensors: keep them
        self.graphs[key][0].replay()

    def _decode_step(self, n: int, kv: int, rp: RowParams) -> None:
        """One step of slots [0, n): reads tokens/pos/step, writes out[:, step], advances live slots.
        Graph-safe: no host reads, shapes fixed by (n, kv, rp's static facts)."""
        gpt, st = self.gpt, self.state
        rows = 2 * n
        pos = st.pos[:n, None].expand(n, 2).reshape(rows)  # (2n,) both rows of a slot at its position
        visible = (self.positions[:kv] <= pos[:, None]) & st.key_valid[:rows, :kv]  # (2n, kv)
        mask = additive_mask(visible, st.cache[0].dtype)[:, None, None, :]  # (2n, 1, 1, kv)
        cache = [c[:, :rows] for c in st.cache]
        h = gpt.embed_tokens(st.tokens[:rows, None])  # (2n, 1, C)
        logits = gpt.forward_cached(h, pos[:, None], cache, kv, mask)[:, 0]  # (2n, V)
        index = st.step[:n].clamp(max=self.num_tokens - 1)[:, None]  # (n, 1)
        scale = st.scales[:n].gather(1, index)
        token = sample_filtered(combine_guidance_pairs(logits, rp, scale), rp, st.uniforms[:n].gather(1, index)[:, 0])
        st.out[:n].scatter_(1, index, token[:, None])
        st.tokens[:rows].copy_(token[:, None].expand(n, 2).reshape(rows))
        live = st.live[:n]
        st.pos[:n].add_(live)
        st.step[:n].add_(live)

    def _capture(self, kv: int, rp: RowParams):
        """A graph of the all-slots step for this kv bucket and these static facts (the state it
        changes is put back afterwards, so capturing mid-run is safe)."""
        changed = self._step_state()
        saved = [t.clone() for t in changed]

        def restore():
            for t, copy in zip(changed, saved):
                t.copy_(copy)

        def run():
            self._decode_step(self.num_slots, kv, rp)

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
                    done.append((slot.request, self._tokens(i, slot).clone()))
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
        st.live[last] = 0
        st.pos[last] = 0
        st.step[last] = 0
        st.key_valid[2 * last:2 * last + 2] = True


class _EagerGraph:
    """Stands in for a captured graph on a CPU: `replay()` runs the fixed-shape step eagerly."""

    def __init__(self, run: Callable[[], None]):
        self.replay = run
