"""Generator training on code shards: one loop for c2i and t2i, single process or under torchrun.

`train(TrainConfig)` does the whole job and returns a summary dict:
- data: `CodeDataset` (memory-mapped shards); each sample is one randomly chosen augmented copy of an
  image. The order is `training.parts.BatchOrder` (per-epoch permutations; batch s is a pure function
  of (seed, s)); the augmentation choice and the condition-dropout flags come from step s's own
  generator (`BatchOrder.generator(s)`). Every global batch is drawn identically whatever the number
  of processes, and rank r trains on its contiguous slice, split again into `grad_accum`
  micro-batches, so N processes reproduce one process's gradient.
- t2i: labels index caption features in a `TextFeatureStore`, left-padded to `caption_len` with a mask.
- optimization as in LlamaGen: AdamW (0.9, 0.95), weight decay on matrices/embeddings only, lr given
  per 256 samples and scaled by the global batch, grad clip, warmup then constant or cosine, optional
  EMA, bf16/fp16 autocast, fused AdamW on CUDA, optional torch.compile.
- state: `out/checkpoints/step-*.pt` + `latest` (`checkpointing.TrainingCheckpoint`) every `ckpt_every`
  steps and at the end, with the parts model, optimizer, scheduler, scaler, EMA, data position and
  per-rank RNG states, and the settings a resume must keep; `resume=True` restores them (the newest
  readable checkpoint), so an interrupted run ends with bit-identical weights (on the CPU by default;
  on CUDA with `deterministic=True`). The run directory is locked while the run writes it
  (`argen.utils.io.run_lock`, one lock file per rank): a second writer is refused.
- output: `out/gpt.safetensors` (+ .json, EMA weights when EMA is on; raw weights then in `out/raw/`),
  `out/log.jsonl`, TensorBoard events in `out/tb/`, sample grids in `out/samples/` when a tokenizer is given.
- LoRA (`lora_rank`, with `init_from`; `argen.training.lora`): peft's LoRA layers are injected into the
  initialised generator and only they (and rebuilt class rows or a new caption projection) train; the
  checkpoints hold those weights only (the frozen ones come from the init again on resume), and the run
  writes an adapter (`out/adapter_config.json` + `out/adapter_model.safetensors`, EMA'd when EMA is on,
  raw in `out/raw/`; `argen.checkpoint.adapters`) instead of `gpt.safetensors`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from argen.checkpoint import load_tokenizer, save_gpt
from argen.checkpoint.adapters import base_identity, merged_model
from argen.checkpoint.init_weights import load_weights, read_init
from argen.data.codes import CodeDataset
from argen.data.text_features import TextFeatureStore
from argen.engine import generate
from argen.models.gpt import GPT, GPTConfig
from argen.training import distributed as D
from argen.training import finetune as FT
from argen.training import lora as L
from argen.training import parts as P
from argen.training.checkpointing import FORMAT, TrainingCheckpoint
from argen.training.config import BASE_BATCH, TrainConfig
from argen.training.shape import build_model_config as shape_config
from argen.training.shape import data_shape
from argen.utils.errors import ArgenError
from argen.utils.images import make_grid, save_png, to_uint8
from argen.utils.io import atomic_write_json, run_lock
from argen.utils.seeds import derive_seed
from argen.utils.torch_utils import parse_device


# ---------------------------------------------------------------------- helpers
def build_model_config(cfg: TrainConfig, ds: CodeDataset, store: TextFeatureStore | None = None) -> GPTConfig:
    """The architecture `cfg.config` with the data shape of `ds` (and its caption features)."""
    return shape_config(cfg, data_shape(ds, store), str(cfg.codes))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings (ndim >= 2), none on norms and biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup: int, max_steps: int, schedule: str, min_ratio: float):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _identity(cfg: TrainConfig, ds: CodeDataset, world: int) -> dict:
    lora = [cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets] if cfg.lora_rank else None
    return {"batch_size": cfg.batch_size, "seed": cfg.seed, "codebook_size": ds.codebook_size,
            "grid": list(ds.grid), "num_images": len(ds), "num_augs": ds.num_augs, "lora": lora}


class _Logger:
    """`log.jsonl` (`parts.JsonlLog`) and TensorBoard on the main rank, both continued after the resumed step."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, start_step: int):
        self.jsonl = P.JsonlLog(out / "log.jsonl", start_step, enabled)
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step + 1)

    def log(self, record: dict) -> None:
        self.jsonl.write(record)
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _with_ema(state: dict, ema_state: dict | None) -> dict:
    state = {k: v.detach().cpu() for k, v in state.items()}
    if ema_state is not None:
        state.update({k: v.to(state[k].dtype) for k, v in ema_state.items()})
    return state


