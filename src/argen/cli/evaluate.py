"""FID, sFID, IS, precision and recall of a sample batch against a reference batch (ADM protocol).

  argen evaluate VIRTUAL_imagenet256_labeled.npz samples.npz \\
      --inception pt_inception-2015-12-05-6726825d.pth --out results.json

Both npz files hold `arr_0` = uint8 (N, H, W, 3) images of one size. `--inception random` uses fixed random
weights (for tests; the JSON then says so and the numbers are not FIDs). Statistics are cached next to
each npz, keyed by the file's hash and the network's weights.
"""

from __future__ import annotations

import argparse
import json
import sys

from argen.cli.common import add_progress_argument, positive_int, show_progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reference", help="reference batch npz (e.g. VIRTUAL_imagenet256_labeled.npz), or `demo` "
                                          "for the packaged 64x64 demo images")
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
    add_progress_argument(parser, quiet_alias=True)


def run(args: argparse.Namespace) -> int:
    from argen.evaluation.evaluate import RANDOM_WARNING, evaluate
    from argen.models.inception import build_inception
    from argen.utils.io import atomic_write_json
    from argen.utils.torch_utils import parse_device

    device = parse_device(args.device)
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
    if args.out:
        atomic_write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("fid", "sfid", "inception_score", "precision", "recall",
                                              "num_reference", "num_samples")}, indent=2))
    return 0
