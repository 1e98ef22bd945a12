"""VQ tokenizer training loop (LlamaGen recipe) with exact resume.

Contract:
- `TokenizerTrainConfig`: every knob of a run (data, tokenizer config + overrides, optimisation, losses,
  precision, checkpointing). `train_tokenizer(cfg)` trains for `cfg.max_steps` optimizer steps and returns
  a summary dict; the final weights (the EMA copy when `ema` is on) go to `<out>/tokenizer.safetensors`
  (+ .json) through `argen.checkpoint.save_tokenizer`, so `argen.load_tokenizer(out)` reads them.
- Files in `out`: `train_config.json`, `checkpoints/step-*.pt` + `latest` (`training.checkpointing`:
  the parts model, optimizer, discriminator and its optimizer, EMA, data position, RNG, failure counts
  and the settings a resume must keep; written atomically every `ckpt_every` steps and at the end),
  `log.jsonl` (one line per `log_every` steps: losses, PSNR, codebook usage over the quantizer's rolling
  65,536-code window, images/s, learning rate). The run directory is locked while the run writes it
  (`argen.utils.io.run_lock`): a second writer is refused.
- `filter` (tar shards only, `argen.data.filters`): the samples that pass it are the training set; what it
  kept and dropped, per criterion, is logged and recorded as `filter_report` in `train_config.json`.
- Exact resume: the data order is `training.parts.BatchOrder` (a pure function of (seed, step)),
  per-image augmentation is seeded by (seed, epoch, index), and every parameter, buffer and optimizer
  moment is in the checkpoint, so `resume=True` after a crash (even SIGKILL) ends with the same weights
  as an uninterrupted run on the same device; on the CPU that holds by default (see `training_scope`).
- Optional dead-code restart (`restart_dead_codes` = N > 0): every N steps, codebook entries unused in the
  rolling window are moved onto random encoder outputs of the current batch (off in the paper recipe).
- Losses: L2 (or L1) reconstruction + LPIPS + codebook + commitment (beta in the tokenizer config) +
  optional entropy + PatchGAN hinge adversarial loss (weight `disc_weight`, from step `disc_start`).
  AdamW (beta1, beta2), weight decay, constant learning rate, gradient clipping, optional EMA.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from argen.checkpoint import save_tokenizer
from argen.checkpoint.loading import load_strict
from argen.data.datasets import TransformedDataset, collate_skip, open_dataset
from argen.data.images import FailureTracker
from argen.data.transforms import TrainTransform
from argen.models.discriminator import PatchGANDiscriminator
from argen.models.lpips import LPIPS, resolve_vgg_weights
from argen.models.tokenizer import VQModel
from argen.training import parts as P
from argen.training.checkpointing import FORMAT, TrainingCheckpoint
from argen.training.config import TokenizerTrainConfig
from argen.training.losses import TokenizerLoss, psnr
from argen.training.tokenizer_shape import TokenizerInit, resolve_tokenizer
from argen.utils.errors import ArgenError
from argen.utils.io import atomic_write_json, run_lock
from argen.utils.seeds import derive_seed
from argen.utils.torch_utils import parse_device

log = logging.getLogger("argen.training")
OLD_STATE_FILE = "train_state.pt"  # checkpoint format 1, before the named parts
CHECKPOINTS = "checkpoints"
CONFIG_FILE = "train_config.json"
LOG_FILE = "log.jsonl"
# settings that may change between a run and its resumption
_RESUMABLE_CHANGES = {"max_steps", "resume", "ckpt_every", "log_every", "num_workers", "progress", "out"}


@torch.no_grad()
def restart_dead_codes(model: VQModel, images: torch.Tensor, seed: int) -> int:
    """Move codebook entries unused in the quantizer's rolling window onto random current encoder outputs.

    An optional remedy for codebook collapse in short or small runs (off by default); deterministic given
    `seed`. Returns the number of entries moved.
    """
    quantizer = model.quantize
    seen = quantizer.codebook_used[quantizer.codebook_used >= 0].long()
    used = torch.zeros(quantizer.codebook_size, dtype=torch.bool, device=seen.device)
    used[seen] = True
    dead = (~used).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    was_training = model.training
    model.eval()
    latents = model.encode_latents(images).float()  # (B, C, h, w)
    model.train(was_training)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (N, C)
    if quantizer.l2_norm:
        flat = torch.nn.functional.normalize(flat, dim=-1)
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=generator).to(flat.device)
    noise = torch.randn(dead.numel(), flat.shape[1], generator=generator).to(flat.device) * 1e-3
    weight = quantizer.embedding.weight
    weight[dead.to(weight.device)] = (flat[pick] + noise).to(weight.dtype)
    return int(dead.numel())


def build_tokenizer(cfg: TokenizerTrainConfig) -> tuple[VQModel, TokenizerInit | None]:
    """The tokenizer to train (named config + shape flags, or the `init_from` weights) and its init."""
    vq, init = resolve_tokenizer(cfg)
    model = VQModel(vq)
    if init is not None:
        load_strict(model, init.model_state, init.source, f"tokenizer config {vq.name!r}")
    return model, init


def _check_out_dir(cfg: TokenizerTrainConfig, out: Path) -> None:
    if (out / OLD_STATE_FILE).exists():
        raise ArgenError(f"{out} holds a tokenizer run of an older argen ({OLD_STATE_FILE}, checkpoint format 1, "
                         f"another data order); this version cannot resume it: start the run in another --out")
    if not cfg.resume and ((out / CHECKPOINTS).is_dir() or (out / "tokenizer.safetensors").exists()):
        raise ArgenError(f"{out} already holds a tokenizer training run; pass --resume to continue it or "
                         f"choose another --out")


def train_tokenizer(cfg: TokenizerTrainConfig) -> dict:
    """Run (or resume) a training run; the caller's global RNG and determinism settings are left as they were."""
    if cfg.max_steps < 0:
        raise ArgenError("--max-steps must be >= 0")
    device = parse_device(cfg.device)
    with contextlib.ExitStack() as resources, P.training_scope(cfg.deterministic, device):
        return _train_tokenizer(cfg, device, resources)


