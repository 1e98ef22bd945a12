"""`JacobiSlotDecoder`: continuous batching with speculative Jacobi decoding in every slot.

Contract: the interface and slot layout of `argen.engine.slots.SlotDecoder` (admit between steps,
`step()`, `cancel`, `run`; rows 2i / 2i + 1 are slot i's conditional and unconditional twins), but
a step is one Jacobi iteration (`argen.engine.jacobi`) of every active slot: each slot feeds its
`window` positions, verifies its drafts and advances by 1 to `window` tokens, so slots finish at
their own pace and free slots are refilled at the next step boundary.

- A slot's tokens are distributed exactly as autoregressive sampling with its own `SamplingParams`
  (guidance scale, interval and schedule, temperature, top-k, top-p may differ per slot); with
  top_k=1 they are the reference sampler's greedy tokens.
- A slot draws its numbers from its request's generator in the order `jacobi_decode` draws them for
  a row with `row_generators` (W + (W-1) V per iteration, prefill included), and its rows see only
  their own cache rows, so its tokens do not depend on the other slots or on when it was admitted.
- On CUDA (`cuda_graphs`) the all-slots iteration is captured once per (kv bucket, top-k width,
  top-p use) and replayed, as `SlotDecoder` does: per-slot settings and numbers sit in static
  tensors, the host draws each active slot's numbers into them before a replay, and slots that are
  not active run a parked window whose outputs are ignored. Eager on a CPU. One host read per step
  (the accepted counts).

`counters` adds "drafted" and "accepted" (drafts verified and kept) to the SlotDecoder's.
"""

from __future__ import annotations

import dataclasses

import torch

from argen.engine.engine import KV_BUCKET
from argen.engine.jacobi import DEFAULT_WINDOW, _gumbel, _random, check_decode, iterate, open_window
from argen.engine.sampler import RowParams, combine_guidance_pairs, filtered_weights
from argen.engine.slots import SlotDecoder, SlotRequest, _Slot
from argen.models.gpt import GPT


