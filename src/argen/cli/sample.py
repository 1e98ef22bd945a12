"""Sample images from a tokenizer + generator checkpoint pair.

Class-conditional:  argen sample --tokenizer vq_ds16_c2i.pt --tokenizer-config VQ-16 \\
                      --gpt c2i_B_256.pt --gpt-config GPT-B --kind c2i --image-size 256 --classes 207,360
Text-conditional:   argen sample ... --kind t2i --features captions.npz  (npz: features (B,L,D), mask (B,L))
Writes one PNG per image and grid.png to --out, and prints the sampling and decoding times.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from argen.cli.common import add_checkpoint_arguments, load_models
from argen.engine import generate
from argen.utils.errors import ArgenError
from argen.utils.images import make_grid, save_png, to_uint8
from argen.utils.io import atomic_save_npy

DEFAULTS = {"c2i": {"cfg_scale": 4.0, "top_k": 2000}, "t2i": {"cfg_scale": 7.5, "top_k": 1000}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    cond = parser.add_mutually_exclusive_group(required=True)
    cond.add_argument("--classes", help="comma-separated class ids, e.g. 207,360,387")
    cond.add_argument("--features", help="npz with caption features `features` (B,L,D) and `mask` (B,L)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default 4.0 c2i, 7.5 t2i)")
    parser.add_argument("--cfg-interval", type=int, default=-1, help="guide only up to this token index (-1: all)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k filter, 0 disables (default 2000 c2i, 1000 t2i)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus filter in (0, 1] (default 1.0: off)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature > 0 (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward batch (default 32)")
    parser.add_argument("--out", default="samples", help="output directory (default ./samples)")
    parser.add_argument("--save-codes", action="store_true", help="also write OUT/codes.npy (B, N) int64")


def parse_classes(text: str) -> torch.Tensor:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ArgenError(f"--classes must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise ArgenError("--classes is empty")
    return torch.tensor(ids, dtype=torch.long)


def read_features(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with np.load(path) as data:
            missing = {"features", "mask"} - set(data.files)
            if missing:
                raise ArgenError(f"{path} lacks {sorted(missing)}; it needs `features` (B,L,D) and `mask` (B,L)")
            features, mask = data["features"], data["mask"]
    except (OSError, ValueError) as exc:
        raise ArgenError(f"cannot read caption features {path}: {exc}") from exc
    if features.ndim != 3 or mask.shape != features.shape[:2]:
        raise ArgenError(f"{path}: expected features (B,L,D) and mask (B,L), got {features.shape} and {mask.shape}")
    return torch.from_numpy(features.astype(np.float32)), torch.from_numpy(mask.astype(np.float32))


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ArgenError("--batch-size must be >= 1")
    tokenizer, gpt, device, _ = load_models(args)
    kind = gpt.config.kind
    if kind == "c2i" and args.classes is None:
        raise ArgenError("this is a class-conditional generator: pass --classes")
    if kind == "t2i" and args.features is None:
        raise ArgenError("this is a text-conditional generator: pass --features FILE.npz")
    if kind == "c2i":
        cond, cond_mask = parse_classes(args.classes), None
    else:
        cond, cond_mask = read_features(args.features)
    gpt.check_condition(cond, cond_mask)
    defaults = DEFAULTS[kind]
    sampling = dict(cfg_scale=defaults["cfg_scale"] if args.cfg_scale is None else args.cfg_scale,
                    cfg_interval=args.cfg_interval, temperature=args.temperature,
                    top_k=defaults["top_k"] if args.top_k is None else args.top_k, top_p=args.top_p)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = gpt.config.grid_size
    all_codes, all_images = [], []
    sample_time = decode_time = 0.0
    for start in range(0, cond.shape[0], args.batch_size):
        chunk = cond[start:start + args.batch_size].to(device)
        chunk_mask = None if cond_mask is None else cond_mask[start:start + args.batch_size].to(device)
        generator = torch.Generator(device=device).manual_seed(args.seed + start)
        t0 = time.perf_counter()
        codes = generate(gpt, chunk, chunk_mask, generator=generator, **sampling)
        t1 = time.perf_counter()
        images = tokenizer.decode(codes.view(-1, grid, grid))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        sample_time += t1 - t0
        decode_time += t2 - t1
        all_codes.append(codes.cpu())
        all_images.append(to_uint8(images))
    codes = torch.cat(all_codes)
    images = np.concatenate(all_images)
    for i, image in enumerate(images):
        tag = f"class{int(cond[i])}" if kind == "c2i" else "caption"
        save_png(image, out / f"{i:05d}_{tag}.png")
    save_png(make_grid(images), out / "grid.png")
    if args.save_codes:
        atomic_save_npy(out / "codes.npy", codes.numpy().astype(np.int64))
    n = images.shape[0]
    print(f"sampled {n} images ({gpt.config.num_image_tokens} tokens each) in {sample_time:.2f} s "
          f"({n / max(sample_time, 1e-9):.2f} img/s); decoded in {decode_time:.2f} s; wrote {out}/")
    return 0
