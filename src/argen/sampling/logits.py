"""Pure functions on logits: guidance, temperature, top-k, top-p. No state, no randomness.

Semantics follow LlamaGen: temperature divides the logits first, then top-k keeps every logit >=
the k-th largest (ties kept), then top-p keeps the smallest prefix of the sorted distribution whose
mass reaches p (the token that crosses p is kept, and the top token always is). top_k=0 and
top_p=1.0 disable the filters. Guidance: uncond + s * (cond - uncond).

`SamplingParams` is the one carrier of sampling settings (CLI, server, sample batches, `argen.generate`).
Its field defaults are neutral (no guidance, no filter); `SamplingParams.for_kind(kind, **given)` fills
the settings left as None from `KIND_DEFAULTS`, the one table of per-kind defaults (c2i: cfg 4.0,
top-k 2000; t2i: cfg 7.5, top-k 1000, as LlamaGen's sampling scripts), and
`SamplingParams.for_model(gpt, **given)` puts the generator's own recommended settings (stored in its
checkpoint, `gpt.sampling_defaults`) between the two. Validation: |cfg_scale| up to
`MAX_CFG_SCALE` (1e4): larger scales overflow the guided logits (uncond + s * (cond - uncond)) to
inf/nan in float32/bf16 and sample garbage, so they are refused.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from argen.utils.errors import ArgenError

GUIDANCE_SCHEDULES = ("constant", "linear", "power")
MAX_CFG_SCALE = 1e4
KIND_DEFAULTS = {"c2i": {"cfg_scale": 4.0, "top_k": 2000}, "t2i": {"cfg_scale": 7.5, "top_k": 1000}}


@dataclass(frozen=True)
class SamplingParams:
    cfg_scale: float = 1.0
    cfg_interval: int = -1
    cfg_schedule: str = "constant"
    cfg_power: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not math.isfinite(self.cfg_scale) or not 0 <= self.cfg_scale <= MAX_CFG_SCALE:
            raise ArgenError(f"cfg_scale must lie in [0, {MAX_CFG_SCALE:g}], got {self.cfg_scale}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ArgenError(f"temperature must be > 0, got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ArgenError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise ArgenError(f"top_p must lie in (0, 1], got {self.top_p}")
        if int(self.cfg_interval) != self.cfg_interval or self.cfg_interval < -1:
            raise ArgenError(f"cfg_interval must be -1 (always guide) or a token index >= 0, got "
                             f"{self.cfg_interval}")
        if self.cfg_schedule not in GUIDANCE_SCHEDULES:
            raise ArgenError(f"cfg_schedule must be one of {GUIDANCE_SCHEDULES}, got {self.cfg_schedule!r}")
        if not math.isfinite(self.cfg_power) or self.cfg_power <= 0:
            raise ArgenError(f"cfg_power must be > 0, got {self.cfg_power}")

    @classmethod
    def for_kind(cls, kind: str | None, **given) -> SamplingParams:
        """Params for a `kind` ("c2i"/"t2i") generator: `given` settings, None ones from `KIND_DEFAULTS`
        (kind None: from the neutral field defaults)."""
        if kind is not None and kind not in KIND_DEFAULTS:
            raise ArgenError(f"kind must be one of {sorted(KIND_DEFAULTS)}, got {kind!r}")
        values = {name: value for name, value in given.items() if value is not None}
        return cls(**{**KIND_DEFAULTS.get(kind, {}), **values})

    @classmethod
    def for_model(cls, gpt, **given) -> SamplingParams:
        """Params for this generator: `given` settings, None ones from the generator's own recommended
        settings (`gpt.sampling_defaults`, from its checkpoint) where it has them, else `KIND_DEFAULTS`."""
        own = {k: v for k, v in (getattr(gpt, "sampling_defaults", None) or {}).items() if k in SAMPLING_FIELDS}
        values = {name: value for name, value in given.items() if value is not None}
        return cls.for_kind(gpt.config.kind, **{**own, **values})

    @property
    def guided(self) -> bool:
        """Whether the unconditional branch is needed at all."""
        return self.cfg_scale != 1.0 or self.cfg_schedule != "constant"

    def to_dict(self) -> dict:
        return asdict(self)


SAMPLING_FIELDS = tuple(SamplingParams.__dataclass_fields__)


def guidance_scale_at(params: SamplingParams, token_index: int, num_tokens: int) -> float:
    """Guidance scale for image token `token_index` (0-based) of `num_tokens`.

    `cfg_interval` = i (LlamaGen's meaning) guides tokens 0..i+1 and uses the conditional logits
    alone afterwards. Schedules ramp from 1 at token 0 to cfg_scale at the last token:
    linear 1 + (s-1) * t, power 1 + (s-1) * t**cfg_power, with t = token_index / (num_tokens - 1).
    """
    if params.cfg_interval > -1 and token_index > params.cfg_interval + 1:
        return 1.0
    if params.cfg_schedule == "constant":
        return params.cfg_scale
    t = token_index / max(num_tokens - 1, 1)
    if params.cfg_schedule == "power":
        t = t ** params.cfg_power
    return 1.0 + (params.cfg_scale - 1.0) * t


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set logits below the k-th largest (per row) to -inf. k=0 disables."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: drop tokens whose preceding cumulative probability already exceeds p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative > p  # shifted right: the top token always stays
    remove_sorted = torch.cat([torch.zeros_like(remove_sorted[..., :1]), remove_sorted[..., :-1]], dim=-1)
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Temperature, then top-k, then top-p; returns filtered float32 logits (B, V)."""
    logits = logits.float() / max(temperature, 1e-5)
    logits = top_k_filter(logits, top_k)
    return top_p_filter(logits, top_p)
