"""Precompute caption features with a text encoder (MiniLM offline by default, or a local FLAN-T5).

Example: argen extract-text-features --data captions.jsonl --encoder minilm --out runs/text-minilm
Every caption of the manifest (in order; an image with several captions gets several rows) is encoded to
per-token features, stored unpadded in fp16 with their lengths (see argen.data.text_features). Row ids in
meta.json are the image index of each caption; with --data demo the captions come from the emoji names.
With tar shards (--data 'shards/{00000..00127}.tar') the job resumes per shard and splits the shards
between torchrun ranks (see argen.data.extract).
"""

from __future__ import annotations

import json
import logging

from argen.cli.common import add_progress_argument, fraction, positive_int, show_progress


def add_arguments(parser):
    parser.add_argument("--data", required=True, help="a .jsonl manifest, .tar shards or 'demo'")
    parser.add_argument("--split", default="train", help="train, val or all (default train, as extract-codes); "
                        "use the same --split as extract-codes")
    parser.add_argument("--filter", default=None, metavar="EXPR",
                        help="tar shards: keep only samples whose JSON metadata (and score sidecar) passes EXPR, "
                             "e.g. \"min(width, height) >= 256 and similarity >= 0.28\" (see docs/data.md); give "
                             "extract-text-features and extract-codes the same filter")
    parser.add_argument("--encoder", default="minilm", help="'minilm' or a local model folder (e.g. flan-t5-xl)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--max-length", type=positive_int, default=None,
                        help="tokens kept per caption (default: the encoder's, 120)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--max-bad-fraction", type=fraction, default=0.05,
                        help="tar shards: stop when more than this fraction of samples has no caption")
    parser.add_argument("--device", default="auto")
    add_progress_argument(parser)


def run(args):
    from argen.data.datasets import open_dataset
    from argen.data.extract import dist_env, extract_text_features
    from argen.data.filters import SampleFilter
    from argen.data.text_encoders import DEFAULT_MAX_LENGTH, load_text_encoder
    from argen.utils.io import run_lock
    from argen.utils.torch_utils import parse_device

    sample_filter = SampleFilter.parse(args.filter)  # a bad filter fails before anything loads
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = parse_device(args.device)
    with run_lock(args.out, "argen extract-text-features", dist_env()[0]):  # it resumes: one writer per rank
        dataset = open_dataset(args.data, args.split, sample_filter=sample_filter)
        max_length = args.max_length or DEFAULT_MAX_LENGTH
        encoder = load_text_encoder(args.encoder, device=device, max_length=max_length)
        encoder.batch_size = args.batch_size
        summary = extract_text_features(encoder, dataset, args.out, batch_size=args.batch_size,
                                        progress=show_progress(args), max_bad_fraction=args.max_bad_fraction)
    if summary is not None:
        print(json.dumps({"out": args.out, **summary}, indent=2))
    return 0
