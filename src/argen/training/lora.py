"""LoRA fine-tuning (`argen train --init-from REF --lora-rank R`): peft's LoRA layers on the init's linears.

Contract:
- `check_flags(cfg)`: --lora-alpha/--lora-dropout/--lora-targets only with --lora-rank, and --lora-rank
  only with --init-from (an adapter belongs to a base); the targets must name modules
  (`argen.checkpoint.adapters.target_modules`). Raised before the run writes anything.
- `add_adapters(model, cfg, extra)` injects peft's LoRA layers (`peft.inject_adapter_in_model`) into the
  generator in place and freezes everything else; with `extra` (rebuilt class rows, or a new caption
  projection) the condition embedding trains too, as peft's `modules_to_save`. The model keeps its class
  and its forward, so the training loop, DDP and FSDP2 (`fully_shard` per block) run it unchanged, and
  the checkpoint parts (model, optimizer, EMA) hold the injected model's state. -> the LoraConfig.
- `save(model, config, full, out, info)`: the adapter from the injected model's full state dict
  (`get_peft_model_state_dict`), written by `argen.checkpoint.adapters.save_adapter`.
- `trainable_parameters(gpt_cfg, cfg, extra)` -> (adapter's trainable parameters, all parameters), counted
  on the meta device, for --dry-run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from argen.checkpoint.adapters import EXTRA, lora_config, lora_parameters, save_adapter, target_modules
from argen.models.gpt import GPT, GPTConfig
from argen.utils.errors import ArgenError


def check_flags(cfg) -> None:
    if cfg.lora_rank is None:
        given = [flag for flag, value, default in (("--lora-alpha", cfg.lora_alpha, None),
                                                   ("--lora-dropout", cfg.lora_dropout, 0.0),
                                                   ("--lora-targets", cfg.lora_targets, "attn,ffn"))
                 if value != default]
        if given:
            raise ArgenError(f"{', '.join(given)} only apply to LoRA training: add --lora-rank")
        return
    if cfg.lora_rank <= 0:
        raise ArgenError(f"--lora-rank must be a positive integer, got {cfg.lora_rank}")
    if not cfg.init_from:
        raise ArgenError("--lora-rank trains adapters on a base generator: add --init-from (e.g. c2i_B_256)")
    target_modules(cfg.lora_targets)


def add_adapters(model: GPT, cfg, extra: bool, base: str | None = None):
    """Inject the run's LoRA layers into `model` (in place); only they (and with `extra` the condition
    embedding) train. `base` names the base in peft's config (`base_model_name_or_path`)."""
    from peft import inject_adapter_in_model

    config = lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, extra, base)
    inject_adapter_in_model(config, model)
    return config


def save(model: GPT, config, full: dict, out: str | Path, info: dict) -> Path:
    """Write the adapter held in `full` (the injected model's full state dict) to `out`."""
    from peft import get_peft_model_state_dict

    # embeddings are never targeted; "auto" would look for the base's config.json on the Hub
    state = get_peft_model_state_dict(model, state_dict=full, save_embedding_layers=False)
    return save_adapter(config, state, out, info)


def trainable_parameters(gpt_cfg: GPTConfig, cfg, extra: bool) -> tuple[int, int]:
    """(parameters an adapter run trains, parameters of the generator)."""
    with torch.device("meta"):
        model = GPT(gpt_cfg)
    total = sum(p.numel() for p in model.parameters())
    adapter = lora_parameters(model, target_modules(cfg.lora_targets), cfg.lora_rank)
    if extra:
        adapter += sum(p.numel() for p in getattr(model, EXTRA).parameters())
    return adapter, total
