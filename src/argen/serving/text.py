"""Prompt encoding for t2i serving: wraps `argen.data.text_encoders` into the service's callable.

The text-encoder module is imported only when a t2i model is served, so c2i serving never needs
transformers. Problems (module missing, unknown encoder, feature width that the generator does
not take) are `ArgenError`s that say what to fix.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from argen.models.gpt import GPT
from argen.utils.errors import ArgenError


def prompt_encoder(gpt: GPT, name_or_path: str, device) -> Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]:
    """A callable prompts -> (features (B, caption_len, D) float32 left-padded, mask (B, caption_len))."""
    cfg = gpt.config
    try:
        from argen.data.text_encoders import load_text_encoder
    except ImportError as exc:
        raise ArgenError(f"t2i serving needs argen.data.text_encoders, which cannot be imported ({exc})") from exc
    encoder = load_text_encoder(name_or_path, device=device, max_length=cfg.caption_len)
    if encoder.dim != cfg.caption_dim:
        raise ArgenError(f"text encoder {name_or_path!r} gives {encoder.dim}-wide features but the generator takes "
                         f"{cfg.caption_dim}; pick the encoder the generator was trained with (--text-encoder)")

    def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            features, mask = encoder.encode(list(prompts), length=cfg.caption_len)
        return features.float(), mask

    return encode
