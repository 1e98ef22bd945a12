"""Prompt encoding for t2i serving: wraps `argen.data.text_encoders` into the service's callable.

`prompt_encoder(gpt, name_or_path, device)` -> callable prompts -> (features (B, caption_len, D)
float32 left padded, mask (B, caption_len)). It refuses, before any request, an encoder whose
feature width is not the generator's `caption_dim`, naming both; for a local transformers folder
the width is read from its config.json before the weights load. The text-encoder module is
imported only when a t2i model is served, so c2i serving never needs transformers. Problems
(module missing, unknown encoder, width mismatch) are `ArgenError`s that say what to fix.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from argen.models.gpt import GPT
from argen.utils.errors import ArgenError


def _width_error(name_or_path: str, width: int, caption_dim: int) -> ArgenError:
    return ArgenError(f"text encoder {name_or_path!r} gives {width}-wide features but the generator takes "
                      f"{caption_dim}-wide caption features (caption_dim); pick the encoder it was trained with "
                      f"(--text-encoder; the released t2i GPT-XL takes flan-t5-xl, 2048 wide), or serve precomputed "
                      f"features only with --text-encoder none")


def declared_width(name_or_path: str) -> int | None:
    """The hidden width a local transformers folder declares in config.json (None when unknown)."""
    config = Path(name_or_path) / "config.json"
    if str(name_or_path).lower() in ("minilm", "all-minilm-l6-v2") or not config.is_file():  # named, not a folder
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None  # the loader reports an unreadable folder
    width = data.get("d_model", data.get("hidden_size")) if isinstance(data, dict) else None
    return width if isinstance(width, int) else None


def prompt_encoder(gpt: GPT, name_or_path: str, device) -> Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]:
    """A callable prompts -> (features (B, caption_len, D) float32 left-padded, mask (B, caption_len))."""
    cfg = gpt.config
    width = declared_width(name_or_path)
    if width is not None and width != cfg.caption_dim:  # fail before loading gigabytes of weights
        raise _width_error(name_or_path, width, cfg.caption_dim)
    try:
        from argen.data.text_encoders import load_text_encoder
    except ImportError as exc:
        raise ArgenError(f"t2i serving needs argen.data.text_encoders, which cannot be imported ({exc})") from exc
    encoder = load_text_encoder(name_or_path, device=device, max_length=cfg.caption_len)
    if encoder.dim != cfg.caption_dim:
        raise _width_error(name_or_path, encoder.dim, cfg.caption_dim)

    def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            features, mask = encoder.encode(list(prompts), length=cfg.caption_len)
        return features.float(), mask

    return encode
