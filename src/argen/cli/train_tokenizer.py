"""Train a VQ image tokenizer (L2 + LPIPS + PatchGAN + codebook losses), resumable.

Example: argen train-tokenizer --data demo --config VQ-demo --out runs/vq-demo --max-steps 2000 --batch-size 32
Writes OUT/tokenizer.safetensors (+ .json, loadable with argen.load_tokenizer(OUT)), OUT/train_state.pt
(exact-resume state), OUT/train_config.json and OUT/log.jsonl. Rerun with --resume to continue a run.
"""

from __future__ import annotations

import json
import logging

from argen.training.tokenizer import TokenizerTrainConfig, train_tokenizer


def add_arguments(parser):
    d = TokenizerTrainConfig(out="")
    parser.add_argument("--data", default="demo", help="'demo', a class-folder path or a .jsonl manifest")
    parser.add_argument("--split", default="train", help="train, val or all (default train)")
    parser.add_argument("--config", default=d.config, help="named tokenizer config (VQ-tiny, VQ-demo, VQ-16, ...)")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--max-steps", type=int, required=True, help="total optimizer steps")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--codebook-size", type=int, default=None, help="override the config's codebook size")
    parser.add_argument("--entropy-loss-ratio", type=float, default=None, help="entropy loss weight (default: config)")
    parser.add_argument("--image-size", type=int, default=d.image_size)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--beta1", type=float, default=d.betas[0])
    parser.add_argument("--beta2", type=float, default=d.betas[1])
    parser.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    parser.add_argument("--precision", default=d.precision, help="auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32")
    parser.add_argument("--device", default=d.device)
    parser.add_argument("--ema", action="store_true", help="keep an EMA of the weights and save it as the result")
    parser.add_argument("--ema-decay", type=float, default=d.ema_decay)
    parser.add_argument("--reconstruction", choices=("l2", "l1"), default=d.reconstruction)
    parser.add_argument("--perceptual-weight", type=float, default=d.perceptual_weight)
    parser.add_argument("--vgg-weights", default=d.vgg_weights,
                        help="VGG16 trunk for LPIPS: a torchvision state-dict file, 'download', 'auto' (torch hub "
                             "cache if present, else LPIPS off) or 'none'")
    parser.add_argument("--lpips-heads", default=None, help="LPIPS linear-head file (default: the lpips package's)")
    parser.add_argument("--codebook-weight", type=float, default=d.codebook_weight)
    parser.add_argument("--disc-weight", type=float, default=d.disc_weight)
    parser.add_argument("--disc-start", type=int, default=d.disc_start, help="step at which the GAN loss starts")
    parser.add_argument("--disc-layers", type=int, default=d.disc_layers,
                        help="PatchGAN depth (fewer for small images)")
    parser.add_argument("--disc-adaptive", action="store_true", help="VQGAN adaptive adversarial weight")
    parser.add_argument("--no-disc", action="store_true", help="train without the discriminator")
    parser.add_argument("--restart-dead-codes", type=int, default=0, metavar="N",
                        help="every N steps move unused codebook entries onto current encoder outputs (0 = off)")
    parser.add_argument("--min-crop-frac", type=float, default=d.min_crop_frac,
                        help="random crop keeps at least this fraction of the short side (1 = no zoom)")
    parser.add_argument("--no-hflip", action="store_true")
    parser.add_argument("--max-bad-fraction", type=float, default=d.max_bad_fraction,
                        help="stop when more than this fraction of images fail to load")
    parser.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    parser.add_argument("--log-every", type=int, default=d.log_every)
    parser.add_argument("--num-workers", type=int, default=d.num_workers)
    parser.add_argument("--deterministic", action="store_true", help="torch deterministic algorithms")
    parser.add_argument("--no-progress", action="store_true")


def run(args):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = TokenizerTrainConfig(
        out=args.out, data=args.data, split=args.split, config=args.config, codebook_size=args.codebook_size,
        entropy_loss_ratio=args.entropy_loss_ratio, image_size=args.image_size, batch_size=args.batch_size,
        max_steps=args.max_steps, lr=args.lr, weight_decay=args.weight_decay, betas=(args.beta1, args.beta2),
        max_grad_norm=args.max_grad_norm, precision=args.precision, device=args.device, seed=args.seed,
        ema=args.ema, ema_decay=args.ema_decay, reconstruction=args.reconstruction,
        perceptual_weight=args.perceptual_weight, vgg_weights=args.vgg_weights, lpips_heads=args.lpips_heads,
        codebook_weight=args.codebook_weight, disc_weight=args.disc_weight, disc_start=args.disc_start,
        disc_layers=args.disc_layers, disc_adaptive=args.disc_adaptive, use_disc=not args.no_disc,
        restart_dead_codes=args.restart_dead_codes, min_crop_frac=args.min_crop_frac, hflip=not args.no_hflip,
        max_bad_fraction=args.max_bad_fraction, ckpt_every=args.ckpt_every, log_every=args.log_every,
        num_workers=args.num_workers, deterministic=args.deterministic,
        resume=args.resume, progress=not args.no_progress)
    summary = train_tokenizer(cfg)
    print(json.dumps(summary, indent=2, default=str))
    return 0
