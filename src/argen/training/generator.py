"""Generator training on code shards: one loop for c2i and t2i, single process or under torchrun.

`train(TrainConfig)` does the whole job and returns a summary dict:
- data: `CodeDataset` (memory-mapped shards); each sample is one randomly chosen augmented copy of an
  image. The order is a per-epoch permutation seeded by (seed, epoch); the augmentation choice and the
  condition-dropout flags come from a data generator whose state is checkpointed. Every global batch
  is drawn identically whatever the number of processes, and rank r trains on its contiguous slice,
  split again into `grad_accum` micro-batches, so N processes reproduce one process's gradient.
- t2i: labels index caption features in a `TextFeatureStore`, left-padded to `caption_len` with a mask.
- optimization as in LlamaGen: AdamW (0.9, 0.95), weight decay on matrices/embeddings only, lr given
  per 256 samples and scaled by the global batch, grad clip, warmup then constant or cosine, optional
  EMA, bf16/fp16 autocast, fused AdamW on CUDA, optional torch.compile.
- state: `out/checkpoints/step-*.pt` + `latest` (see `checkpointing`) every `ckpt_every` steps and at the
  end; `resume=True` restores model, optimizer, scheduler, scaler, EMA, step, data position and per-rank
  RNG states, so an interrupted run ends with bit-identical weights (CPU, `deterministic=True`).
- output: `out/gpt.safetensors` (+ .json, EMA weights when EMA is on; raw weights then in `out/raw/`),
  `out/log.jsonl`, TensorBoard events in `out/tb/`, sample grids in `out/samples/` when a tokenizer is given.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from argen.checkpoint import load_tokenizer, save_gpt
from argen.checkpoint.loading import load_strict
from argen.data.codes import CodeDataset
from argen.data.text_features import TextFeatureStore
from argen.engine import generate
from argen.models.gpt import GPT, GPTConfig
from argen.training import distributed as D
from argen.training.checkpointing import CheckpointManager
from argen.training.config import TrainConfig
from argen.training.shape import build_model_config as shape_config
from argen.training.shape import data_shape
from argen.utils.errors import ArgenError, CheckpointError
from argen.utils.images import make_grid, save_png, to_uint8
from argen.utils.io import atomic_write_json
from argen.utils.seeds import derive_seed
from argen.utils.torch_utils import parse_device, parse_dtype

BASE_BATCH = 256


# ---------------------------------------------------------------------- data order
class BatchSampler:
    """Deterministic global batches: per-epoch permutations; the state is (epoch, pos)."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=gen)

    def next(self, batch: int) -> torch.Tensor:
        parts, need = [], batch
        while need:
            take = min(need, self.size - self.pos)
            parts.append(self._perm[self.pos:self.pos + take])
            self.pos += take
            need -= take
            if self.pos == self.size:
                self.epoch += 1
                self.pos = 0
                self._perm = self._permutation(self.epoch)
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size:
            raise CheckpointError(f"the checkpoint was trained on {state['size']} images but the codes hold "
                                  f"{self.size}; resume with the same codes")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation(self.epoch)


# ---------------------------------------------------------------------- EMA
def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP shard) -> its full tensor (collective); plain tensors pass through."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class EMA:
    """Exponential moving average of the trainable parameters, with the usual short-run warmup."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        params = [p.detach().float() for p in model.parameters() if p.requires_grad]
        torch._foreach_lerp_(self.shadow, params, 1.0 - decay)

    def full_state(self) -> dict:
        return {n: _full(t).detach().cpu() for n, t in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_full_state(self, state: dict) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise CheckpointError(f"the checkpoint's EMA lacks {len(missing)} parameters (e.g. {missing[0]})")
        for name, t in zip(self.names, self.shadow):
            full = state[name].to(torch.float32)
            if hasattr(t, "full_tensor"):
                from torch.distributed.tensor import distribute_tensor

                t.copy_(distribute_tensor(full.to(t.device), t.device_mesh, t.placements))
            else:
                t.copy_(full.to(t.device))


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


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _identity(cfg: TrainConfig, ds: CodeDataset, world: int) -> dict:
    return {"batch_size": cfg.batch_size, "seed": cfg.seed, "codebook_size": ds.codebook_size,
            "grid": list(ds.grid), "num_images": len(ds), "num_augs": ds.num_augs}


def _config_diff(a: dict, b: dict) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if k != "name" and a.get(k) != b.get(k)]


class _Logger:
    """JSONL (+ TensorBoard) logging on the main rank; on resume drops entries past the resumed step."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, start_step: int):
        self.enabled = enabled
        self.path = out / "log.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.handle = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step + 1)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.handle.close()
            if self.tb is not None:
                self.tb.close()


