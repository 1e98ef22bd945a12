"""`generate`: the public sampling entry point (currently delegates to the reference sampler)."""

from __future__ import annotations

import torch

from argen.models.gpt import GPT
from argen.sampling.reference import reference_generate


def generate(gpt: GPT, cond: torch.Tensor, cond_mask: torch.Tensor | None = None, cfg_scale: float = 1.0,
             cfg_interval: int = -1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
    return reference_generate(gpt, cond, cond_mask, cfg_scale, cfg_interval, temperature, top_k, top_p,
                              generator, **kwargs)
