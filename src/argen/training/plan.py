"""`--dry-run`: what a training run would do, without data or a GPU.

Contract:
- `generator_plan(cfg, recipe=None, world_size=1)` -> dict: the resolved generator config (the
  architecture of `cfg.init_from` when given, read without a download for released names; the data
  shape from `cfg.codes` when that directory exists, else from the recipe's `data.shape`, else the
  init's), parameter count, optimizer steps, samples and image tokens seen, epochs (when the dataset size is known), and
  `memory`: an estimate of the GPU memory one rank needs at the given batch (`estimate_memory`); with
  `cfg.lora_rank`, `lora`: the adapter's trainable parameters (and whether the condition embedding trains
  with it) and its memory estimate, beside the full fine-tune's.
- `tokenizer_plan(cfg, recipe=None)` -> dict: the resolved tokenizer config, parameters (tokenizer and
  discriminator), steps, images seen, epochs, and the optimizer-state memory.
- `estimate_memory(gpt_cfg, micro_batch, shards, precision, ema)` -> bytes by component. The model is
  built on the meta device (no memory, exact parameter count P). Components:
  - weights 4P, gradients 4P, AdamW moments 8P, EMA 4P (fp32), divided by `shards` (FSDP world size);
    with `trainable` = T (a LoRA run: the adapters and a copy of a retrained condition embedding), weights
    4(P + T) and gradients, moments and EMA of T only;
  - autocast copies of the weights, 2P (2(P + T)) / shards in bf16/fp16;
  - activations kept for backward, per sample of s = cond_len + N - 1 positions and N image tokens, with
    d = width, f = SwiGLU hidden size, a = 2 bytes (bf16/fp16) or 4 (fp32), V = vocabulary:
    per layer and position 18d (two fp32 residual inputs of the RMSNorms, the fp32 q and k that RoPE
    rotates, two dropout masks) + a(6d + 4f) (normed input, q, k, v, attention output, normed FFN
    input, w1/w3 outputs, SiLU, product);
    plus per image token (a + 8)V for the logits, their float32 copy and the log-softmax;
  - 1 GiB for the CUDA context, kernels' workspace and allocator slack.
  Attention is assumed to run in a fused kernel (no s x s score matrix kept); activation
  checkpointing and allocator fragmentation are not modelled. `benchmarks/check_memory_estimate.py`
  compares the activation part with the bytes autograd really saves (on the CPU).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from argen.checkpoint.adapters import target_modules
from argen.checkpoint.init_weights import read_init
from argen.data.codes import CodeDataset
from argen.data.text_features import TextFeatureStore
from argen.models.gpt import DATA_SHAPE_FIELDS, GPT, GPTConfig
from argen.models.tokenizer import VQModel
from argen.nn.llama import swiglu_hidden_dim
from argen.training.config import BASE_BATCH, TokenizerTrainConfig, TrainConfig
from argen.training.finetune import finetune_config, plan_classes
from argen.training.lora import trainable_parameters
from argen.training.shape import build_model_config, data_shape
from argen.training.tokenizer_shape import resolve_tokenizer
from argen.utils.errors import ArgenError

GIB = 2 ** 30


def _count(build) -> int:
    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())


def estimate_memory(gpt_cfg: GPTConfig, micro_batch: int, shards: int, precision: str, ema: bool,
                    trainable: int | None = None) -> dict:
    params = _count(lambda: GPT(gpt_cfg))
    extra = trainable or 0  # a LoRA run's adapter (and condition-embedding copy) beside the frozen weights
    trained = params if trainable is None else trainable
    a = 4 if precision == "fp32" else 2
    d, layers, vocab = gpt_cfg.dim, gpt_cfg.n_layer, gpt_cfg.vocab_size
    f = swiglu_hidden_dim(d, gpt_cfg.multiple_of, gpt_cfg.ffn_dim_multiplier)
    tokens = gpt_cfg.num_image_tokens
    positions = gpt_cfg.cond_len + tokens - 1
    per_sample = positions * (layers * (18 * d + a * (6 * d + 4 * f)) + 4 * d + a * d) + tokens * (a + 8) * vocab
    parts = {
        "weights (fp32)": 4 * (params + extra) / shards,
        "gradients (fp32)": 4 * trained / shards,
        "AdamW moments (fp32)": 8 * trained / shards,
        "EMA (fp32)": 4 * trained / shards if ema else 0,
        "autocast weight copies": 0 if a == 4 else 2 * (params + extra) / shards,
        f"activations ({micro_batch} samples x {positions} positions)": micro_batch * per_sample,
        "CUDA context and workspace": GIB,
    }
    return {"parameters": params, "parts": parts, "total": sum(parts.values())}


def _shape_source(cfg: TrainConfig, recipe: dict | None, init: GPTConfig | None = None
                  ) -> tuple[dict, str, int | None]:
    if cfg.codes and Path(cfg.codes).is_dir():
        ds = CodeDataset(cfg.codes)
        store = None
        if ds.kind == "t2i":
            feat_dir = cfg.text_features or ds.text_features_dir
            store = TextFeatureStore(feat_dir) if feat_dir else None
        return data_shape(ds, store), str(cfg.codes), len(ds)
    if recipe is not None and "shape" in recipe.get("data", {}):
        data = recipe["data"]
        return dict(data["shape"]), f"recipe {recipe['name']} ({data.get('dataset', 'its data')})", \
            data.get("num_images")
    if init is not None:
        return {k: getattr(init, k) for k in DATA_SHAPE_FIELDS}, f"--init-from {cfg.init_from}", None
    raise ArgenError("--dry-run needs --codes (an existing codes directory), --init-from or a --recipe with a "
                     "data shape")


def generator_plan(cfg: TrainConfig, recipe: dict | None = None, world_size: int = 1) -> dict:
    init = read_init(cfg.init_from, cfg.config, weights=False) if cfg.init_from else None  # no download for names
    shape, source, num_images = _shape_source(cfg, recipe, init.config if init else None)
    gpt_cfg = finetune_config(cfg, init, shape, source) if init else build_model_config(cfg, shape, source)
    if cfg.batch_size % (world_size * cfg.grad_accum):
        raise ArgenError(f"global batch {cfg.batch_size} must be divisible by processes x grad-accum "
                         f"= {world_size} x {cfg.grad_accum}")
    micro = cfg.batch_size // (world_size * cfg.grad_accum)
    params = _count(lambda: GPT(gpt_cfg))
    strategy = cfg.strategy
    if strategy == "auto":
        strategy = "fsdp" if world_size > 1 and params > 1e9 else ("ddp" if world_size > 1 else "none")
    shards = world_size if strategy == "fsdp" else 1
    precision = cfg.precision or "bf16"
    memory = estimate_memory(gpt_cfg, micro, shards, precision, cfg.ema)
    lora = None
    if cfg.lora_rank:
        extra = cfg.reinit == "caption-proj" or (gpt_cfg.kind == "c2i" and _classes_rebuilt(cfg, init, gpt_cfg))
        adapter, _ = trainable_parameters(gpt_cfg, cfg, extra)
        lora = {"rank": cfg.lora_rank, "targets": target_modules(cfg.lora_targets), "trainable": adapter,
                "condition_embedding": extra,
                "memory_per_rank": estimate_memory(gpt_cfg, micro, shards, precision, cfg.ema, trainable=adapter)}
    steps = cfg.max_steps
    samples = steps * cfg.batch_size if steps else None
    plan = {
        "data": source, "model": gpt_cfg.to_dict(), "parameters": params,
        "world_size": world_size, "strategy": strategy, "micro_batch_per_rank": micro,
        "lr_effective": cfg.lr * cfg.batch_size / BASE_BATCH, "optimizer_steps": steps,
        "samples_seen": samples,
        "image_tokens_seen": samples * gpt_cfg.num_image_tokens if samples else None,
        "epochs": samples / num_images if samples and num_images else None,
        "memory_per_rank": memory, "precision": precision, "lora": lora,
    }
    return plan


def _classes_rebuilt(cfg: TrainConfig, init, gpt_cfg: GPTConfig) -> bool:
    """Whether a fine-tune from `init` rebuilds the class table (then it trains beside the adapters)."""
    names = CodeDataset(cfg.codes).class_names if cfg.codes and Path(cfg.codes).is_dir() else init.class_names
    starts, _ = plan_classes(init, names, gpt_cfg.num_classes, cfg.class_init, cfg.class_map, str(cfg.codes))
    return starts is not None


def tokenizer_plan(cfg: TokenizerTrainConfig, recipe: dict | None = None) -> dict:
    vq, _ = resolve_tokenizer(cfg)  # reads the --init-from file's config, when given
    params = _count(lambda: VQModel(vq))
    disc = 0
    if cfg.use_disc:
        from argen.models.discriminator import PatchGANDiscriminator

        disc = _count(lambda: PatchGANDiscriminator(3, cfg.disc_channels, cfg.disc_layers))
    num_images = (recipe or {}).get("data", {}).get("num_images")
    images = cfg.max_steps * cfg.batch_size
    states = 16 * (params + disc) + (4 * params if cfg.ema else 0)
    return {"tokenizer": vq.to_dict(), "parameters": params, "discriminator_parameters": disc,
            "optimizer_steps": cfg.max_steps, "images_seen": images,
            "epochs": images / num_images if num_images else None,
            "weights_gradients_adamw_bytes": states,
            "tokens_per_image": (cfg.image_size // vq.downsample) ** 2}


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.1f} MiB"


def fmt_count(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit} ({n:,.0f})" if float(n).is_integer() else f"{n / size:.3g}{unit}"
    return f"{n:g}" if not math.isnan(n) else "nan"
