"""Evaluate a tokenizer: PSNR, SSIM, LPIPS, codebook usage and rFID on a dataset split.

Example: argen eval-tokenizer --tokenizer runs/vq-demo --data demo --split val --out runs/vq-demo/eval
Writes OUT/metrics.json (psnr, ssim, codebook_usage as a fraction, lpips when VGG16 weights are available,
rfid with --inception) and OUT/reconstructions.png (rows of originals, each above its reconstructions).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from argen.cli.common import add_progress_argument, fraction, positive_int, show_progress

log = logging.getLogger("argen.evaluation")


def add_arguments(parser):
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory or file")
    parser.add_argument("--tokenizer-config", default=None, help="named config, needed for released (.pt) files")
    parser.add_argument("--data", default="demo", help="'demo', a class folder, a .jsonl manifest or .tar shards")
    parser.add_argument("--split", default="val", help="train, val or all (default val)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--image-size", type=positive_int, default=None, help="default: 64 for demo, else 256")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--max-images", type=positive_int, default=None, help="evaluate only the first N images")
    parser.add_argument("--vgg-weights", default="auto",
                        help="VGG16 trunk for LPIPS: file, 'download', 'auto' (torch hub cache if present) or 'none'")
    parser.add_argument("--lpips-heads", default=None, help="LPIPS linear-head file (default: the lpips package's)")
    parser.add_argument("--inception", default=None, help="FID Inception weights file or 'random': adds rFID")
    parser.add_argument("--grid", type=positive_int, default=16, help="images in the side-by-side PNG")
    parser.add_argument("--max-bad-fraction", type=fraction, default=0.05,
                        help="stop when more than this fraction of the images cannot be read (default 0.05)")
    parser.add_argument("--device", default="auto")
    add_progress_argument(parser)


def _inception(spec, device):
    if spec is None:
        return None
    try:
        from argen.models.inception import build_inception
    except ImportError:
        log.warning("the FID module is not available; rFID is skipped")
        return None
    return build_inception(spec).to(device).eval()


def run(args):
    from argen.checkpoint import load_tokenizer
    from argen.data.datasets import open_dataset
    from argen.evaluation.recon_metrics import evaluate_tokenizer, side_by_side
    from argen.models.lpips import LPIPS, resolve_vgg_weights
    from argen.utils.errors import ArgenError
    from argen.utils.io import atomic_write, atomic_write_json
    from argen.utils.torch_utils import parse_device

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = parse_device(args.device)
    model = load_tokenizer(args.tokenizer, config=args.tokenizer_config, device=device)
    dataset = open_dataset(args.data, args.split)
    size = args.image_size or (64 if args.data == "demo" else 256)
    vgg = resolve_vgg_weights(args.vgg_weights)
    lpips = LPIPS(vgg, args.lpips_heads).to(device) if vgg is not None else None
    if lpips is None:
        log.warning("no VGG16 weights (pass --vgg-weights FILE or 'download'); LPIPS is not reported")
    metrics, originals, reconstructions = evaluate_tokenizer(
        model, dataset, size, args.batch_size, lpips=lpips, inception=_inception(args.inception, device),
        device=device, max_images=args.max_images, grid_count=args.grid, max_bad_fraction=args.max_bad_fraction,
        progress=show_progress(args))
    metrics.update({"tokenizer": str(args.tokenizer), "data": str(args.data), "split": args.split})
    if args.inception == "random":
        metrics["rfid_note"] = "random Inception weights: the rFID value is only a smoke test"
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ArgenError(f"--out {out} exists and is not a directory")
    atomic_write_json(out / "metrics.json", metrics)
    from PIL import Image

    grid = Image.fromarray(side_by_side(originals, reconstructions))
    atomic_write(out / "reconstructions.png", lambda tmp: grid.save(tmp, format="PNG"))
    print(json.dumps(metrics, indent=2))
    return 0
