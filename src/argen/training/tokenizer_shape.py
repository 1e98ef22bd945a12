"""The tokenizer a `train-tokenizer` run builds: a named config, the shape flags, or `--init-from` weights.

Contract:
- `resolve_tokenizer(cfg)` -> (`VQConfig`, `TokenizerInit` or None) for a `TokenizerTrainConfig`:
  - without `init_from`: `vq_config(cfg.config)` with the shape flags applied: `codebook_size`,
    `codebook_dim` (-> `codebook_embed_dim`), `codebook_l2_norm`, `downsample` (`with_downsample`) and
    `entropy_loss_ratio`; the config's name records them, e.g. "VQ-16+codebook_size=4096,downsample=8".
  - with `init_from`: the file's config (an argen tokenizer) or `cfg.config` (a released .pt file), whose
    weights the run starts from. A shape flag that contradicts the file raises `ArgenError` (a fine-tune
    keeps the file's shape); `entropy_loss_ratio` is a loss weight and may change.
- `read_tokenizer_init(path, config_name)` -> `TokenizerInit(config, model_state, disc_state, source)`.
  Released LlamaGen files are read with `weights_only=True` (`argen.checkpoint.released`); their
  "discriminator" entry, when present, becomes `disc_state`. argen tokenizer files hold no
  discriminator, so the fine-tune starts a fresh one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from argen.checkpoint import load_tokenizer
from argen.checkpoint.released import extract_state_dict, read_torch_file
from argen.models.tokenizer import VQConfig, vq_config, with_downsample
from argen.utils.errors import ArgenError


@dataclass
class TokenizerInit:
    config: VQConfig
    model_state: dict[str, torch.Tensor]
    disc_state: dict[str, torch.Tensor] | None
    source: str


def read_tokenizer_init(path: str, config_name: str) -> TokenizerInit:
    file = Path(path)
    if not file.exists():
        raise ArgenError(f"--init-from {path}: no such file or directory")
    if file.is_dir() or file.suffix == ".safetensors":
        model = load_tokenizer(file)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return TokenizerInit(model.config, state, None, str(file))
    obj = read_torch_file(file)
    config = vq_config(config_name)
    model_state = extract_state_dict(obj, str(file))
    disc_state = None
    if isinstance(obj, Mapping) and isinstance(obj.get("discriminator"), Mapping):
        disc_state = extract_state_dict(obj, str(file), container="discriminator")
    return TokenizerInit(config, model_state, disc_state, str(file))


def _shape_flags(cfg) -> dict:
    """flag -> (config field, given value) for the shape flags that were set."""
    flags = {"--codebook-size": ("codebook_size", cfg.codebook_size),
             "--codebook-dim": ("codebook_embed_dim", cfg.codebook_dim),
             "--codebook-l2-norm": ("codebook_l2_norm", cfg.codebook_l2_norm),
             "--downsample": ("downsample", cfg.downsample)}
    return {flag: item for flag, item in flags.items() if item[1] is not None}


def resolve_tokenizer(cfg) -> tuple[VQConfig, TokenizerInit | None]:
    flags = _shape_flags(cfg)
    init = None
    if cfg.init_from:
        init = read_tokenizer_init(cfg.init_from, cfg.config)
        vq = init.config
        for flag, (name, given) in flags.items():
            actual = getattr(vq, name)
            if given != actual:
                raise ArgenError(f"{flag} {given} but the --init-from tokenizer {init.source} has {actual}; a "
                                 f"fine-tune keeps the file's shape (drop the flag)")
    else:
        vq = vq_config(cfg.config)
        changes = {}
        for name, given in flags.values():
            if name == "downsample":
                if given != vq.downsample:
                    vq = with_downsample(vq, given)
                    changes[name] = given
            elif given != getattr(vq, name):
                vq = replace(vq, **{name: given})
                changes[name] = given
        if changes:
            vq = replace(vq, name=f"{vq.name}+" + ",".join(f"{k}={v}" for k, v in changes.items()))
    if cfg.entropy_loss_ratio is not None and cfg.entropy_loss_ratio != vq.entropy_loss_ratio:
        vq = replace(vq, entropy_loss_ratio=cfg.entropy_loss_ratio)
    if cfg.image_size % vq.downsample:
        raise ArgenError(f"--image-size {cfg.image_size} is not a multiple of {vq.name}'s downsample {vq.downsample}")
    return vq, init
