"""Sample images from a tokenizer + generator checkpoint pair.

Class-conditional:  argen sample --tokenizer vq_ds16_c2i.pt --tokenizer-config VQ-16 \\
                      --gpt c2i_B_256.pt --gpt-config GPT-B --kind c2i --image-size 256 --classes 207,360
Text-conditional:   argen sample --tokenizer runs/demo/tokenizer --gpt runs/demo/gpt-t2i \\
                      --prompts "a red flag" "a smiley"      (or --prompts-file FILE, or --features PATH)

Contract:
- Exactly one condition source. c2i: --classes. t2i: --prompts or --prompts-file, encoded with
  --text-encoder as `argen serve` encodes them, or --features: an npz with `features` (B,L,D) and
  `mask` (B,L), or a folder written by `argen extract-text-features`; --rows START:STOP picks captions.
  Every condition gives --n images, in order. A text encoder or feature set of the wrong width, or an
  npz of the wrong caption length, is refused, naming both; prompts longer than the caption length
  are cut, with a warning.
- Image i has its own generator, seeded from (--seed, i) by the rule `argen serve` uses for image i
  of a request, so image i does not depend on --batch-size (exactly so on the CPU in float32; other
  batch shapes on a GPU or in half precision may round differently).
- Each batch's PNGs, OUT/NNNNN_<tag>.png, are written as soon as the batch is decoded. OUT/grid.png
  (the first 64 images) and, with --save-codes, OUT/codes.npy ((B, N) int64) are written at the end.
  A failure or Ctrl-C part way says how many images were already written.
- Progress bars (token steps, decoded images) go to stderr, by default only when it is a terminal.
  Timings go to stdout. Bad input is an `ArgenError` or an argparse error (exit 2), caught before the
  checkpoints load where possible. The loop itself is `argen.evaluation.pipeline.sample_to_folder`.
"""

from __future__ import annotations

import argparse

from argen.cli.common import (
    add_checkpoint_arguments,
    add_progress_argument,
    finite_float,
    int_range,
    load_models,
    nonneg_int,
    positive_float,
    positive_int,
    say_bundled_generator,
    show_progress,
    unit_interval,
    use_bundled_generator,
)

DEFAULT_TEXT_ENCODER = "minilm"
SEED = int_range(0, (1 << 63) - 1)


def add_sampling_arguments(parser: argparse.ArgumentParser, defaults: str) -> None:
    """The SamplingParams flags. Every default is None: the library fills it (`SamplingParams.for_kind`);
    `defaults` only words the help, e.g. "4.0 c2i, 7.5 t2i"."""
    scale, top_k = {"kind": ("4.0 c2i, 7.5 t2i", "2000 c2i, 1000 t2i"), "neutral": ("1.0: none", "0")}[defaults]
    parser.add_argument("--cfg-scale", type=finite_float, help=f"guidance scale in [0, 1e4] (default {scale})")
    parser.add_argument("--cfg-interval", type=int_range(-1, 1 << 31), help="guide only up to this token index "
                                                                            "(default -1: all)")
    parser.add_argument("--cfg-schedule", metavar="{constant,linear,power}",
                        help="guidance scale over the tokens (default constant)")
    parser.add_argument("--cfg-power", type=positive_float, help="exponent of the power schedule (default 1.0)")
    parser.add_argument("--top-k", type=nonneg_int, help=f"top-k filter, 0 disables (default {top_k})")
    parser.add_argument("--top-p", type=unit_interval, help="nucleus filter in (0, 1] (default 1.0: off)")
    parser.add_argument("--temperature", type=positive_float, help="softmax temperature > 0 (default 1.0)")


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    """--decode/--window/--tree: how tokens are decoded (`argen.generate`'s decode, window and tree)."""
    parser.add_argument("--decode", choices=("ar", "jacobi"), default="ar",
                        help="ar: one token per forward pass (default); jacobi: speculative Jacobi decoding, "
                             "several tokens per forward pass with the same distribution (other images per seed)")
    parser.add_argument("--window", type=positive_int, default=None,
                        help="with --decode jacobi: positions per forward pass (default "
                             "argen.engine.jacobi.DEFAULT_WINDOW)")
    parser.add_argument("--tree", default=None, metavar="KxD[xG]",
                        help="with --decode jacobi: a draft tree, K candidates for each of the first G unverified "
                             "tokens (default every one), each followed by D tokens, verified in the same forward "
                             "pass (e.g. 4x2: fewer forward passes, more tokens per pass; same distribution; "
                             "pays where a forward's cost is flat in its tokens, i.e. on a GPU: slower on a CPU)")


def decode_options(args: argparse.Namespace) -> dict:
    """The --decode/--window/--tree flags -> generate's keywords; --window or --tree without --decode
    jacobi is an error."""
    from argen.engine.jacobi import check_decode, check_tree
    from argen.utils.errors import ArgenError

    for flag, value in (("--window", args.window), ("--tree", args.tree)):
        if value is not None and args.decode != "jacobi":
            raise ArgenError(f"{flag} applies only to --decode jacobi")
    return dict(decode=args.decode, window=check_decode(args.decode, args.window),
                tree=check_tree(args.decode, args.tree))


