"""Pieces shared by the subcommands: numeric flag types, the progress-bar rule, checkpoint flags.

This module is imported while the parser is built, so it must stay light: no torch (or other heavy
package) at module level. Heavy imports happen inside the functions that need them.

Numeric types (use as `type=` in `add_argument`): each one parses the text, refuses nan and inf, checks
its range, and on a bad value raises `argparse.ArgumentTypeError`, so argparse prints
`argen CMD: error: argument --flag: ...` and exits 2 without a traceback.

    positive_int   int >= 1            nonneg_int      int >= 0
    positive_float finite > 0          nonneg_float    finite >= 0
    finite_float   any finite float    unit_interval   (0, 1]
    probability    [0, 1)              fraction        [0, 1]
    int_range(lo, hi) / float_range(lo, hi): closed ranges

Progress rule (one for all commands): `add_progress_argument(parser)` adds `--progress/--no-progress`;
`show_progress(args)` is True when `--progress` was given, False with `--no-progress` (or the deprecated
`--quiet` where a command keeps it), and otherwise True only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

QUANTIZE_CHOICES = ("none", "int8")  # as argen.checkpoint.loading.QUANTIZE_CHOICES (no torch import here)
CPU_KERNELS = ("aten", "packed")  # as argen.checkpoint.loading.CPU_KERNELS


def _parse(text: str, kind: type) -> int | float:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _check(text: str, kind: type, ok: Callable[[int | float], bool], what: str) -> int | float:
    value = _parse(text, kind)
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _check(text, int, lambda v: v >= 1, "an integer >= 1")


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    return _check(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _check(text, float, lambda v: v > 0, "a finite number > 0")


def nonneg_float(text: str) -> float:
    """A finite number >= 0."""
    return _check(text, float, lambda v: v >= 0, "a finite number >= 0")


def finite_float(text: str) -> float:
    """Any finite number (nan and inf are refused)."""
    return _parse(text, float)


def unit_interval(text: str) -> float:
    """A number in (0, 1]."""
    return _check(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def probability(text: str) -> float:
    """A number in [0, 1)."""
    return _check(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    return _check(text, float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def int_range(low: int, high: int) -> Callable[[str], int]:
    """A type for integers in [low, high]."""

    def parse(text: str) -> int:
        return _check(text, int, lambda v: low <= v <= high, f"an integer in {low}..{high}")

    parse.__name__ = f"int_range_{low}_{high}"
    return parse


def float_range(low: float, high: float) -> Callable[[str], float]:
    """A type for finite numbers in [low, high]."""

    def parse(text: str) -> float:
        return _check(text, float, lambda v: low <= v <= high, f"a number in [{low:g}, {high:g}]")

    parse.__name__ = f"float_range_{low:g}_{high:g}"
    return parse


NUMERIC_TYPES = (positive_int, nonneg_int, positive_float, nonneg_float, finite_float, unit_interval, probability,
                 fraction)


def add_progress_argument(parser: argparse.ArgumentParser, quiet_alias: bool = False) -> None:
    """Add `--progress/--no-progress` (default: bars only when stderr is a terminal).

    `quiet_alias=True` also keeps `--quiet` as a deprecated spelling of `--no-progress`."""
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show progress bars (default: only when stderr is a terminal)")
    if quiet_alias:
        parser.add_argument("--quiet", dest="progress", action="store_false",
                            help="deprecated spelling of --no-progress")


def show_progress(args: argparse.Namespace | bool | None) -> bool:
    """The one progress rule: the flag if given, else whether stderr is a terminal."""
    choice = getattr(args, "progress", None) if isinstance(args, argparse.Namespace) else args
    if choice is not None:
        return bool(choice)
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoints (the bracketed config flags are needed only for released files)")
    group.add_argument("--tokenizer", default=None,
                       help="tokenizer: argen dir or .safetensors, released .pt, released name (vq_ds16_c2i) or "
                            "hf://owner/repo/file; may be left out with a released generator name")
    group.add_argument("--tokenizer-config", default=None, help="named tokenizer config for released files, e.g. VQ-16")
    group.add_argument("--gpt", default=None,
                       help="generator: argen dir or .safetensors, released .pt, released name (c2i_B_256, "
                            "t2i_XL_stage1_256; the name sets the config flags), hf://owner/repo/file, or a model "
                            "bundled with argen: demo-c2i or demo-t2i (the default, by the kind of condition)")
    group.add_argument("--gpt-config", default=None, help="named generator config for released files, e.g. GPT-B")
    group.add_argument("--kind", choices=["c2i", "t2i"], default=None, help="generator kind for released files")
    group.add_argument("--image-size", type=positive_int, default=None, help="generated image size, e.g. 256, 384, 512")
    group.add_argument("--downsample", type=positive_int, default=None, help="tokenizer downsample factor (16 or 8)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    group.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16")
    group.add_argument("--lora", action="append", default=None, metavar="[NAME=]DIR[:SCALE]",
                       help="a LoRA adapter trained on --gpt (argen train --lora-rank; DIR may be hf://owner/repo), "
                            "its update scaled by SCALE (default 1); repeatable. sample: merged into the weights at "
                            "load time; serve: served side by side with the base, unmerged, as BASE:NAME (NAME "
                            "defaults to the folder's name)")
    group.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                       help="generator weights: none (default) or int8 (per-channel int8 weights of the transformer "
                            "blocks' linear layers, activations in --dtype; faster decoding on a CPU, less memory)")
    group.add_argument("--cpu-kernels", choices=CPU_KERNELS, default="aten",
                       help="CPU linear kernels: aten (default; torch's own) or packed (weights reordered once for "
                            "oneDNN: about 2x faster matrix multiplies when decoding on a CPU, a second copy of the "
                            "weights in memory; sampled tokens may differ from aten's, rarely)")


def use_bundled_generator(args: argparse.Namespace, kind: str) -> bool:
    """With no --gpt, pick the generator bundled with argen for `kind` (and its tokenizer, unless
    --tokenizer is given); True when it did."""
    if args.gpt is not None:
        return False
    from argen.checkpoint.bundled import default_generator

    args.gpt = default_generator(kind)
    return True


def say_bundled_generator(name: str, gpt, classes=None) -> None:
    """Tell the user which bundled generator a command used, and what its class ids (any iterable of
    ints, e.g. a LongTensor) stand for."""
    from argen.checkpoint.hub import gpt_class_names

    cfg = gpt.config
    what = f"{cfg.num_classes} emoji categories" if cfg.kind == "c2i" else "emoji captions (MiniLM features)"
    print(f"no --gpt given: using {name}, the {cfg.kind} generator bundled with argen ({cfg.name}, {what}, "
          f"{cfg.image_size} px; --gpt picks another)")
    names = gpt_class_names(name, cfg.num_classes) if cfg.kind == "c2i" else None
    ids = [] if classes is None else [int(c) for c in classes]
    if names and ids:
        shown = ", ".join(f"{c} = {names[c]}" for c in dict.fromkeys(ids) if 0 <= c < len(names))
        print(f"classes: {shown} (all: {', '.join(f'{i} {n}' for i, n in enumerate(names))})")


def load_models(args: argparse.Namespace):
    """Load (tokenizer, gpt, device, dtype) from the shared checkpoint flags."""
    import torch

    from argen.checkpoint import load_gpt, load_tokenizer
    from argen.utils.errors import ArgenError
    from argen.utils.torch_utils import parse_device, parse_dtype

    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype)
    if dtype == torch.float16 and device.type == "cpu":
        raise ArgenError("fp16 is not supported on the CPU; use fp32 or bf16")
    import difflib
    from pathlib import Path

    from argen.checkpoint.bundled import BUNDLED
    from argen.checkpoint.hub import default_tokenizer, is_hub_reference, released_gpt_flags
    from argen.checkpoint.released import RELEASED_REPOS

    for what, ref in (("generator", args.gpt), ("tokenizer", args.tokenizer)):
        if ref is not None and not is_hub_reference(ref) and not Path(ref).exists() and ref not in BUNDLED:
            close = difflib.get_close_matches(Path(ref).name.removesuffix(".pt"), [*RELEASED_REPOS, *BUNDLED], n=3)
            hint = f" (names close to it: {', '.join(close)})" if close else ""
            raise ArgenError(f"{what} checkpoint {ref} does not exist{hint}")
    released_gpt_flags(args.gpt, args.gpt_config, args.kind, args.image_size, args.downsample)  # before downloads
    tokenizer_ref = args.tokenizer or default_tokenizer(args.gpt)
    if tokenizer_ref is None:
        raise ArgenError("--tokenizer is required (it may be left out only with a released generator name, "
                         "e.g. --gpt c2i_B_256)")
    tokenizer = load_tokenizer(tokenizer_ref, config=args.tokenizer_config, device=device, dtype=dtype)
    downsample = args.downsample
    if downsample is None and args.gpt_config is not None:
        downsample = tokenizer.downsample
    gpt = load_gpt(args.gpt, config=args.gpt_config, kind=args.kind, image_size=args.image_size,
                   downsample=downsample, device=device, dtype=dtype, quantize=args.quantize,
                   lora=getattr(args, "lora", None), adapters=getattr(args, "adapters", None),
                   cpu_kernels=args.cpu_kernels)
    if gpt.config.downsample != tokenizer.downsample:
        raise ArgenError(f"the generator expects downsample {gpt.config.downsample} but the tokenizer has "
                         f"{tokenizer.downsample}")
    if gpt.config.vocab_size != tokenizer.config.codebook_size:
        raise ArgenError(f"the generator's vocabulary ({gpt.config.vocab_size}) differs from the tokenizer's "
                         f"codebook ({tokenizer.config.codebook_size})")
    return tokenizer, gpt, device, dtype
