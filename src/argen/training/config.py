"""The two trainers' settings: `TrainConfig` (generator) and `TokenizerTrainConfig` (VQ tokenizer).

Contract:
- One dataclass per trainer; every field that is a command-line flag carries its help text (and, where
  it needs one, a numeric argparse type named after a function in `argen.cli.common`) in its
  `metadata`, so `argen.cli.flags` builds the `argen train` / `argen train-tokenizer` flags from these
  definitions alone. A field without `help` is not a flag.
- Metadata keys: `help` (required for a flag), `type` (name of a type in `argen.cli.common`, e.g.
  "positive_int"), `choices`, `flag` (the flag's spelling when it is not `--field-name`), `group`,
  `parts` (tuple fields: one extra flag per element, e.g. `--beta1`, `--beta2`).
  Bool fields become `--name/--no-name` pairs.
- Data-shape fields of `TrainConfig` (`kind`, `vocab_size`, `image_size`, `num_classes`, `caption_len`)
  default to None: the trainer takes them from the codes and their text features; a value given here
  must agree with the data (see `argen.training.shape`).
- This module imports nothing heavy (no torch), because the CLI reads it while building its parser.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

BASE_BATCH = 256  # `TrainConfig.lr` is per this many samples: the optimizer uses lr * batch_size / BASE_BATCH


def _flag(default, help: str, **meta):
    """A dataclass field that is also a command-line flag."""
    meta["help"] = help
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Generator training (`argen train`)."""

    codes: str = _flag(None, "codes directory from `argen extract-codes`")
    out: str = _flag(None, "output directory (checkpoints, logs, final weights)")
    config: str | None = _flag(None, "named generator architecture: GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-3B, ... "
                                     "(layers, width, heads; the data shape comes from the codes). Default: "
                                     "GPT-tiny, or with --init-from the init's (a contradicting value fails)")
    recipe: str | None = _flag(None, "start from a released model's recipe (see `docs/training.md`); explicit "
                                     "flags override it")
    max_steps: int = _flag(1000, "optimizer steps to train for", type="positive_int")
    resume: bool = _flag(False, "continue from OUT/checkpoints/latest if present")
    seed: int = _flag(0, "random seed (weights, data order, dropout)", type="nonneg_int")
    # data shape: taken from the codes; a given value must agree with them
    kind: str | None = _flag(None, "c2i or t2i; must match the codes (default: theirs)", choices=["c2i", "t2i"],
                             group="data shape")
    vocab_size: int | None = _flag(None, "must equal the codes' codebook size (default: theirs)",
                                   type="positive_int", group="data shape")
    image_size: int | None = _flag(None, "must match the codes' grid x downsample (default: the codes')",
                                   type="positive_int", group="data shape")
    num_classes: int | None = _flag(None, "c2i classes (default: the codes'); may exceed the labels present",
                                    type="positive_int", group="data shape")
    caption_len: int | None = _flag(None, "t2i caption tokens (default: the features' max length); longer "
                                          "captions keep their first tokens", type="positive_int",
                                    group="data shape")
    text_features: str | None = _flag(None, "caption features (t2i; default: the ones the codes name)")
    # optimisation
    batch_size: int = _flag(256, "global batch size", type="positive_int")
    lr: float = _flag(1e-4, "learning rate per 256 samples; the effective lr is lr * batch/256",
                      type="positive_float")
    weight_decay: float = _flag(0.05, "AdamW weight decay on matrices and embeddings", type="nonneg_float")
    betas: tuple[float, float] = _flag((0.9, 0.95), "AdamW betas", type="unit_interval", parts=("beta1", "beta2"))
    grad_clip: float = _flag(1.0, "gradient-norm clip", type="positive_float")
    grad_accum: int = _flag(1, "gradient accumulation micro-steps", type="positive_int")
    warmup: int = _flag(0, "linear warmup steps", type="nonneg_int")
    schedule: str = _flag("constant", "learning-rate schedule after warmup", choices=["constant", "cosine"])
    min_lr_ratio: float = _flag(0.0, "cosine floor as a fraction of the peak lr", type="nonneg_float")
    precision: str | None = _flag(None, "autocast precision (default bf16 on CUDA, fp32 on the CPU)",
                                  choices=["fp32", "bf16", "fp16"])
    ema: bool = _flag(False, "keep an EMA of the weights; the final file holds it")
    ema_decay: float = _flag(0.9999, "EMA decay", type="unit_interval")
    compile: bool = _flag(False, "torch.compile the model")
    # regularisation (default: the architecture's, 0.1 dropout, no drop path, 0.1 class dropout)
    drop_path: float | None = _flag(None, "stochastic depth rate (default: the config's, 0)", type="probability")
    dropout: float | None = _flag(None, "token, attention-output and FFN dropout (default: the config's, 0.1)",
                                  type="probability")
    token_dropout: float | None = _flag(None, "token-embedding dropout alone (default: --dropout)",
                                        type="probability")
    class_dropout: float | None = _flag(None, "condition dropout for guidance (default: the config's, 0.1)",
                                        type="probability")
    # fine-tuning (argen.training.finetune)
    init_from: str | None = _flag(None, "start from these generator weights: anything --gpt takes (a released name "
                                        "such as c2i_B_256, hf://..., a released .pt, an argen generator); the "
                                        "architecture comes from them; a different image size is fine (stage II)",
                                  group="fine-tuning")
    class_init: str | None = _flag(None, "c2i, when the codes' classes differ from the init's: how the rebuilt "
                                         "class rows start (the null row is kept): null (the null row), mean (of "
                                         "the old rows) or imagenet (the init class of the same name; unknown "
                                         "names fail). Default: the class of the same name where there is one, "
                                         "else the mean", choices=["null", "mean", "imagenet"], group="fine-tuning")
    class_map: str | None = _flag(None, "JSON file {your class name: ImageNet class id or name} for rebuilt rows",
                                  group="fine-tuning")
    reinit: str | None = _flag(None, "caption-proj: learn a new caption projection (t2i, for caption features of "
                                     "another width, e.g. MiniLM's 384); the text path starts over",
                               choices=["caption-proj"], group="fine-tuning")
    new_tokenizer: bool = _flag(False, "accept codes from a tokenizer other than the init's (same vocabulary "
                                       "size); risky: the init's token embeddings and output head mean other "
                                       "image patches, so the run starts from a model that predicts the wrong "
                                       "tokens and must unlearn them", flag="--allow-tokenizer-change",
                                group="fine-tuning")
    # LoRA adapters (argen.training.lora, docs/finetune.md)
    lora_rank: int | None = _flag(None, "train LoRA adapters of this rank (peft) on the --init-from generator instead "
                                        "of every weight; the run saves an adapter (adapter_config.json, "
                                        "adapter_model.safetensors) for --lora DIR", type="positive_int",
                                  group="LoRA")
    lora_alpha: float | None = _flag(None, "LoRA alpha: the update is scaled by alpha / rank (default: the rank, "
                                           "a scale of 1)", type="positive_float", group="LoRA")
    lora_dropout: float = _flag(0.0, "dropout on the adapters' inputs", type="probability", group="LoRA")
    lora_targets: str = _flag("attn,ffn", "the linears that get adapters: attn (wqkv, wo), ffn (w1, w2, w3), or "
                                          "module names wqkv, wo, w1, w2, w3, output, comma separated", group="LoRA")
    # execution
    strategy: str = _flag("auto", "under torchrun: ddp, fsdp (sharded), or auto (fsdp above 1B parameters)",
                          choices=["auto", "none", "ddp", "fsdp"])
    device: str = _flag("auto", "cpu, cuda or auto")
    deterministic: bool = _flag(False, "deterministic CUDA kernels (slower); CPU runs always use them")
    ckpt_every: int = _flag(1000, "training-state checkpoint interval (steps)", type="positive_int")
    keep: int = _flag(2, "training-state checkpoints to keep", type="positive_int")
    log_every: int = _flag(10, "log interval (steps)", type="positive_int")
    sample_every: int = _flag(0, "sample-grid interval (needs --tokenizer; 0 = never)", type="nonneg_int")
    tokenizer: str | None = _flag(None, "tokenizer for the periodic sample grids")
    sample_cfg: float = _flag(3.0, "guidance scale for the sample grids", type="nonneg_float")
    tensorboard: bool = _flag(True, "write TensorBoard event files")
    progress: bool = _flag(True, "show a progress bar")
    desc: str = "train"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out


