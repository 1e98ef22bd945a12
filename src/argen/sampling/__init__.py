"""Sampling: pure functions on logits and the plain reference KV-cache sampler."""

from argen.sampling.logits import (
    SamplingParams,
    guidance_scale_at,
    guided_logits,
    process_logits,
    top_k_filter,
    top_p_filter,
)
from argen.sampling.reference import prepare_condition, reference_generate
from argen.sampling.seeds import image_seed

__all__ = ["SamplingParams", "guidance_scale_at", "guided_logits", "image_seed", "prepare_condition", "process_logits",
           "reference_generate", "top_k_filter", "top_p_filter"]