def _weights_model(gpt_cfg: GPTConfig, state: dict, ema_state: dict | None, lora_cfg=None) -> GPT:
    """The plain generator a run's (full, gathered) state stands for; LoRA runs' adapters merged."""
    state = _with_ema(state, ema_state)
    if lora_cfg is not None:
        return merged_model(gpt_cfg, lora_cfg, state)
    model = GPT(gpt_cfg)
    state = {k: v for k, v in state.items() if k in model.state_dict()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def _sample_conditions(ds: CodeDataset, store: TextFeatureStore | None, gpt_cfg: GPTConfig, count: int):
    if gpt_cfg.kind == "c2i":
        classes = torch.arange(min(count, gpt_cfg.num_classes))
        return classes, None
    seen, picks = set(), []
    for label in ds.labels.tolist():
        if label not in seen:
            seen.add(label)
            picks.append(label)
        if len(picks) == count:
            break
    return store.get(picks, gpt_cfg.caption_len)


@torch.no_grad()
def sample_grid(model: GPT, tokenizer, cond, cond_mask, cfg_scale: float, seed: int, path: Path) -> Path:
    """Generate one image per condition with a fixed seed and save them as one PNG grid."""
    gen = torch.Generator().manual_seed(seed)
    tokens = generate(model, cond, cond_mask, cfg_scale=cfg_scale, temperature=1.0, top_k=0, generator=gen)
    grid = model.config.grid_size
    images = tokenizer.decode(tokens.view(-1, grid, grid))
    return save_png(make_grid(to_uint8(images)), path)


# ---------------------------------------------------------------------- main loop
def train(cfg: TrainConfig, on_step=None) -> dict:
    """Run training; `on_step(step)` (optional) is called after every completed step and its checkpoint."""
    if cfg.max_steps <= 0:
        raise ArgenError("--max-steps must be positive")
    if cfg.schedule not in ("constant", "cosine"):
        raise ArgenError(f"--schedule must be constant or cosine, got {cfg.schedule!r}")
    FT.check_flags(cfg)
    L.check_flags(cfg)
    device = parse_device(cfg.device)
    amp_dtype = P.resolve_precision(cfg.precision, device, fp16_ok=True)
    info = D.init_distributed(device)
    try:
        with contextlib.ExitStack() as resources, P.training_scope(cfg.deterministic, info.device):
            result = _train_generator(cfg, info, info.device, amp_dtype, on_step, resources)
        D.barrier(info)  # every rank done (its last collective and checkpoint) before the group is torn down
        return result
    finally:
        D.cleanup(info)


def _train_generator(cfg: TrainConfig, info: D.DistInfo, device: torch.device, amp_dtype: torch.dtype,
                     on_step, resources: contextlib.ExitStack) -> dict:
    out = Path(cfg.out)
    ds = CodeDataset(cfg.codes)
    if len(ds) == 0:
        raise ArgenError(f"{cfg.codes} holds no images")
    store = None
    if ds.kind == "t2i":
        feat_dir = cfg.text_features or ds.text_features_dir
        if feat_dir is None:
            raise ArgenError("t2i training needs caption features: pass --text-features DIR")
        store = TextFeatureStore(feat_dir)
    init, notes = None, []
    if cfg.init_from:
        # everything the init and the data must agree on is checked before the init's weights are read
        init = read_init(cfg.init_from, cfg.config, weights=False)
        encoder = store.meta.get("encoder") if store is not None else None
        gpt_cfg = FT.finetune_config(cfg, init, data_shape(ds, store), str(ds.root), encoder)
        tokenizer_record, notes = FT.check_tokenizer(init, ds, cfg.new_tokenizer)
        class_starts = None
        if gpt_cfg.kind == "c2i":
            class_starts, class_notes = FT.plan_classes(init, ds.class_names, gpt_cfg.num_classes, cfg.class_init,
                                                        cfg.class_map, str(ds.root))
            notes += class_notes
    else:
        gpt_cfg = build_model_config(cfg, ds, store)
        tokenizer_record = FT.codes_tokenizer(ds)
    ds.check_compatible(gpt_cfg)
    if store is not None:
        if int(ds.labels.max()) >= len(store):
            raise ArgenError(f"codes reference caption {int(ds.labels.max())} but {feat_dir} holds only "
                             f"{len(store)} captions")

    world, accum = info.world_size, cfg.grad_accum
    if cfg.batch_size % (world * accum):
        raise ArgenError(f"global batch {cfg.batch_size} must be divisible by processes x grad-accum "
                         f"= {world} x {accum}")
    micro = cfg.batch_size // (world * accum)
    tokens_per_step = cfg.batch_size * gpt_cfg.num_image_tokens

    # the same initial weights on every rank, then per-rank randomness for dropout
    torch.manual_seed(cfg.seed)
    model = GPT(gpt_cfg)
    lora_cfg = base = None
    if init is not None:
        load_weights(init)
        if cfg.lora_rank:
            base = base_identity(init.ref, init.state, init.record)  # the adapter records which weights it adapts
        table = FT.class_table(init, class_starts)
        if cfg.reinit == "caption-proj":
            notes.append(f"--reinit caption-proj: a new caption projection for {gpt_cfg.caption_dim}-wide "
                         f"features; the text path of {init.label} starts over (its transformer and image "
                         f"tokens are kept)")
        FT.apply_init(model, init, table, cfg.reinit)
        init.state = None  # the weights live in the model now
        if cfg.lora_rank:
            extra = table is not None or cfg.reinit == "caption-proj"
            lora_cfg = L.add_adapters(model, cfg, extra, base["base"])
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)
            notes.append(f"LoRA rank {cfg.lora_rank} on {', '.join(sorted(lora_cfg.target_modules))}: training "
                         f"{trained:,} parameters ({100 * trained / total:.2f}% of {total:,})"
                         + (" including the condition embedding" if extra else ""))
        if info.is_main:
            for note in notes:
                print(f"argen train: {note}", file=sys.stderr, flush=True)
    model.to(device)
    model.train()
    strategy = D.resolve_strategy(cfg.strategy, model, info)
    wrapped = D.wrap_model(model, info, strategy)
    ema = P.EMA(model, cfg.ema_decay, warmup=True) if cfg.ema else None  # under FSDP it shadows the local shards
    torch.manual_seed(derive_seed("dropout", cfg.seed, info.rank))
    if device.type == "cuda":
        torch.cuda.manual_seed(derive_seed("dropout", cfg.seed, info.rank))

    lr = cfg.lr * cfg.batch_size / BASE_BATCH
    # fused AdamW on CUDA and on the CPU (where torch would otherwise pick its slower per-parameter loop)
    opt_kwargs = {"fused": True} if device.type in ("cuda", "cpu") else {}
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=tuple(cfg.betas),
                                  **opt_kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.warmup, cfg.max_steps, cfg.schedule, cfg.min_lr_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    forward = torch.compile(wrapped) if cfg.compile else wrapped

    # the inputs are valid: from here on the run writes into `out`, which no other process may write
    resources.enter_context(run_lock(out, "argen train", rank=info.rank))
    order = P.BatchOrder(len(ds), cfg.batch_size, cfg.seed)
    model_part = P.ModelState(wrapped, info, trainable_only=lora_cfg is not None)  # LoRA: the adapters only
    ckpt_dir = out / "checkpoints"
    model_config = {k: v for k, v in gpt_cfg.to_dict().items() if k != "name"}
    parts = {
        "model_config": P.Settings(model_config, f"the checkpoint in {ckpt_dir} is for a different generator config "
                                               f"(differs in {{keys}}); use the same --config or a new --out"),
        "settings": P.Settings({**_identity(cfg, ds, world), "ema": ema is not None},
                             f"the checkpoint in {ckpt_dir} was trained with different settings ({{keys}}); resume "
                             f"with the same codes, --batch-size, --seed and --ema"),
        "model": model_part, "optimizer": P.OptimizerState(wrapped, optimizer, info), "scheduler": scheduler,
        "scaler": scaler, **({"ema": ema} if ema is not None else {}), "data": order, "rng": P.RngState(device, info),
    }
    ckpt = TrainingCheckpoint(ckpt_dir, parts, cfg.keep, info)
    if not cfg.resume and ckpt.exists():
        raise ArgenError(f"{out} already holds training checkpoints; pass --resume to continue that run or "
                         f"choose another --out")
    step = start_step = ckpt.restore() if cfg.resume else 0
    if info.is_main:
        atomic_write_json(out / "train_config.json", {"train": cfg.to_dict(), "model": gpt_cfg.to_dict(),
                                                      "world_size": world, "strategy": strategy,
                                                      "lr_effective": lr, "batch_order": P.BATCH_ORDER_RULE,
                                                      "checkpoint_format": FORMAT})
    logger = _Logger(out, info.is_main, cfg.tensorboard, step)
    tokenizer = None
    sample_cond = None
    if cfg.tokenizer and cfg.sample_every > 0:
        tokenizer = load_tokenizer(cfg.tokenizer)
        if tokenizer.config.codebook_size != gpt_cfg.vocab_size:
            raise ArgenError(f"the tokenizer's codebook ({tokenizer.config.codebook_size}) differs from the "
                             f"generator's vocabulary ({gpt_cfg.vocab_size})")
        sample_cond = _sample_conditions(ds, store, gpt_cfg, 16 if gpt_cfg.kind == "c2i" else 8)

    def save_samples(at: int) -> None:
        full = model_part.full_state_dict()
        ema_state = ema.state_dict() if ema is not None else None
        if info.is_main:
            eval_model = _weights_model(gpt_cfg, full, ema_state, lora_cfg)
            cond, mask = sample_cond
            sample_grid(eval_model, tokenizer, cond, mask, cfg.sample_cfg, cfg.seed, out / "samples" /
                        f"step-{at:08d}.png")
        D.barrier(info)

    bar = tqdm(total=cfg.max_steps, initial=step, desc=cfg.desc, disable=not (info.is_main and cfg.progress),
               dynamic_ncols=True)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype != torch.float32
                else contextlib.nullcontext())
    last_loss = float("nan")
    first_loss = None
    tick, logged_step = time.perf_counter(), step
    while step < cfg.max_steps:
        step_gen = order.generator(step)
        _, indices = order.next()  # (B,) global batch, identical on every rank
        augs = torch.randint(ds.num_augs, (cfg.batch_size,), generator=step_gen)
        drop = torch.rand(cfg.batch_size, generator=step_gen) < gpt_cfg.class_dropout_prob
        mine = slice(info.rank * micro * accum, (info.rank + 1) * micro * accum)
        indices, augs, drop = indices[mine], augs[mine], drop[mine]
        loss_sum = torch.zeros((), device=device)
        for k in range(accum):
            part = slice(k * micro, (k + 1) * micro)
            codes, labels = ds.get_batch(indices[part], augs[part])
            codes = codes.to(device, non_blocking=True)
            mask = None
            if store is None:
                cond = labels.to(device)
            else:
                feats, mask = store.get(labels, gpt_cfg.caption_len)
                cond, mask = feats.to(device), mask.to(device)
            with D.no_grad_sync(wrapped, active=k < accum - 1), autocast:
                _, loss = forward(codes, cond, mask, drop_cond=drop[part].to(device))
            scaler.scale(loss / accum).backward()
            loss_sum += loss.detach().float()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if ema is not None:
            ema.update(model, step)
        step += 1

        if step % cfg.log_every == 0 or step == cfg.max_steps or step == 1:
            loss_value = float(D.all_reduce_mean(loss_sum / accum, info))
            grad_norm = float(P.full_tensor(grad_norm))
            now = time.perf_counter()
            done = step - logged_step  # not bar.n: a disabled tqdm bar does not count
            tok_s = tokens_per_step * done / max(now - tick, 1e-9)
            tick, logged_step = now, step
            record = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "tokens_per_s": tok_s, "epoch": order.epoch}
            postfix = {"loss": f"{loss_value:.3f}", "lr": f"{record['lr']:.2e}", "tok/s": f"{tok_s:.0f}"}
            if device.type == "cuda":
                record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                postfix["mem"] = f"{record['gpu_mem_gb']:.1f}G"
            logger.log(record)
            bar.set_postfix(postfix, refresh=False)
            bar.update(done)
            last_loss = loss_value
            if first_loss is None:
                first_loss = loss_value
        if step % cfg.ckpt_every == 0 and step < cfg.max_steps:
            ckpt.save(step)
        if tokenizer is not None and (step % cfg.sample_every == 0 or step == cfg.max_steps):
            save_samples(step)
        if on_step is not None:
            on_step(step)
    bar.update(step - bar.n)
    bar.close()

    ckpt.save(step)
    full = model_part.full_state_dict()
    ema_state = ema.state_dict() if ema is not None else None
    result = {"out": str(out), "steps": step, "start_step": start_step, "final_loss": last_loss,
              "first_loss": first_loss, "kind": gpt_cfg.kind, "config": gpt_cfg.name, "is_main": info.is_main,
              "adapter": lora_cfg is not None}
    if info.is_main:
        training = {"steps": step, "codes": str(cfg.codes), "ema": ema is not None}
        if init is not None:
            training["init_from"] = init.record
        extra = {"training": training, "tokenizer": tokenizer_record,
                 "class_names": ds.class_names if gpt_cfg.kind == "c2i" else None}  # served by argen serve
        if lora_cfg is not None:
            extra.update(**base, config=gpt_cfg.to_dict())
            L.save(model, lora_cfg, _with_ema(full, ema_state), out, extra)
            if ema is not None:
                L.save(model, lora_cfg, _with_ema(full, None), out / "raw", extra)
        else:
            save_gpt(_weights_model(gpt_cfg, full, ema_state), out, extra=extra)
            if ema is not None:
                save_gpt(_weights_model(gpt_cfg, full, None), out / "raw", extra=extra)
    D.barrier(info)
    logger.close()
    return result

