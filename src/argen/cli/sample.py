"""Sample images from a tokenizer + generator checkpoint pair.

Class-conditional:  argen sample --tokenizer vq_ds16_c2i.pt --tokenizer-config VQ-16 \\
                      --gpt c2i_B_256.pt --gpt-config GPT-B --kind c2i --image-size 256 --classes 207,360
Text-conditional:   argen sample --tokenizer runs/demo/tokenizer --gpt runs/demo/gpt-t2i \\
                      --prompts "a red flag" "a smiley"      (or --prompts-file FILE, or --features PATH)

Contract:
- Exactly one condition source. c2i: --classes. t2i: --prompts or --prompts-file, encoded with
  --text-encoder as `argen serve` encodes them, or --features: an npz with `features` (B,L,D) and
  `mask` (B,L), or a folder written by `argen extract-text-features`. Every condition gives --n images,
  in order. A text encoder or feature set of the wrong width, or an npz of the wrong caption length,
  is refused, naming both; prompts longer than the caption length are cut, with a warning.
- Image i has its own generator, seeded from (--seed, i) by the rule `argen serve` uses for image i
  of a request, so image i does not depend on --batch-size (exactly so on the CPU in float32; other
  batch shapes on a GPU or in half precision may round differently).
- Each batch's PNGs, OUT/NNNNN_<tag>.png, are written as soon as the batch is decoded. OUT/grid.png
  (the first 64 images) and, with --save-codes, OUT/codes.npy ((B, N) int64) are written at the end.
  A failure part way says how many images were already written.
- Progress bars (token steps, decoded images) go to stderr, by default only when it is a terminal.
  Timings go to stdout. Bad input is an `ArgenError`, caught before the checkpoints load where possible.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from argen.cli.common import add_checkpoint_arguments, load_models
from argen.data.text_features import TextFeatureStore
from argen.engine import decode_codes, engine_for, generate
from argen.models.gpt import GPTConfig
from argen.sampling.logits import GUIDANCE_SCHEDULES, SamplingParams
from argen.sampling.seeds import image_seed
from argen.utils.errors import ArgenError
from argen.utils.images import make_grid, save_png
from argen.utils.io import atomic_save_npy

DEFAULTS = {"c2i": {"cfg_scale": 4.0, "top_k": 2000}, "t2i": {"cfg_scale": 7.5, "top_k": 1000}}
DEFAULT_TEXT_ENCODER = "minilm"
GRID_MAX = 64
TAG_CHARS = 40


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
    group.add_argument("--text-encoder", default=None,
                       help="with --prompts/--prompts-file: 'minilm' (default) or a local transformers folder "
                            "(e.g. flan-t5-xl), as for argen serve")
    group.add_argument("--n", type=int, default=1, help="images per class id, prompt or caption (default 1)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default 4.0 c2i, 7.5 t2i)")
    parser.add_argument("--cfg-interval", type=int, default=-1, help="guide only up to this token index (-1: all)")
    parser.add_argument("--cfg-schedule", choices=GUIDANCE_SCHEDULES, default="constant",
                        help="guidance scale over the tokens (default constant)")
    parser.add_argument("--cfg-power", type=float, default=1.0, help="exponent of the power schedule (default 1.0)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k filter, 0 disables (default 2000 c2i, 1000 t2i)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus filter in (0, 1] (default 1.0: off)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature > 0 (default 1.0)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed (default 0). Image i has its own generator seeded from (seed, i), so it "
                             "is the same whatever --batch-size is, and is seeded as image i of an argen serve "
                             "request with this seed")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward batch (default 32)")
    parser.add_argument("--out", default="samples", help="output directory (default ./samples)")
    parser.add_argument("--save-codes", action="store_true", help="also write OUT/codes.npy (B, N) int64")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars on stderr (default: only when stderr is a terminal)")


@dataclass
class Conditions:
    """The distinct conditions: a file-name tag for each and a loader of their model inputs."""

    tags: list[str]
    load: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor | None]]  # indices -> (cond, mask or None)


def parse_classes(text: str) -> torch.Tensor:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ArgenError(f"--classes must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise ArgenError("--classes is empty")
    return torch.tensor(ids, dtype=torch.long)


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """--prompts (none may be blank) or --prompts-file (blank lines skipped) -> stripped prompts."""
    if prompts is not None:
        blank = [i + 1 for i, p in enumerate(prompts) if not p.strip()]
        if blank:
            raise ArgenError(f"--prompts: prompt {blank[0]} is empty")
        return [p.strip() for p in prompts]
    name = "stdin" if prompts_file == "-" else prompts_file
    try:
        text = sys.stdin.read() if prompts_file == "-" else Path(prompts_file).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ArgenError(f"--prompts-file {name} is not UTF-8 text") from None
    except OSError as exc:
        raise ArgenError(f"cannot read --prompts-file {name}: {exc.strerror or exc}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ArgenError(f"--prompts-file {name} holds no prompts (one per line)")
    return lines


def slug(text: str) -> str:
    """A file-name tag for a prompt: lower-case ASCII words joined by '-', whole words up to TAG_CHARS."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if len(words) > TAG_CHARS:
        head = words[:TAG_CHARS + 1]
        words = head.rsplit("-", 1)[0] if "-" in head else words[:TAG_CHARS]
    return words or "prompt"