@dataclass
class TokenizerTrainConfig:
    """VQ tokenizer training (`argen train-tokenizer`)."""

    out: str = _flag(None, "run directory")
    data: str = _flag("demo", "'demo', a class-folder path or a .jsonl manifest")
    split: str = _flag("train", "train, val or all")
    filter: str | None = _flag(None, "tar shards: keep only samples whose JSON metadata (and score sidecar) "
                                     "passes this expression, e.g. \"min(width, height) >= 256\" (docs/data.md)")
    config: str = _flag("VQ-tiny", "named tokenizer config (VQ-tiny, VQ-demo, VQ-16, VQ-8, ...)")
    recipe: str | None = _flag(None, "start from a released tokenizer's recipe; explicit flags override it")
    # tokenizer shape overrides (recorded in the saved tokenizer's config)
    codebook_size: int | None = _flag(None, "codebook entries (default: the config's)", type="positive_int",
                                      group="tokenizer shape")
    codebook_dim: int | None = _flag(None, "codebook vector width (default: the config's; the paper's "
                                           "Table 2 compares 8, 32 and 256)", type="positive_int",
                                     group="tokenizer shape")
    codebook_l2_norm: bool | None = _flag(None, "L2-normalise codes and codebook (default: the config's, on)",
                                          group="tokenizer shape")
    downsample: int | None = _flag(None, "spatial downsample factor, a power of two such as 8 or 16 (default: "
                                         "the config's); levels are added or removed at the full-resolution "
                                         "end", type="positive_int", group="tokenizer shape")
    entropy_loss_ratio: float | None = _flag(None, "entropy loss weight (default: the config's)",
                                             type="nonneg_float", group="tokenizer shape")
    init_from: str | None = _flag(None, "fine-tune from these weights: an argen tokenizer (dir or "
                                        ".safetensors) or a released .pt (with its discriminator when it has "
                                        "one; give --config for it, e.g. VQ-16)")
    image_size: int = _flag(64, "training crop size", type="positive_int")
    batch_size: int = _flag(128, "batch size", type="positive_int")
    max_steps: int = _flag(1000, "total optimizer steps", type="positive_int")
    lr: float = _flag(1e-4, "learning rate (constant)", type="positive_float")
    weight_decay: float = _flag(0.05, "AdamW weight decay", type="nonneg_float")
    betas: tuple[float, float] = _flag((0.9, 0.95), "AdamW betas", type="unit_interval", parts=("beta1", "beta2"))
    max_grad_norm: float = _flag(1.0, "gradient-norm clip", type="positive_float")
    precision: str = _flag("auto", "auto (bf16 on CUDA, fp32 on the CPU), bf16 or fp32")
    device: str = _flag("auto", "cpu, cuda or auto")
    seed: int = _flag(0, "random seed", type="nonneg_int")
    ema: bool = _flag(False, "keep an EMA of the weights and save it as the result")
    ema_decay: float = _flag(0.9999, "EMA decay", type="unit_interval")
    reconstruction: str = _flag("l2", "pixel reconstruction loss", choices=["l2", "l1"])
    reconstruction_weight: float = _flag(1.0, "pixel reconstruction loss weight", type="nonneg_float")
    perceptual_weight: float = _flag(1.0, "LPIPS weight (0 = off)", type="nonneg_float")
    vgg_weights: str | None = _flag("auto", "VGG16 trunk for LPIPS: a torchvision state-dict file, 'download', "
                                            "'auto' (torch hub cache if present, else LPIPS off) or 'none'")
    lpips_heads: str | None = _flag(None, "LPIPS linear-head file (default: the lpips package's)")
    codebook_weight: float = _flag(1.0, "codebook loss weight", type="nonneg_float")
    disc_weight: float = _flag(0.5, "adversarial loss weight", type="nonneg_float")
    disc_start: int = _flag(20000, "step at which the GAN loss starts", type="nonneg_int")
    disc_layers: int = _flag(3, "PatchGAN depth (fewer for small images)", type="positive_int")
    disc_channels: int = 64
    disc_adaptive: bool = _flag(False, "VQGAN adaptive adversarial weight")
    use_disc: bool = _flag(True, "train with the PatchGAN discriminator", flag="--disc")
    restart_dead_codes: int = _flag(0, "every N steps move unused codebook entries onto current encoder "
                                       "outputs (0 = off)", type="nonneg_int")
    min_crop_frac: float = _flag(0.8, "random crop keeps at least this fraction of the short side (1 = no zoom)",
                                 type="unit_interval")
    hflip: bool = _flag(True, "random horizontal flips")
    max_bad_fraction: float = _flag(0.05, "stop when more than this fraction of images fail to load",
                                    type="float_range(0,1)")
    ckpt_every: int = _flag(1000, "training-state checkpoint interval (steps)", type="positive_int")
    log_every: int = _flag(10, "log interval (steps)", type="positive_int")
    num_workers: int = _flag(0, "data-loading worker processes", type="nonneg_int")
    deterministic: bool = _flag(False, "deterministic CUDA kernels (slower); CPU runs always use them")
    resume: bool = _flag(False, "continue the run in --out")
    progress: bool = _flag(True, "show a progress bar")
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out