def _full_model_state(model: torch.nn.Module, info: D.DistInfo) -> dict:
    """Full (unsharded) CPU state dict; collective under FSDP. Non-main ranks may get an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=info.distributed)
    return get_model_state_dict(model, options=options)


def _weights_model(gpt_cfg: GPTConfig, state: dict, ema_state: dict | None) -> GPT:
    model = GPT(gpt_cfg)
    state = {k: v.detach().cpu() for k, v in state.items()}
    if ema_state is not None:
        state.update({k: v.to(state[k].dtype) for k, v in ema_state.items()})
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
    device = parse_device(cfg.device)
    precision = cfg.precision or ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = parse_dtype(precision)
    if amp_dtype == torch.float16 and device.type == "cpu":
        raise ArgenError("fp16 training needs CUDA; use fp32 or bf16 on the CPU")
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    info = D.init_distributed(device)
    try:
        return _train_generator(cfg, info, info.device, amp_dtype, on_step)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        D.cleanup(info)


def _train_generator(cfg: TrainConfig, info: D.DistInfo, device: torch.device, amp_dtype: torch.dtype,
                     on_step) -> dict:
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
    gpt_cfg = build_model_config(cfg, ds, store)
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
    if cfg.init_from:
        _init_from(model, cfg.init_from)
    model.to(device)
    model.train()
    strategy = D.resolve_strategy(cfg.strategy, model, info)
    wrapped = D.wrap_model(model, info, strategy)
    ema = EMA(model, cfg.ema_decay) if cfg.ema else None  # under FSDP it shadows the local shards
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

    sampler = BatchSampler(len(ds), cfg.seed)
    data_gen = torch.Generator().manual_seed(derive_seed("data", cfg.seed))
    ckpts = CheckpointManager(out / "checkpoints", cfg.keep)
    identity = _identity(cfg, ds, world)
    step = 0
    if not cfg.resume and ckpts.latest_path() is not None:
        raise ArgenError(f"{out} already holds training checkpoints; pass --resume to continue that run or "
                         f"choose another --out")
    if cfg.resume:
        step = _restore(ckpts, wrapped, optimizer, scheduler, scaler, ema, sampler, data_gen, gpt_cfg, identity,
                        info, device)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "train_config.json", {"train": cfg.to_dict(), "model": gpt_cfg.to_dict(),
                                                      "world_size": world, "strategy": strategy,
                                                      "lr_effective": lr})
    logger = _Logger(out, info.is_main, cfg.tensorboard, step)
    tokenizer = None
    sample_cond = None
    if cfg.tokenizer and cfg.sample_every > 0:
        tokenizer = load_tokenizer(cfg.tokenizer)
        if tokenizer.config.codebook_size != gpt_cfg.vocab_size:
            raise ArgenError(f"the tokenizer's codebook ({tokenizer.config.codebook_size}) differs from the "
                             f"generator's vocabulary ({gpt_cfg.vocab_size})")
        sample_cond = _sample_conditions(ds, store, gpt_cfg, 16 if gpt_cfg.kind == "c2i" else 8)

    def save_checkpoint(at: int) -> None:
        state = _collect(wrapped, optimizer, scheduler, scaler, ema, sampler, data_gen, gpt_cfg, identity,
                         info, device, at)
        if info.is_main:
            ckpts.save(state, at)
        D.barrier(info)

    def save_samples(at: int) -> None:
        full = _full_model_state(wrapped, info)
        ema_state = ema.full_state() if ema is not None else None
        if info.is_main:
            eval_model = _weights_model(gpt_cfg, full, ema_state)
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
    tick = time.perf_counter()
    while step < cfg.max_steps:
        indices = sampler.next(cfg.batch_size)  # (B,) global batch, identical on every rank
        augs = torch.randint(ds.num_augs, (cfg.batch_size,), generator=data_gen)
        drop = torch.rand(cfg.batch_size, generator=data_gen) < gpt_cfg.class_dropout_prob
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
            grad_norm = float(_full(grad_norm))
            now = time.perf_counter()
            done = step - bar.n
            tok_s = tokens_per_step * done / max(now - tick, 1e-9)
            tick = now
            record = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "tokens_per_s": tok_s, "epoch": sampler.epoch}
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
            save_checkpoint(step)
        if tokenizer is not None and (step % cfg.sample_every == 0 or step == cfg.max_steps):
            save_samples(step)
        if on_step is not None:
            on_step(step)
    bar.update(step - bar.n)
    bar.close()

    save_checkpoint(step)
    full = _full_model_state(wrapped, info)
    ema_state = ema.full_state() if ema is not None else None
    result = {"out": str(out), "steps": step, "final_loss": last_loss, "first_loss": first_loss,
              "kind": gpt_cfg.kind, "config": gpt_cfg.name, "is_main": info.is_main}
    if info.is_main:
        extra = {"training": {"steps": step, "codes": str(cfg.codes), "ema": ema is not None},
                 "class_names": ds.class_names if gpt_cfg.kind == "c2i" else None}  # served by argen serve
        save_gpt(_weights_model(gpt_cfg, full, ema_state), out, extra=extra)
        if ema is not None:
            save_gpt(_weights_model(gpt_cfg, full, None), out / "raw", extra=extra)
    D.barrier(info)
    logger.close()
    return result


def _init_from(model: GPT, path: str) -> None:
    """Stage II: start from a stage I generator (any image size; the RoPE table is not stored)."""
    file = Path(path)
    if file.is_dir():
        file = file / "gpt.safetensors"
    if not file.is_file():
        raise ArgenError(f"--init-from {path}: no gpt.safetensors there")
    try:
        state = load_file(str(file), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"cannot read {file} ({exc})") from exc
    load_strict(model, state, str(file), f"generator config {model.config.name!r}")


def _collect(wrapped, optimizer, scheduler, scaler, ema, sampler, data_gen, gpt_cfg, identity, info, device,
             step) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=info.distributed)
    model_state, optim_state = get_state_dict(wrapped, optimizer, options=options)
    rngs = D.all_gather_objects(_rng_state(device), info)
    return {
        "step": step,
        "model": model_state,
        "optimizer": optim_state,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema.full_state() if ema is not None else None,
        "sampler": sampler.state_dict(),
        "data_gen": data_gen.get_state(),
        "rng": rngs,
        "world_size": info.world_size,
        "gpt_config": gpt_cfg.to_dict(),
        "identity": identity,
    }


def _restore(ckpts, wrapped, optimizer, scheduler, scaler, ema, sampler, data_gen, gpt_cfg, identity, info,
             device) -> int:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = ckpts.load_latest()
    if state is None:
        return 0
    diff = _config_diff(state["gpt_config"], gpt_cfg.to_dict())
    if diff:
        raise CheckpointError(f"the checkpoint in {ckpts.directory} is for a different generator config "
                              f"(differs in {', '.join(diff)}); use the same --config or a new --out")
    ident_diff = _config_diff(state["identity"], identity)
    if ident_diff:
        raise CheckpointError(f"the checkpoint in {ckpts.directory} was trained with different settings "
                              f"({', '.join(ident_diff)}); resume with the same codes, --batch-size and --seed")
    if (state["ema"] is None) != (ema is None):
        raise CheckpointError("the checkpoint and this run disagree on --ema; resume with the same flag")
    set_state_dict(wrapped, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema.load_full_state(state["ema"])
    sampler.load_state_dict(state["sampler"])
    data_gen.set_state(state["data_gen"])
    if state["world_size"] == info.world_size:
        _set_rng_state(state["rng"][info.rank], device)
    return int(state["step"])
