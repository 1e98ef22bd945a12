"""Generate an ADM-format npz of samples for evaluation (resumable, one GPU or many under torchrun).

  argen sample-batch --tokenizer vq_ds16_c2i.pt --tokenizer-config VQ-16 --gpt c2i_L_384.pt --gpt-config GPT-L \\
      --kind c2i --image-size 384 --num-samples 50000 --cfg-scale 2.0 --top-k 0 --top-p 1.0 --seed 0 \\
      --eval-size 256 --resize bicubic --out samples/GPT-L-384
  torchrun --nproc_per_node 8 -m argen.cli.main sample-batch ...   (same flags: same images)

Writes OUT/shards/*.npz as it goes (rerun the same command to resume) and finally OUT/samples.npz with
arr_0 = uint8 (N, E, E, 3) and arr_1 = class labels. Image i uses class i % C (class-balanced) or caption
row i % B of --features, and a seed derived from (--seed, i's batch).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from argen.cli.common import add_checkpoint_arguments, load_models
from argen.cli.sample import read_features
from argen.evaluation.sample_batch import RESIZE_MODES, SampleBatchConfig, sample_batch
from argen.utils.errors import ArgenError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    parser.add_argument("--num-samples", type=int, default=50000, help="images to generate (default 50000)")
    cond = parser.add_mutually_exclusive_group()
    cond.add_argument("--num-classes", type=int, default=None,
                      help="c2i: spread labels over classes 0..C-1, N/C each (default: all of the generator's)")
    cond.add_argument("--features", help="t2i: npz with caption features `features` (B,L,D) and `mask` (B,L), or a "
                      "folder written by argen extract-text-features")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale (default 1.0: none)")
    parser.add_argument("--cfg-interval", type=int, default=-1, help="guide only up to this token index (-1: all)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k filter, 0 disables (default 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus filter in (0, 1] (default 1.0: off)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="global seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per generation batch (default 32)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per resumable shard (default 1000)")
    parser.add_argument("--eval-size", type=int, default=256,
                        help="resize samples to this size for evaluation (default 256; 0 keeps the generated size)")
    parser.add_argument("--resize", choices=RESIZE_MODES, default="bicubic-antialias",
                        help="resampling for --eval-size (default bicubic-antialias; `bicubic` = LlamaGen's script)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--png", action="store_true", help="also write OUT/png/NNNNNN.png per image")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _rank_and_world() -> tuple[int, int]:
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ArgenError("RANK and WORLD_SIZE must be integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise ArgenError(f"bad RANK={rank} / WORLD_SIZE={world}")
    return rank, world


def run(args: argparse.Namespace) -> int:
    rank, world = _rank_and_world()
    if world > 1 and args.device == "auto" and torch.cuda.is_available():
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    tokenizer, gpt, _, _ = load_models(args)
    features = mask = None
    if gpt.config.kind == "t2i":
        if args.features is None:
            raise ArgenError("this is a text-conditional generator: pass --features (an npz, or a folder written "
                             "by argen extract-text-features)")
        features, mask = read_features(args.features, gpt.config.caption_len)
    elif args.features is not None:
        raise ArgenError("this is a class-conditional generator: use --num-classes, not --features")
    config = SampleBatchConfig(num_samples=args.num_samples, num_classes=args.num_classes, cfg_scale=args.cfg_scale,
                               cfg_interval=args.cfg_interval, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                               shard_size=args.shard_size, eval_size=args.eval_size or None, resize=args.resize,
                               png=args.png)
    info = {"tokenizer": str(Path(args.tokenizer).resolve()), "gpt": str(Path(args.gpt).resolve()),
            "gpt_config": gpt.config.name, "tokenizer_config": tokenizer.config.name, "dtype": args.dtype}
    path = sample_batch(tokenizer, gpt, config, args.out, features, mask, rank=rank, world_size=world,
                        checkpoint_info=info, progress=not args.quiet)
    if path is not None:
        print(f"wrote {path} ({config.num_samples} images, {config.eval_size or gpt.config.image_size}px)")
    return 0
