"""Stand-in LoRA adapters for tests and benchmarks: random A and B on an argen base, written by `save_adapter` as a
training run writes them (peft's layout, argen's record), optionally with their own class rows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from argen.checkpoint.adapters import base_identity, lora_config, save_adapter, target_modules
from argen.models.gpt import GPT


def make_adapter(base: GPT, base_ref: str | Path, out: str | Path, seed: int, rank: int = 4, targets: str = "attn,ffn",
                 class_names: list[str] | None = None, std: float = 0.3, identity: GPT | None = None,
                 caption_proj: bool = False) -> Path:
    """An adapter of `base` (saved at `base_ref`) in `out`; `class_names` rebuild the class rows (c2i),
    `caption_proj` brings a new caption projection and unconditional caption of the base's shape (t2i);
    `identity`: the model whose weights the adapter claims as its base (default `base`)."""
    g = torch.Generator().manual_seed(seed)
    modules = target_modules(targets)
    config = lora_config(rank, 2.0 * rank, 0.0, targets, class_names is not None or caption_proj, str(base_ref))
    state = {}
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in modules:
            state[f"{name}.lora_A.weight"] = std * torch.randn(rank, module.in_features, generator=g)
            state[f"{name}.lora_B.weight"] = std * torch.randn(module.out_features, rank, generator=g) / rank
    cfg = base.config
    if class_names is not None:
        cfg = replace(cfg, num_classes=len(class_names))
        state["cls_embedding.embedding_table.weight"] = 0.5 * torch.randn(len(class_names) + 1, cfg.dim, generator=g)
    if caption_proj:
        for key, value in base.cls_embedding.state_dict().items():
            state[f"cls_embedding.{key}"] = value + 0.5 * value.std() * torch.randn(value.shape, generator=g)
    info = {**base_identity(str(base_ref), (identity or base).state_dict()), "config": cfg.to_dict(),
            "class_names": class_names, "tokenizer": None, "training": {}}
    return save_adapter(config, state, out, info)