def _train_tokenizer(cfg: TokenizerTrainConfig, device: torch.device, resources: contextlib.ExitStack) -> dict:
    out = Path(cfg.out)
    dtype = P.resolve_precision(cfg.precision, device, fp16_ok=False)

    dataset = open_dataset(cfg.data, cfg.split, sample_filter=cfg.filter)
    if len(dataset) == 0:
        raise ArgenError(f"--data {cfg.data} split {cfg.split} has no images"
                         + (" that pass --filter" if cfg.filter else ""))
    filter_report = getattr(dataset, "filter_report", None)
    for line in filter_report.lines() if filter_report else ():
        log.info(line)
    transform = TrainTransform(cfg.image_size, hflip=cfg.hflip, min_frac=cfg.min_crop_frac)

    torch.manual_seed(cfg.seed)
    model, init = build_tokenizer(cfg)
    model.to(device)
    # On the CPU, oneDNN's convolutions run about 1.4x faster (forward and backward) on channels-last tensors,
    # mostly for the few-channel full-resolution layers; the weights are written back in the usual layout.
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    model.to(memory_format=memory_format)
    vgg = resolve_vgg_weights(cfg.vgg_weights)
    perceptual, perceptual_weight = None, cfg.perceptual_weight
    if perceptual_weight > 0:
        if vgg is None and str(cfg.vgg_weights).lower() in ("auto", "none"):
            log.warning("no VGG16 weights found (pass --vgg-weights PATH or 'download'); perceptual loss is off")
            perceptual_weight = 0.0
        else:
            perceptual = LPIPS(vgg, cfg.lpips_heads).to(device)
    disc = None
    if cfg.use_disc:
        layers = cfg.disc_layers
        while layers > 1 and cfg.image_size / 2 ** layers < 3:  # the last two 4x4 convs need >= 3x3 inputs
            layers -= 1
        if layers != cfg.disc_layers:
            log.info("using a %d-layer discriminator for %dpx images", layers, cfg.image_size)
        disc = PatchGANDiscriminator(3, cfg.disc_channels, layers)
        disc.reset_parameters(torch.Generator().manual_seed(derive_seed("discriminator-init", cfg.seed)))
        if init is not None and init.disc_state is not None:
            load_strict(disc, init.disc_state, init.source, f"a {layers}-layer discriminator")
        disc.to(device)
    loss_fn = TokenizerLoss(perceptual, disc, cfg.reconstruction, cfg.reconstruction_weight, perceptual_weight,
                            cfg.codebook_weight, cfg.disc_weight, cfg.disc_start, cfg.disc_adaptive)
    # torch picks the per-parameter AdamW loop on the CPU; the fused kernel is 3x faster for these ~200 tensors
    opt_kwargs = {"fused": True} if device.type == "cpu" else {}
    opt_g = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                              **opt_kwargs)
    opt_d = (torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                               **opt_kwargs) if disc is not None else None)
    ema = P.EMA(model, cfg.ema_decay) if cfg.ema else None
    tracker = FailureTracker(cfg.max_bad_fraction, min_count=min(100, len(dataset)))
    order = P.BatchOrder(len(dataset), cfg.batch_size, cfg.seed)
    # the inputs are valid: from here on the run writes into `out`, which no other process may write
    resources.enter_context(run_lock(out, "argen train-tokenizer"))
    _check_out_dir(cfg, out)

    kept = {k: v for k, v in cfg.to_dict().items() if k not in _RESUMABLE_CHANGES}
    parts = {"settings": P.Settings({**kept, "tokenizer_config": model.config.to_dict()},
                                  f"--resume with settings that differ from the run in {out}: {{keys}}; use the "
                                  f"original settings or another --out"),
             "model": P.ModelState(model), "optimizer": P.OptimizerState(model, opt_g)}
    if disc is not None:
        parts.update(disc=P.ModelState(disc), disc_optimizer=P.OptimizerState(disc, opt_d))
    if ema is not None:
        parts["ema"] = ema
    parts.update(data=order, failures=P.Attributes(tracker, ("tried", "failed", "skipped")), rng=P.RngState(device))
    ckpt = TrainingCheckpoint(out / CHECKPOINTS, parts, keep=2)
    step = ckpt.restore() if cfg.resume else 0
    if step:
        log.info("resuming %s at step %d from %s", out, step, ckpt.restored_from)
    atomic_write_json(out / CONFIG_FILE, {**cfg.to_dict(), "tokenizer_config": model.config.to_dict(),
                                          "batch_order": P.BATCH_ORDER_RULE, "checkpoint_format": FORMAT,
                                          **({"filter_report": filter_report.to_dict()} if filter_report else {})})

    loader = torch.utils.data.DataLoader(TransformedDataset(dataset, transform, cfg.seed),
                                         batch_sampler=order.keys(cfg.max_steps), collate_fn=collate_skip,
                                         num_workers=cfg.num_workers,
                                         generator=torch.Generator().manual_seed(derive_seed("loader", cfg.seed)))
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train-tokenizer", disable=not cfg.progress, unit="step")
    window = {"images": 0, "time": time.perf_counter()}
    last_logs: dict = {}
    log_file = P.JsonlLog(out / LOG_FILE, step)
    try:
        for images, _, _, failures in loader:
            if tracker.record(images, failures):
                images = images.to(device).contiguous(memory_format=memory_format)
                model.train()
                with autocast:
                    vq_out = model(images)
                    g_loss, logs = loss_fn.generator(images, vq_out, step, model.decoder.last_layer)
                opt_g.zero_grad(set_to_none=True)
                g_loss.backward()
                logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
                opt_g.step()
                if disc is not None and step >= cfg.disc_start:
                    disc.train()
                    with autocast:
                        d_loss, d_logs = loss_fn.discriminator_loss(images, vq_out.reconstruction, step)
                    opt_d.zero_grad(set_to_none=True)
                    d_loss.backward()
                    torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.max_grad_norm)
                    opt_d.step()
                    logs.update(d_logs)
                if cfg.restart_dead_codes and (step + 1) % cfg.restart_dead_codes == 0 \
                        and step + 1 + cfg.restart_dead_codes <= cfg.max_steps:
                    logs["restarted_codes"] = restart_dead_codes(model, images,
                                                                 derive_seed("restart-codes", cfg.seed, step))
                if ema is not None:
                    ema.update(model, step)
                logs["psnr"] = float(psnr(vq_out.reconstruction, images).mean())
                logs["codebook_usage"] = vq_out.codebook_usage
                window["images"] += images.shape[0]
                last_logs = logs
            step += 1
            order.position = step
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                elapsed = time.perf_counter() - window["time"]
                record = {"step": step, **last_logs, "lr": cfg.lr,
                          "images_per_s": window["images"] / max(elapsed, 1e-9)}
                log_file.write(record)
                bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                                psnr=f"{record.get('psnr', float('nan')):.2f}",
                                usage=f"{record.get('codebook_usage', 0.0):.3f}",
                                ips=f"{record['images_per_s']:.1f}")
                window = {"images": 0, "time": time.perf_counter()}
            if step % cfg.ckpt_every == 0 and step < cfg.max_steps:
                ckpt.save(step)
        tracker.check(final=True)
    finally:
        bar.close()
        log_file.close()
    ckpt.save(step)
    final = model
    if ema is not None:  # the live model's buffers (codebook usage window) with the averaged parameters
        final = copy.deepcopy(model)
        final.load_state_dict({**model.state_dict(), **ema.state_dict()})
    final = final.to(memory_format=torch.contiguous_format)
    info = {"steps": step, "data": cfg.data, "image_size": cfg.image_size, "ema": cfg.ema,
            "perceptual": perceptual is not None, "skipped_images": tracker.failed}
    path = save_tokenizer(final.eval(), out, extra={"training": info})
    return {"tokenizer": str(path), **info, "last": last_logs}
