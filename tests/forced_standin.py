"""A plain loop that forces kept tokens, for the editing tests.

`plain_forced_generate` is obviously right and slow: at every position it runs the whole teacher-forced
forward pass (`GPT.logits`) on the tokens so far, takes the given token where `forced >= 0`, and otherwise
draws the token from guided, filtered probabilities with the uniform plain sampling uses at that
position (`torch.rand(N)` from the image's own generator, an inverse-CDF lookup in token-id order).

Until the engine has `forced_tokens` (issue 27, section 1), `use_standin` puts this loop in place of
`argen.generate` for the editing modules, in these tests only; a call with nothing forced goes to
the real `argen.generate`, so that "a mask of everything is `argen sample`'s image" is tested for real.
Once the engine has it, the stand-in is not used and "greedy editing equals the plain loop" compares the
engine against this loop.
"""

from __future__ import annotations

import importlib
import inspect

import torch

import argen.engine
from argen.sampling.logits import SamplingParams, guidance_scale_at, guided_logits, process_logits


def engine_has_forced_tokens() -> bool:
    return "forced_tokens" in inspect.signature(argen.engine.generate).parameters


@torch.no_grad()
def plain_forced_generate(gpt, cond, cond_mask=None, *, params: SamplingParams | None = None, generator=None,
                          row_generators=None, forced_tokens=None, **_) -> torch.Tensor:
    params = params or SamplingParams()
    n = gpt.config.num_image_tokens
    batch = cond.shape[0]
    device = gpt.tok_embeddings.weight.device
    if forced_tokens is None:
        forced_tokens = torch.full((batch, n), -1, dtype=torch.long)
    if row_generators is not None:
        uniforms = torch.stack([torch.rand(n, generator=g, device=device) for g in row_generators])
    else:
        uniforms = torch.rand(batch, n, generator=generator, device=device)
    drop = torch.ones(batch, dtype=torch.bool, device=device)  # the null condition in every row
    out = torch.zeros(batch, n, dtype=torch.long, device=device)
    for t in range(n):
        given = forced_tokens[:, t].to(device)
        tokens = out[:, :t + 1]  # the last column is a placeholder: position t's logits do not see it
        logits = gpt.logits(tokens, cond, cond_mask)[:, t]
        if params.guided:
            uncond = gpt(tokens, cond, cond_mask, drop_cond=drop)[0][:, t]
            logits = guided_logits(logits, uncond, guidance_scale_at(params, t, n))
        probs = process_logits(logits, params.temperature, params.top_k, params.top_p).softmax(-1).double()
        cdf = probs.cumsum(-1)
        drawn = torch.searchsorted(cdf, uniforms[:, t:t + 1].double() * cdf[:, -1:], right=True)[:, 0]
        out[:, t] = torch.where(given >= 0, given, drawn.clamp(max=probs.shape[-1] - 1))
    return out


def standin_generate(gpt, cond, cond_mask=None, *, forced_tokens=None, **kwargs):
    if forced_tokens is None or bool((forced_tokens < 0).all()):
        return argen.engine.generate(gpt, cond, cond_mask, **kwargs)
    return plain_forced_generate(gpt, cond, cond_mask, forced_tokens=forced_tokens, **kwargs)


def use_standin(monkeypatch) -> None:
    """Route the editing modules' `generate` to the stand-in when the engine lacks forced tokens."""
    if engine_has_forced_tokens():
        return
    for name in ("argen.editing.edit", "argen.editing.outpaint"):  # modules (argen.editing.edit is also a function)
        monkeypatch.setattr(importlib.import_module(name), "generate", standin_generate)