def sampling_params(args: argparse.Namespace, kind: str | None, gpt=None):
    """The flags -> SamplingParams: unset flags from `gpt`'s own recommended settings when given
    (`SamplingParams.for_model`), else from the kind's; kind None takes the neutral field defaults."""
    from argen.sampling.logits import SamplingParams

    given = dict(cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval, cfg_schedule=args.cfg_schedule,
                 cfg_power=args.cfg_power, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if gpt is not None:
        return SamplingParams.for_model(gpt, **given)
    return SamplingParams.for_kind(kind, **given)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    group = parser.add_argument_group("condition (exactly one of --classes, --prompts, --prompts-file, --features)")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--classes", help="c2i: comma-separated class ids, e.g. 207,360,387")
    source.add_argument("--prompts", nargs="+", metavar="PROMPT",
                        help='t2i: one or more prompts, each quoted: --prompts "a red flag" "a smiley"')
    source.add_argument("--prompts-file", metavar="FILE",
                        help="t2i: UTF-8 text file with one prompt per line (blank lines skipped); - reads stdin")
    source.add_argument("--features", metavar="PATH",
                        help="t2i: precomputed caption features: a folder written by argen extract-text-features, "
                             "or an npz with `features` (B,L,D) and `mask` (B,L) left padded to the caption length")
    group.add_argument("--rows", metavar="START:STOP", default=None,
                       help="with --features: sample only these caption rows, e.g. 0:8 (default all)")
    group.add_argument("--text-encoder", default=None,
                       help="with --prompts/--prompts-file: 'minilm' (default) or a local transformers folder "
                            "(e.g. flan-t5-xl), as for argen serve")
    group.add_argument("--n", type=positive_int, default=1, help="images per class id, prompt or caption (default 1)")
    add_sampling_arguments(parser, "kind")
    add_decode_arguments(parser)
    parser.add_argument("--seed", type=SEED, default=0,
                        help="random seed in [0, 2**63) (default 0). Image i has its own generator seeded from "
                             "(seed, i), so it is the same whatever --batch-size is, and is seeded as image i of an "
                             "argen serve request with this seed")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per forward batch (default 32)")
    parser.add_argument("--out", default="samples", help="output directory (default ./samples)")
    parser.add_argument("--save-codes", action="store_true", help="also write OUT/codes.npy (B, N) int64")
    add_progress_argument(parser)


def load_with_conditions(args: argparse.Namespace, classes, prompts, features=None, rows=None):
    """The tokenizer, the generator (the bundled one, said so, when --gpt is not given) and the conditions:
    class ids, prompts (encoded with --text-encoder for a t2i model) or caption features."""
    from argen.evaluation.pipeline import build_conditions

    bundled = use_bundled_generator(args, "c2i" if classes is not None else "t2i")
    tokenizer, gpt, device, _ = load_models(args)
    if bundled:
        say_bundled_generator(args.gpt, gpt, classes)
    encode = None
    if prompts is not None and gpt.config.kind == "t2i":
        from argen.serving.text import prompt_encoder

        encode = prompt_encoder(gpt, args.text_encoder or DEFAULT_TEXT_ENCODER, device)
    return tokenizer, gpt, build_conditions(gpt, classes, prompts, features, encode, rows)


def run(args: argparse.Namespace) -> int:
    from argen.data.caption_files import parse_rows
    from argen.evaluation.pipeline import parse_classes, read_prompts, sample_to_folder
    from argen.utils.errors import ArgenError

    if args.text_encoder is not None and args.prompts is None and args.prompts_file is None:
        raise ArgenError("--text-encoder applies only to --prompts and --prompts-file")
    if args.rows is not None and args.features is None:
        raise ArgenError("--rows applies only to --features")
    sampling_params(args, "c2i")  # both kinds' defaults are valid, so this checks the given values
    decoding = decode_options(args)
    classes = parse_classes(args.classes) if args.classes is not None else None
    prompts = read_prompts(args.prompts, args.prompts_file) if args.features is None and classes is None else None
    rows = None if args.rows is None else (lambda count: parse_rows(args.rows, count))
    tokenizer, gpt, conditions = load_with_conditions(args, classes, prompts, args.features, rows)
    done = sample_to_folder(tokenizer, gpt, conditions, sampling_params(args, gpt.config.kind, gpt), args.out, n=args.n,
                            seed=args.seed, batch_size=args.batch_size, save_codes=args.save_codes,
                            progress=show_progress(args), **decoding)
    print(f"sampled {done.total} images ({gpt.config.num_image_tokens} tokens each) in {done.generate_s:.2f} s "
          f"({done.total / max(done.generate_s, 1e-9):.2f} img/s); decoded in {done.decode_s:.2f} s; wrote {done.out}/")
    return 0