def _fits(what: str, width: int, config: GPTConfig, fix: str) -> None:
    if width != config.caption_dim:
        raise ArgenError(f"{what} are {width}-wide but the generator ({config.name}, t2i) takes "
                         f"{config.caption_dim}-wide caption features; {fix}")


def class_conditions(classes: torch.Tensor, gpt) -> Conditions:
    gpt.check_condition(classes)
    return Conditions([f"class{int(c)}" for c in classes], lambda rows: (classes[rows], None))


def prompt_conditions(prompts: list[str], gpt, encoder_name: str, device) -> Conditions:
    """Prompts encoded one batch at a time by the encoder `argen serve` uses (argen.serving.text).

    `prompt_encoder` refuses an encoder whose width is not the generator's caption width, naming both;
    the caption length always fits, since prompts are cut to it (a prompt that fills it is warned about).
    """
    from argen.serving.text import prompt_encoder

    config = gpt.config
    encode = prompt_encoder(gpt, encoder_name, device)
    warned: set[int] = set()

    def load(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        features, mask = encode([prompts[r] for r in rows])  # (b, L, D), (b, L) left padded to caption_len
        for row, full in zip(rows, mask[:, 0].bool().tolist(), strict=True):
            if full and row not in warned:
                warned.add(row)
                tqdm.write(f"argen sample: warning: prompt {row + 1} fills all {config.caption_len} caption tokens "
                           f"of the generator; any text past them is ignored", file=sys.stderr)
        return features, mask

    return Conditions([slug(p) for p in prompts], load)


def feature_conditions(path: str, config: GPTConfig) -> Conditions:
    """An `argen extract-text-features` folder (re-padded to the caption length) or a padded npz."""
    if Path(path).is_dir():
        store = TextFeatureStore(path)
        encoder = store.meta.get("encoder") or "unknown"
        _fits(f"caption features in {path} (encoder {encoder!r})", store.dim, config,
              "extract them with the text encoder the generator was trained with")
        longest = int(store.lengths.max()) if len(store) else 0
        if longest > config.caption_len:
            tqdm.write(f"argen sample: warning: captions in {path} have up to {longest} tokens; the generator reads "
                       f"the first {config.caption_len}", file=sys.stderr)
        texts = store.meta.get("texts") or [f"caption{i}" for i in range(len(store))]
        return Conditions([slug(t) for t in texts], lambda rows: store.get(rows, config.caption_len))
    features, mask = read_features(path)
    _fits(f"caption features in {path}", features.shape[2], config,
          "use features from the text encoder the generator was trained with")
    if features.shape[1] != config.caption_len:
        raise ArgenError(f"{path}: captions have {features.shape[1]} token slots but the generator ({config.name}, "
                         f"t2i) takes {config.caption_len}, left padded; pass an argen extract-text-features folder "
                         f"instead, which is padded to fit")
    return Conditions([f"caption{i}" for i in range(features.shape[0])], lambda rows: (features[rows], mask[rows]))


def read_features(path: str, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption features -> (features (B, L, D) float32, mask (B, L) float32), left padded.

    `path`: a folder written by `argen extract-text-features` (padded to `length`, by default the
    folder's max length), or an npz with `features` (B, L, D) and `mask` (B, L), taken as it is.
    """
    if Path(path).is_dir():
        store = TextFeatureStore(path)
        return store.get(range(len(store)), length or store.meta.get("max_length") or int(store.lengths.max()))
    try:
        with np.load(path) as data:
            missing = {"features", "mask"} - set(data.files)
            if missing:
                raise ArgenError(f"{path} lacks {sorted(missing)}; it needs `features` (B,L,D) and `mask` (B,L)")
            features, mask = data["features"], data["mask"]
    except (OSError, ValueError) as exc:
        raise ArgenError(f"cannot read caption features {path}: {exc}") from exc
    if features.ndim != 3 or mask.shape != features.shape[:2]:
        raise ArgenError(f"{path}: expected features (B,L,D) and mask (B,L), got {features.shape} and {mask.shape}")
    return torch.from_numpy(features.astype(np.float32)), torch.from_numpy(mask.astype(np.float32))


def sampling_params(args: argparse.Namespace, kind: str) -> SamplingParams:
    defaults = DEFAULTS[kind]
    return SamplingParams(cfg_scale=defaults["cfg_scale"] if args.cfg_scale is None else args.cfg_scale,
                          cfg_interval=args.cfg_interval, cfg_schedule=args.cfg_schedule, cfg_power=args.cfg_power,
                          temperature=args.temperature, top_p=args.top_p,
                          top_k=defaults["top_k"] if args.top_k is None else args.top_k)


def check_flags(args: argparse.Namespace) -> None:
    """Everything that can be checked before the checkpoints load."""
    if args.batch_size < 1:
        raise ArgenError("--batch-size must be >= 1")
    if args.n < 1:
        raise ArgenError("--n must be >= 1")
    if not 0 <= args.seed < 1 << 63:
        raise ArgenError(f"--seed must lie in [0, 2**63), got {args.seed}")
    if args.text_encoder is not None and args.prompts is None and args.prompts_file is None:
        raise ArgenError("--text-encoder applies only to --prompts and --prompts-file")
    sampling_params(args, "c2i")  # both kinds' defaults are valid, so this checks the given values


def build_conditions(args: argparse.Namespace, classes, prompts, gpt, device) -> Conditions:
    config = gpt.config
    given = "--features" if args.features else "--prompts" if args.prompts is not None else "--prompts-file"
    if config.kind == "c2i" and classes is None:
        raise ArgenError(f"this is a class-conditional generator ({config.name}, c2i): pass --classes, not {given}")
    if config.kind == "t2i" and classes is not None:
        raise ArgenError(f"this is a text-conditional generator ({config.name}, t2i): pass --prompts, --prompts-file "
                         f"or --features, not --classes")
    if classes is not None:
        return class_conditions(classes, gpt)
    if prompts is not None:
        return prompt_conditions(prompts, gpt, args.text_encoder or DEFAULT_TEXT_ENCODER, device)
    return feature_conditions(args.features, config)


def _write(path: Path, write: Callable[[Path], object]) -> None:
    try:
        write(path)
    except OSError as exc:
        raise ArgenError(f"cannot write {path}: {exc.strerror or exc}") from exc


def run(args: argparse.Namespace) -> int:
    check_flags(args)
    classes = parse_classes(args.classes) if args.classes is not None else None
    prompts = read_prompts(args.prompts, args.prompts_file) if args.features is None and classes is None else None
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArgenError(f"cannot create the output directory {out}: {exc.strerror or exc}") from exc
    tokenizer, gpt, device, _ = load_models(args)
    config = gpt.config
    conditions = build_conditions(args, classes, prompts, gpt, device)
    sampling = sampling_params(args, config.kind).to_dict()

    total = len(conditions.tags) * args.n
    which = [i // args.n for i in range(total)]  # image -> condition
    starts = range(0, total, args.batch_size)
    chunk = engine_for(gpt).max_batch  # generate() reports steps per chunk of up to this many images
    steps = sum(-(-min(args.batch_size, total - s) // chunk) for s in starts) * config.num_image_tokens
    hide = None if args.progress is None else not args.progress  # None: tqdm hides bars off a terminal
    grid = config.grid_size
    all_codes, shown = [], []
    written = 0
    sample_time = decode_time = 0.0
    try:
        with tqdm(total=steps, desc="sample", unit="step", disable=hide, file=sys.stderr, dynamic_ncols=True) as bar, \
                tqdm(total=total, desc="decode", unit="img", disable=hide, file=sys.stderr, dynamic_ncols=True) as dbar:
            for start in starts:
                stop = min(total, start + args.batch_size)
                cond, cond_mask = conditions.load(which[start:stop])
                gens = [torch.Generator(device=device).manual_seed(image_seed(args.seed, i))
                        for i in range(start, stop)]
                t0 = time.perf_counter()
                codes = generate(gpt, cond.to(device), None if cond_mask is None else cond_mask.to(device),
                                 row_generators=gens, progress=bar.update, **sampling).cpu()  # (b, N)
                t1 = time.perf_counter()
                images = decode_codes(tokenizer, codes.view(-1, grid, grid), chunk=stop - start)  # (b, H, W, 3)
                decode_time += time.perf_counter() - t1
                sample_time += t1 - t0
                for offset, image in enumerate(images):
                    i = start + offset
                    _write(out / f"{i:05d}_{conditions.tags[which[i]]}.png", lambda path, im=image: save_png(im, path))
                    written += 1
                    dbar.update(1)
                all_codes.append(codes)
                shown.extend(images[:max(0, GRID_MAX - len(shown))])
        _write(out / "grid.png", lambda path: save_png(make_grid(np.stack(shown)), path))
        if args.save_codes:
            _write(out / "codes.npy", lambda path: atomic_save_npy(path, torch.cat(all_codes).numpy().astype(np.int64)))
    except ArgenError as exc:
        if not written:
            raise
        raise ArgenError(f"{exc} ({written} of {total} images were written to {out}/ before this)") from exc
    except BaseException:
        if written:
            print(f"argen sample: {written} of {total} images had been written to {out}/", file=sys.stderr)
        raise
    print(f"sampled {total} images ({config.num_image_tokens} tokens each) in {sample_time:.2f} s "
          f"({total / max(sample_time, 1e-9):.2f} img/s); decoded in {decode_time:.2f} s; wrote {out}/")
    return 0
