"""Score tar shards with a local CLIP (image-text similarity) and LAION's aesthetic head into sidecars.

Example: argen score-shards --data 'shards/{00000..00127}.tar' --clip models/clip-vit-large-patch14 \\
    --aesthetic models/sa_0_4_vit_l_14_linear.pth
Writes one sidecar per shard (<shard>.scores.json next to it, or in --out) with `similarity` (cosine of the
image and first-caption CLIP embeddings) and `AESTHETIC_SCORE` per sample; `--filter` then reads them as if
they were the samples' metadata (sidecar fields override metadata fields of the same name; rename them with
--similarity-field / --aesthetic-field). Resumable per shard; under torchrun each rank takes every
WORLD_SIZE-th shard. Nothing is downloaded: --clip is a folder saved by transformers.
"""

from __future__ import annotations

import json
import re

from argen.cli.common import add_progress_argument, positive_int, show_progress

_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def add_arguments(parser):
    parser.add_argument("--data", required=True, help="tar shards (a brace pattern, a .tar, a folder, a list file)")
    parser.add_argument("--clip", required=True, help="local CLIP folder (transformers CLIPModel + CLIPProcessor)")
    parser.add_argument("--aesthetic", default=None,
                        help="LAION's linear aesthetic head (sa_0_4_vit_l_14_linear.pth; needs CLIP ViT-L/14)")
    parser.add_argument("--out", default=None, help="sidecar folder (default: next to each shard); read it back "
                                                    "with the shard option ?sidecars=DIR")
    parser.add_argument("--similarity-field", default="similarity", help="field name of the CLIP similarity")
    parser.add_argument("--aesthetic-field", default="AESTHETIC_SCORE", help="field name of the aesthetic score")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--device", default="auto")
    add_progress_argument(parser)


def run(args):
    import logging

    from argen.data.extract import dist_env
    from argen.data.scoring import score_shards
    from argen.data.shards import ShardDataset, is_shard_spec
    from argen.models.clip import load_aesthetic_head, load_clip
    from argen.utils.errors import ArgenError
    from argen.utils.io import run_lock
    from argen.utils.torch_utils import parse_device

    for flag, name in (("--similarity-field", args.similarity_field), ("--aesthetic-field", args.aesthetic_field)):
        if not _FIELD.match(name):
            raise ArgenError(f"{flag} {name!r} is not a field name a filter can read ([A-Za-z_][A-Za-z0-9_.]*)")
    if args.similarity_field == args.aesthetic_field:
        raise ArgenError("--similarity-field and --aesthetic-field must differ")
    if not is_shard_spec(args.data):
        raise ArgenError(f"--data {args.data!r}: score-shards reads .tar shards only")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rank = dist_env()[0]
    dataset = ShardDataset(args.data)
    device = parse_device(args.device)
    clip = load_clip(args.clip, device)
    head, head_identity = (load_aesthetic_head(args.aesthetic, clip.dim) if args.aesthetic else (None, None))
    lock = args.out or str(dataset.shards[0].parent)
    with run_lock(lock, "argen score-shards", rank):
        summary = score_shards(dataset, clip, head, head_identity, out=args.out, batch_size=args.batch_size,
                               similarity_field=args.similarity_field, aesthetic_field=args.aesthetic_field,
                               progress=show_progress(args))
    if summary is not None:
        print(json.dumps(summary, indent=2))
    return 0
