"""`generate`: the public sampling entry point, a static batch over the one decode loop.

Same signature and results as `argen.sampling.reference_generate` (bit-identical greedy tokens in
float32 on the CPU), through `argen.engine.batches.Batches`, kept per model by weak reference
(`engine_for`, with its decoders' caches and CUDA graphs) and rebuilt when the model's device or
dtype changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from argen.engine.batches import engine_for
from argen.engine.draft_tree import DraftTree
from argen.engine.jacobi import check_decode, check_tree, jacobi_generate
from argen.models.gpt import GPT
from argen.sampling.logits import SamplingParams
from argen.utils.errors import ArgenError


def generate(gpt: GPT, cond: torch.Tensor, cond_mask: torch.Tensor | None = None, cfg_scale: float | None = None,
             cfg_interval: int | None = None, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None, *,
             params: SamplingParams | None = None, max_new_tokens: int | None = None,
             cfg_schedule: str | None = None, cfg_power: float | None = None,
             row_generators: Sequence[torch.Generator] | None = None,
             progress: Callable[[int], None] | None = None, decode: str = "ar",
             window: int | None = None, forced_tokens: torch.Tensor | None = None,
             tree: DraftTree | str | None = None) -> torch.Tensor:
    """Sample (B, max_new_tokens) int64 image tokens (default: the full grid) on the model's device.

    row_generators: one generator per image instead of `generator`, so that an image depends only on
    its own condition and seed, not on the batch it shares. progress: called with 1 after each token
    step of each chunk of up to `Batches.max_batch` images (e.g. `tqdm.update`). params: a
    `SamplingParams`, instead of the keyword settings (unset keywords take SamplingParams' defaults).
    decode: "ar" (one token per forward, the engine) or "jacobi" (speculative Jacobi decoding with
    `window` positions per forward, default `argen.engine.jacobi.DEFAULT_WINDOW`; the same
    distribution, fewer forward passes; see `argen.engine.jacobi`), with a draft tree if `tree` is given
    (`argen.engine.draft_tree.DraftTree` or its spelling "KxD" / "KxDxG", e.g. "4x2"; "jacobi" only).
    forced_tokens: (B, max_new_tokens) int64, the token to keep at each position or -1 where it is
    sampled (editing: a kept token is given, a run of kept tokens costs one forward pass, a sampled
    token draws the number it would draw without forced tokens; see `argen.engine.slots`).
    """
    window = check_decode(decode, window)
    tree = check_tree(decode, tree)
    settings = dict(cfg_scale=cfg_scale, cfg_interval=cfg_interval, cfg_schedule=cfg_schedule, cfg_power=cfg_power,
                    temperature=temperature, top_k=top_k, top_p=top_p)
    given = {name: value for name, value in settings.items() if value is not None}
    if params is None:
        params = SamplingParams(**given)
    elif given:
        raise ArgenError(f"pass the sampling settings as params= or as keywords, not both (got {sorted(given)})")
    if decode == "jacobi":
        return jacobi_generate(gpt, cond, cond_mask, params, window, generator=generator,
                               row_generators=row_generators, max_new_tokens=max_new_tokens, progress=progress,
                               forced_tokens=forced_tokens, tree=tree)
    return engine_for(gpt).generate(cond, cond_mask, params, generator=generator, row_generators=row_generators,
                                    max_new_tokens=max_new_tokens, progress=progress, forced=forced_tokens)
