"""The quickstart: train and sample small models on the bundled emoji dataset.

`argen demo --out runs/demo` trains (or reuses) a small VQ tokenizer on the emoji training split,
extracts codes, computes MiniLM caption features, trains a class-conditional and a text-conditional
generator, samples a grid per class and for a few prompts, and writes OUT/report.md with the images,
the metrics and the loss curves. `--quick` (the default) fits in about 10 minutes on a 2-core CPU;
with a GPU it trains larger models for longer. Every stage reuses what an earlier run left in OUT.
"""

from __future__ import annotations

from argen.cli.common import add_progress_argument, nonneg_int, positive_int, show_progress


def add_arguments(parser):
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--quick", action="store_true", default=True,
                        help="the default: the CPU-sized run (a GPU automatically trains larger and longer)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--seed", type=nonneg_int, default=0)
    parser.add_argument("--tokenizer", default=None, help="use this trained tokenizer instead of training one")
    parser.add_argument("--c2i-steps", type=positive_int, default=None, help="override the c2i generator's steps")
    parser.add_argument("--t2i-steps", type=positive_int, default=None, help="override the t2i generator's steps")
    parser.add_argument("--tokenizer-steps", type=positive_int, default=None, help="override the tokenizer's steps")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="override the generators' batch size")
    parser.add_argument("--samples-per-class", type=positive_int, default=None, help="samples per class and per prompt")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="use only the first N training images for the generators (smoke tests)")
    add_progress_argument(parser)


def run(args):
    from argen.training.demo import DemoOptions, run_demo
    from argen.utils.io import run_lock

    with run_lock(args.out, "argen demo"):  # a second demo into the same OUT is refused
        run_demo(DemoOptions(out=args.out, device=args.device, seed=args.seed, tokenizer=args.tokenizer,
                             c2i_steps=args.c2i_steps, t2i_steps=args.t2i_steps,
                             tokenizer_steps=args.tokenizer_steps, batch_size=args.batch_size,
                             samples_per_class=args.samples_per_class, limit=args.limit,
                             progress=show_progress(args)))
    return 0
