"""FID, sFID, IS, precision and recall of a sample batch against a reference batch (ADM protocol).

  argen evaluate VIRTUAL_imagenet256_labeled.npz samples.npz \\
      --inception pt_inception-2015-12-05-6726825d.pth --out results.json

Both npz files hold `arr_0` = uint8 (N, H, W, 3) images of one size; the reference may also be a folder of
images (COCO val2014, say), center-cropped to the samples' size as argen's eval transform does.
`--inception random` uses fixed random weights (for tests; the JSON then says so and the numbers are not
FIDs). Statistics are cached next to each npz (or folder), keyed by its content and the network's weights.

Text-to-image: `--clip DIR` (a local transformers CLIP folder) adds the CLIP score (torchmetrics'
CLIPScore: mean of max(100 x cosine, 0)) of each image against its prompt: --prompts FILE (one per line,
or COCO captions JSON, image i <-> prompt i), or by default OUT/prompts.json of `argen sample-batch
--captions`. The results record the CLIP model's identity (name, path, weights sha256).
"""

from __future__ import annotations

import argparse
import json
import sys

from argen.cli.common import add_progress_argument, positive_int, show_progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reference", help="reference batch npz (e.g. VIRTUAL_imagenet256_labeled.npz), a folder of "
                                          "images (e.g. COCO val2014; read with pillow and center-cropped to the "
                                          "samples' size), or `demo` for the packaged 64x64 demo images")
    parser.add_argument("samples", help="sample batch npz (arr_0: uint8 N x H x W x 3)")
    parser.add_argument("--inception", required=True,
                        help="path to pt_inception-2015-12-05-6726825d.pth, `download` (fetch it once into "
                             "~/.cache/argen, sha256-checked; needs network) or `random` (tests only)")
    parser.add_argument("--out", default=None, help="write the results JSON here (default: print only)")
    parser.add_argument("--batch-size", type=positive_int, default=50, help="images per Inception batch (default 50)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write cached statistics")
    parser.add_argument("--pr-block-size", type=positive_int, default=10000,
                        help="rows/columns per distance block for precision/recall (default 10000)")
    parser.add_argument("--reference-limit", type=positive_int, default=None,
                        help="use only the first N reference images (quick runs; ignores precomputed mu/sigma)")
    parser.add_argument("--ignore-reference-stats", action="store_true",
                        help="compute the reference mu/sigma with argen's network even if the npz carries them")
    parser.add_argument("--fid-method", choices=["sqrtm", "eigh"], default="sqrtm",
                        help="matrix square root: sqrtm (scipy, as ADM; default) or eigh (faster, same value to ~1e-9)")
    parser.add_argument("--clip", default=None, metavar="DIR",
                        help="also compute the CLIP score with this local CLIP folder (e.g. a download of "
                             "openai/clip-vit-large-patch14)")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="with --clip: the prompt of every sample (default: prompts.json beside the samples)")
    add_progress_argument(parser, quiet_alias=True)


def run(args: argparse.Namespace) -> int:
    from argen.evaluation.evaluate import RANDOM_WARNING, evaluate
    from argen.models.inception import build_inception
    from argen.utils.errors import ArgenError
    from argen.utils.io import atomic_write_json
    from argen.utils.torch_utils import parse_device

    if args.prompts is not None and args.clip is None:
        raise ArgenError("--prompts applies only to --clip")
    device = parse_device(args.device)
    clip = prompts = None
    if args.clip is not None:  # bad CLIP weights or prompts fail before the long Inception pass
        from argen.evaluation.clip_score import read_prompts_for
        from argen.evaluation.npz import ImageBatchFile
        from argen.models.clip import load_clip

        batch = ImageBatchFile(args.samples, "sample batch")
        prompts = read_prompts_for(batch, args.prompts)
        if len(prompts) != batch.count:
            raise ArgenError(f"{args.samples} holds {batch.count} images but {len(prompts)} prompts were given; "
                             f"CLIP score pairs image i with prompt i")
        clip = load_clip(args.clip, device)
    inception = build_inception(args.inception).to(device)
    if inception.is_random:
        print(f"argen evaluate: {RANDOM_WARNING}", file=sys.stderr)
    elif not inception.matches_published:
        print(f"argen evaluate: warning: {args.inception} loads but its sha256 ({inception.sha256[:16]}...) is not "
              f"that of the published file (6726825d...)", file=sys.stderr)
    result = evaluate(args.reference, args.samples, inception, batch_size=args.batch_size,
                      use_cache=not args.no_cache, pr_block_size=args.pr_block_size, progress=show_progress(args),
                      fid_method=args.fid_method, reference_limit=args.reference_limit,
                      use_reference_stats=not args.ignore_reference_stats)
    if clip is not None:
        from argen.evaluation.clip_score import clip_score

        result.update(clip_score(batch, prompts, clip, batch_size=args.batch_size, progress=show_progress(args)))
    if args.out:
        atomic_write_json(args.out, result)
    keys = ("fid", "sfid", "inception_score", "precision", "recall", "num_reference", "num_samples")
    print(json.dumps({k: result[k] for k in keys + (("clip_score",) if clip is not None else ())}, indent=2))
    return 0
