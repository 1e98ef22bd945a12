"""Encode a dataset to image-token shards for generator training (resumable, torchrun-aware).

Example: argen extract-codes --tokenizer runs/vq-demo --data demo --out runs/codes --image-size 64 --ten-crop --flip
Every image x {center crop, or 5 crops of a --crop-range larger center crop with --ten-crop} x {as is, mirrored
with --flip} is encoded; `--ten-crop --flip` gives LlamaGen's 10 copies. Shards hold codes (n, A, h, w) and labels
(class ids; for a JSONL manifest the row of the image's first caption in --text-features). A rerun skips finished
shards. Under torchrun each rank takes every WORLD_SIZE-th shard.
"""

from __future__ import annotations

import json
import logging
import os

from argen.cli.common import (
    add_progress_argument,
    float_range,
    fraction,
    nonneg_int,
    positive_int,
    show_progress,
)


def add_arguments(parser):
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory or file")
    parser.add_argument("--tokenizer-config", default=None, help="named config, needed for released (.pt) files")
    parser.add_argument("--data", required=True, help="'demo', a class folder, a .jsonl manifest or .tar shards")
    parser.add_argument("--split", default="train", help="train, val or all (default train)")
    parser.add_argument("--filter", default=None, metavar="EXPR",
                        help="tar shards: keep only samples whose JSON metadata (and score sidecar) passes EXPR, "
                             "e.g. \"min(width, height) >= 256 and similarity >= 0.28\" (see docs/data.md); give "
                             "extract-text-features and extract-codes the same filter")
    parser.add_argument("--label", default="category", help="demo labels: category (10) or subcategory (99)")
    parser.add_argument("--out", required=True, help="codes directory")
    parser.add_argument("--image-size", type=positive_int, required=True)
    parser.add_argument("--ten-crop", action="store_true", help="4 corner + center crops of a larger center crop")
    parser.add_argument("--crop-range", type=float_range(1.0, 4.0), default=1.1,
                        help="ten-crop source size / image size, in [1, 4] (1.05, 1.1)")
    parser.add_argument("--flip", action="store_true", help="also encode the mirrored copy of every crop")
    parser.add_argument("--text-features", default=None, help="caption features dir (required for JSONL data)")
    parser.add_argument("--shard-size", type=positive_int, default=1024, help="images per shard")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--num-workers", type=nonneg_int, default=0)
    parser.add_argument("--max-bad-fraction", type=fraction, default=0.05,
                        help="stop when more than this fraction of the images cannot be read (default 0.05)")
    parser.add_argument("--device", default="auto")
    add_progress_argument(parser)


def run(args):
    from argen.checkpoint import load_tokenizer
    from argen.data.datasets import open_dataset
    from argen.data.extract import dist_env, extract_codes
    from argen.data.filters import SampleFilter
    from argen.utils.io import run_lock
    from argen.utils.torch_utils import parse_device

    sample_filter = SampleFilter.parse(args.filter)  # a bad filter fails before anything loads
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rank, world = dist_env()
    device = args.device
    if world > 1 and device == "auto":
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = parse_device(device)
    with run_lock(args.out, "argen extract-codes", rank):
        model = load_tokenizer(args.tokenizer, config=args.tokenizer_config, device=device)
        dataset = open_dataset(args.data, args.split, label=args.label, sample_filter=sample_filter)
        index = extract_codes(model, dataset, args.out, args.image_size, ten_crop=args.ten_crop, flip=args.flip,
                              crop_range=args.crop_range, shard_size=args.shard_size, batch_size=args.batch_size,
                              num_workers=args.num_workers, device=device, text_features=args.text_features,
                              max_bad_fraction=args.max_bad_fraction, progress=show_progress(args))
    if index is not None:
        print(json.dumps({"out": args.out, "num_images": index["num_images"], "num_augs": index["num_augs"],
                          "grid": index["grid"], "shards": len(index["shards"]), "kind": index["kind"]}, indent=2))
    return 0
