"""The quickstart: train and sample small models on the bundled emoji dataset.

`argen demo --out runs/demo` encodes the emoji training split with the small VQ tokenizer bundled with
argen (or trains one first: `--train-tokenizer`), computes MiniLM caption features, trains a
class-conditional and a text-conditional generator, samples a grid per class and for a few prompts,
scores the samples with the bundled classifier, and writes OUT/report.md with the images, the scores
and the loss curves. `--quick` (the default) takes about 7 minutes on a 2-core CPU (4 more with
`--train-tokenizer`); with a GPU it trains larger models for longer. Every stage reuses what an earlier
run left in OUT.
"""

from __future__ import annotations

from argen.cli.common import add_progress_argument, nonneg_int, positive_int, show_progress


def add_arguments(parser):
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--quick", action="store_true", default=True,
                        help="the default: the CPU-sized run (a GPU automatically trains larger and longer)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--seed", type=nonneg_int, default=0)
    parser.add_argument("--tokenizer", default=None, help="use this trained tokenizer instead of the bundled one")
    parser.add_argument("--train-tokenizer", action="store_true",
                        help="train the tokenizer in OUT/tokenizer first (about 4 more minutes on 2 CPU cores)")
    parser.add_argument("--c2i-steps", type=positive_int, default=None, help="override the c2i generator's steps")
    parser.add_argument("--t2i-steps", type=positive_int, default=None, help="override the t2i generator's steps")
    parser.add_argument("--tokenizer-steps", type=positive_int, default=None,
                        help="override the tokenizer's steps (with --train-tokenizer)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="override the generators' batch size")
    parser.add_argument("--samples-per-class", type=positive_int, default=None, help="samples per class and per prompt")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="use only the first N training images for the generators (smoke tests)")
    add_progress_argument(parser)


def run(args):
    from argen.training.demo import DemoOptions, run_demo
    from argen.utils.errors import ArgenError
    from argen.utils.io import run_lock

    if args.tokenizer and args.train_tokenizer:
        raise ArgenError("--tokenizer and --train-tokenizer exclude each other")
    if args.tokenizer_steps and not args.train_tokenizer:
        raise ArgenError("--tokenizer-steps needs --train-tokenizer (the bundled tokenizer is already trained)")

    with run_lock(args.out, "argen demo"):  # a second demo into the same OUT is refused
        run_demo(DemoOptions(out=args.out, device=args.device, seed=args.seed, tokenizer=args.tokenizer,
                             train_tokenizer=args.train_tokenizer, c2i_steps=args.c2i_steps, t2i_steps=args.t2i_steps,
                             tokenizer_steps=args.tokenizer_steps, batch_size=args.batch_size,
                             samples_per_class=args.samples_per_class, limit=args.limit,
                             progress=show_progress(args)))
    return 0