class JacobiSlotDecoder(SlotDecoder):
    """`SlotDecoder` whose step is a Jacobi iteration of `window` positions per slot.

    cuda_graphs: None = on for CUDA devices (the all-slots iteration captured per kv bucket and
    static sampling facts, as `SlotDecoder` captures its step); True on a CPU runs that fixed-shape
    step eagerly (or captured, under a graph simulator) to test the graph path.
    """

    def __init__(self, gpt: GPT, num_slots: int, window: int = DEFAULT_WINDOW, cuda_graphs: bool | None = None,
                 kv_bucket: int = KV_BUCKET, dtype: torch.dtype | None = None):
        super().__init__(gpt, num_slots, cuda_graphs=cuda_graphs, kv_bucket=kv_bucket, dtype=dtype)
        self.window = max(1, min(check_decode("jacobi", window), self.num_tokens - 1))
        width, vocab, device = self.window, self.vocab_size, self.device
        # accepted tokens, then the drafts
        self.canvas = torch.zeros(num_slots, self.num_tokens + width, dtype=torch.long, device=device)
        self.q = torch.zeros(num_slots, width - 1, vocab, device=device)  # the drafts' proposals
        self.noise = torch.zeros(num_slots, width - 1, vocab, device=device)  # their Gumbel noise
        self.accepted = torch.ones(num_slots, dtype=torch.long, device=device)  # n: accepted tokens
        self.u = torch.full((num_slots, width + (width - 1) * vocab), 0.5, device=device)  # a step's numbers
        self.checked = torch.zeros(num_slots, dtype=torch.long, device=device)  # a step's drafts verified
        self.kept = torch.zeros(num_slots, dtype=torch.long, device=device)  # and accepted
        self.state.extra = (self.canvas, self.q, self.noise, self.accepted)
        self.counters.update(drafted=0, accepted=0)

    # ------------------------------------------------------------------ the SlotDecoder hooks
    def _start(self, requests: list[SlotRequest], totals: list[int], first: int, logits: torch.Tensor) -> None:
        """Token 0 and the first drafts of the new slots, from their prefill logits (2k, V)."""
        k, width, vocab = len(requests), self.window, self.vocab_size
        s = slice(first, first + k)
        rp = self._row_params(k, first, [r.params for r in requests])
        p = self._probs(logits[:, None], rp, self.state.scales[s, :1])  # (k, 1, V)
        uniforms, noise = _random(k, width, vocab, self.device, None, [r.generator for r in requests],
                                  torch.arange(k))
        token, q, drafts = open_window(p[:, 0], width, uniforms, noise)
        self.canvas[s] = 0
        self.canvas[s, 0] = token
        self.canvas[s, 1:width] = drafts
        self.q[s], self.noise[s] = q, noise
        self.accepted[s] = 1

    def _kv_len(self) -> int:
        return self.cond_len + max(min(slot.steps, self.num_tokens - self.window) for slot in self.slots) + \
            self.window - 1

    def _before_step(self) -> None:
        """Draw each active slot's numbers for this iteration from its request's generator."""
        size = self.u.shape[1]
        for i, slot in enumerate(self.slots):
            self.u[i] = torch.rand(size, generator=slot.request.generator, device=self.device)

    def _step_state(self) -> tuple[torch.Tensor, ...]:
        return self.canvas, self.q, self.noise, self.accepted, self.checked, self.kept

    def _decode_step(self, n: int, kv: int, rp: RowParams) -> None:
        """One Jacobi iteration of slots [0, n): live ones advance, the others re-run a parked window
        at token 1 with their outputs ignored. Graph-safe: no host reads, no draws."""
        st, width = self.state, self.window
        live = st.live[:n].bool()
        accepted = self.accepted[:n]
        cur = torch.where(live, accepted, torch.ones_like(accepted))
        scales = st.scales[:n]
        new, checked, kept = iterate(
            self.gpt, self.canvas[:n], cur, self.q[:n], self.noise[:n], self.u[:n, :width],
            _gumbel(self.u[:n, width:]).view(n, width - 1, self.vocab_size), [c[:, :2 * n] for c in st.cache],
            st.key_valid[:2 * n], kv,
            lambda x: x.repeat_interleave(2, dim=0),  # rows 2i, 2i + 1: slot i's twins
            lambda logits, index: self._probs(logits, rp, scales.gather(1, index)))
        accepted.copy_(torch.where(live, new, accepted))
        self.checked[:n].copy_(torch.where(live, checked, 0))
        self.kept[:n].copy_(torch.where(live, kept, 0))

    def _advance(self) -> None:
        count = len(self.slots)
        for slot, n in zip(self.slots, self.accepted[:count].tolist()):  # the step's one host read
            slot.steps = n
            slot.pos = self.cond_len + n - 1  # cache positions of the accepted tokens before the last
        self.counters["drafted"] += int(self.checked[:count].sum())
        self.counters["accepted"] += int(self.kept[:count].sum())

    def _tokens(self, i: int, slot: _Slot) -> torch.Tensor:
        return self.canvas[i, :slot.total]

    # ------------------------------------------------------------------ internals
    def _probs(self, logits: torch.Tensor, rp: RowParams, scale: torch.Tensor) -> torch.Tensor:
        """Interleaved twin logits (2A, T, V) and guidance scales (A, T) -> (A, T, V) final sampling
        probabilities: guidance, temperature, top-k, top-p, each slot with its own settings."""
        count, length, vocab = scale.shape[0], scale.shape[1], logits.shape[-1]
        pairs = logits.float().view(count, 2, length, vocab).transpose(1, 2).reshape(2 * count * length, vocab)

        def per_token(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(length, dim=0)

        rows = dataclasses.replace(rp, temperature=per_token(rp.temperature), top_k=per_token(rp.top_k),
                                   top_p=per_token(rp.top_p), guided_rows=per_token(rp.guided_rows))
        weights = filtered_weights(combine_guidance_pairs(pairs, rows, scale.reshape(-1, 1)), rows)
        return (weights / weights.sum(dim=-1, keepdim=True)).view(count, length, vocab)
