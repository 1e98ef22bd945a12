"""The sampling pipeline below the CLI: conditions -> per-image seed -> generate -> decode -> images.

`argen sample` (`sample_to_folder`) and `argen sample-batch` (`argen.evaluation.sample_batch`) both run
through `sample_images`; the CLI only maps flags to these calls.

Contract:
- Conditions: `Conditions(tags, load)` holds one file-name tag per distinct condition and a loader
  rows -> (cond, mask or None). Built by `class_conditions` (c2i: ids checked against the model),
  `prompt_conditions` (t2i: prompts through an `encode` callable, e.g. `argen.serving.text.prompt_encoder`,
  warning once per prompt that fills the caption length) and `feature_conditions` (an
  `argen extract-text-features` folder, re-padded to the caption length, or a padded npz; `rows` picks
  captions, tags keep their row number). `build_conditions` checks the condition fits the model's kind.
  `parse_classes("207,360")` refuses empty items (`1,,2`); `read_prompts` reads --prompts/--prompts-file.
- Seeds: image i of a run with seed s draws from its own generator seeded with
  `argen.sampling.image_seed(s, i)` (the rule `argen serve` uses), so it does not depend on the batch.
- `sample_images(tokenizer, gpt, cond, mask, params, seeds, ...)`: one batch -> `SampledBatch` with codes
  (b, N) int64 on the CPU and images (b, H', W', 3) uint8 (decoded, optionally resized to `size` with
  `resize_images`, then `argen.utils.images.to_uint8`), and the generate/decode seconds.
- Progress: `TokenProgress` counts token steps per batch (N per batch, whatever chunking the engine
  does inside: extra per-chunk calls past N are not counted), so the bar total is batches x N.
- `sample_to_folder(...)` writes OUT/NNNNN_<tag>.png as each batch is decoded, then OUT/grid.png (first 64)
  and with `save_codes` OUT/codes.npy ((B, N) int64). A failure part way raises an `ArgenError` that says
  how many PNGs were written; Ctrl-C raises `SamplingInterrupted` (a KeyboardInterrupt) whose message
  gives that count too.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from argen.data.caption_files import read_npz_features
from argen.data.text_features import TextFeatureStore
from argen.engine import decode_codes, generate
from argen.models.gpt import GPT, GPTConfig
from argen.models.tokenizer import VQModel
from argen.sampling.logits import SamplingParams
from argen.sampling.seeds import image_seed
from argen.utils.errors import ArgenError
from argen.utils.images import make_grid, save_png
from argen.utils.io import atomic_save_npy, make_output_dir

GRID_MAX = 64
TAG_CHARS = 40
RESIZE_MODES = ("bicubic-antialias", "bicubic")


class SamplingInterrupted(KeyboardInterrupt):
    """Ctrl-C during sampling; the message says how many images were already written."""


@dataclass
class Conditions:
    """The distinct conditions: a file-name tag for each and a loader of their model inputs."""

    tags: list[str]
    load: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor | None]]  # indices -> (cond, mask or None)


def parse_classes(text: str) -> torch.Tensor:
    """`"207, 360"` -> LongTensor (2,); empty items (`1,,2`, a trailing comma) are refused."""
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise ArgenError("--classes is empty")
    if not all(parts):
        raise ArgenError(f"--classes has an empty item in {text!r}; give comma-separated class ids like 1,2")
    try:
        ids = [int(part) for part in parts]
    except ValueError:
        raise ArgenError(f"--classes must be comma-separated integers, got {text!r}") from None
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


def _warn(message: str) -> None:
    tqdm.write(f"argen sample: warning: {message}", file=sys.stderr)


def class_conditions(classes: torch.Tensor, gpt: GPT) -> Conditions:
    gpt.check_condition(classes)
    return Conditions([f"class{int(c)}" for c in classes], lambda rows: (classes[rows], None))


def prompt_conditions(prompts: list[str], gpt: GPT,
                      encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]) -> Conditions:
    """Prompts encoded one batch at a time by `encode` (prompts -> features, mask left padded to caption_len)."""
    config = gpt.config
    warned: set[int] = set()

    def load(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        features, mask = encode([prompts[r] for r in rows])  # (b, L, D), (b, L) left padded to caption_len
        for row, full in zip(rows, mask[:, 0].bool().tolist(), strict=True):
            if full and row not in warned:
                warned.add(row)
                _warn(f"prompt {row + 1} fills all {config.caption_len} caption tokens of the generator; any text "
                      f"past them is ignored")
        return features, mask

    return Conditions([slug(p) for p in prompts], load)


def feature_conditions(path: str, config: GPTConfig, rows: Callable[[int], list[int]] | None = None) -> Conditions:
    """An `argen extract-text-features` folder (re-padded to the caption length) or a padded npz.

    `rows(count)` -> the row indices to sample (default all); tags are `caption<row>` or the caption's slug."""
    if Path(path).is_dir():
        store = TextFeatureStore(path)
        encoder = store.meta.get("encoder") or "unknown"
        _fits(f"caption features in {path} (encoder {encoder!r})", store.dim, config,
              "extract them with the text encoder the generator was trained with")
        chosen = rows(len(store)) if rows else list(range(len(store)))
        longest = int(store.lengths[chosen].max()) if chosen else 0
        if longest > config.caption_len:
            _warn(f"captions in {path} have up to {longest} tokens; the generator reads the first {config.caption_len}")
        texts = store.meta.get("texts") or [f"caption{i}" for i in range(len(store))]
        return Conditions([slug(texts[r]) for r in chosen],
                          lambda picked: store.get([chosen[p] for p in picked], config.caption_len))
    features, mask = read_npz_features(path)
    _fits(f"caption features in {path}", features.shape[2], config,
          "use features from the text encoder the generator was trained with")
    if features.shape[1] != config.caption_len:
        raise ArgenError(f"{path}: captions have {features.shape[1]} token slots but the generator ({config.name}, "
                         f"t2i) takes {config.caption_len}, left padded; pass an argen extract-text-features folder "
                         f"instead, which is padded to fit")
    chosen = rows(features.shape[0]) if rows else list(range(features.shape[0]))
    features, mask = features[chosen], mask[chosen]
    return Conditions([f"caption{r}" for r in chosen], lambda picked: (features[picked], mask[picked]))


def build_conditions(gpt: GPT, classes: torch.Tensor | None = None, prompts: list[str] | None = None,
                     features: str | None = None, encode: Callable | None = None,
                     rows: Callable[[int], list[int]] | None = None) -> Conditions:
    """The one given condition source, checked against the generator's kind."""
    config = gpt.config
    given = "--features" if features else "--prompts" if prompts is not None else "--classes"
    if config.kind == "c2i" and classes is None:
        raise ArgenError(f"this is a class-conditional generator ({config.name}, c2i): pass --classes, not {given}")
    if config.kind == "t2i" and classes is not None:
        raise ArgenError(f"this is a text-conditional generator ({config.name}, t2i): pass --prompts, --prompts-file "
                         f"or --features, not --classes")
    if classes is not None:
        return class_conditions(classes, gpt)
    if prompts is not None:
        if encode is None:
            raise ArgenError("prompts need a text encoder")
        return prompt_conditions(prompts, gpt, encode)
    return feature_conditions(features, config, rows)


def resize_images(images: torch.Tensor, size: int | None, mode: str) -> torch.Tensor:
    """(B, 3, H, W) float -> (B, 3, size, size) float (unchanged when size is None or already the size)."""
    if size is None or images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False,
                         antialias=mode == "bicubic-antialias")


class TokenProgress:
    """A progress callback for `generate` that counts at most `num_tokens` steps per batch."""

    def __init__(self, update: Callable[[int], object], num_tokens: int):
        self.update, self.num_tokens, self.steps = update, num_tokens, 0

    def start_batch(self) -> Callable[[int], None]:
        self.steps = 0
        return self

    def __call__(self, count: int) -> None:
        step = min(count, self.num_tokens - self.steps)
        if step > 0:
            self.steps += step
            self.update(step)


@dataclass
class SampledBatch:
    codes: torch.Tensor  # (b, N) int64, CPU
    images: np.ndarray  # (b, H', W', 3) uint8
    generate_s: float
    decode_s: float


@torch.no_grad()  # not inference_mode: the engine's cached buffers outlive this call
def sample_images(tokenizer: VQModel, gpt: GPT, cond: torch.Tensor, cond_mask: torch.Tensor | None,
                  params: SamplingParams, seeds: Sequence[int], progress: Callable[[int], None] | None = None,
                  size: int | None = None, resize: str = "bicubic-antialias", decode: str = "ar",
                  window: int | None = None, tree=None) -> SampledBatch:
    """One batch: image j draws from its own generator seeded with seeds[j]; generate, decode, uint8.
    decode/window/tree: `argen.generate`'s ("jacobi": speculative Jacobi decoding, with a draft tree)."""
    device = gpt.tok_embeddings.weight.device
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    t0 = time.perf_counter()
    codes = generate(gpt, cond.to(device), None if cond_mask is None else cond_mask.to(device), params=params,
                     row_generators=gens, progress=progress, decode=decode, window=window,
                     tree=tree).cpu()  # (b, N)
    t1 = time.perf_counter()
    grid = gpt.config.grid_size
    resize_fn = None if size is None or size == gpt.config.image_size else \
        (lambda decoded: resize_images(decoded, size, resize))
    images = decode_codes(tokenizer, codes.view(-1, grid, grid), resize=resize_fn)  # (b, size, size, 3)
    return SampledBatch(codes, images, t1 - t0, time.perf_counter() - t1)


@dataclass
class SampleSummary:
    total: int
    written: int
    generate_s: float
    decode_s: float
    out: Path


def _write(path: Path, write: Callable[[Path], object]) -> None:
    try:
        write(path)
    except OSError as exc:
        raise ArgenError(f"cannot write {path}: {exc.strerror or exc}") from exc


def sample_to_folder(tokenizer: VQModel, gpt: GPT, conditions: Conditions, params: SamplingParams, out: str | Path,
                     *, n: int = 1, seed: int = 0, batch_size: int = 32, save_codes: bool = False,
                     progress: bool = False, decode: str = "ar", window: int | None = None,
                     tree=None) -> SampleSummary:
    """`--n` images per condition, in order, image i seeded with image_seed(seed, i); PNGs as they come."""
    if n < 1 or batch_size < 1:
        raise ArgenError("n and batch_size must be >= 1")
    out = make_output_dir(out)
    total = len(conditions.tags) * n
    which = [i // n for i in range(total)]  # image -> condition
    starts = range(0, total, batch_size)
    num_tokens = gpt.config.num_image_tokens
    all_codes, shown = [], []
    summary = SampleSummary(total, 0, 0.0, 0.0, out)

    def so_far() -> str:
        return f"{summary.written} of {total} images were written to {out}/"

    bars = dict(disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        with tqdm(total=len(starts) * num_tokens, desc="sample", unit="step", **bars) as bar, \
                tqdm(total=total, desc="decode", unit="img", **bars) as dbar:
            steps = TokenProgress(bar.update, num_tokens)
            for start in starts:
                stop = min(total, start + batch_size)
                cond, cond_mask = conditions.load(which[start:stop])
                batch = sample_images(tokenizer, gpt, cond, cond_mask, params,
                                      [image_seed(seed, i) for i in range(start, stop)], steps.start_batch(),
                                      decode=decode, window=window, tree=tree)
                summary.generate_s += batch.generate_s
                summary.decode_s += batch.decode_s
                for offset, image in enumerate(batch.images):
                    i = start + offset
                    _write(out / f"{i:05d}_{conditions.tags[which[i]]}.png", lambda path, im=image: save_png(im, path))
                    summary.written += 1
                    dbar.update(1)
                all_codes.append(batch.codes)
                shown.extend(batch.images[:max(0, GRID_MAX - len(shown))])
        _write(out / "grid.png", lambda path: save_png(make_grid(np.stack(shown)), path))
        if save_codes:
            _write(out / "codes.npy", lambda path: atomic_save_npy(path, torch.cat(all_codes).numpy().astype(np.int64)))
    except ArgenError as exc:
        if not summary.written:
            raise
        raise ArgenError(f"{exc} ({so_far()} before this)") from exc
    except KeyboardInterrupt as exc:
        raise SamplingInterrupted(f"interrupted; {so_far()}") from exc
    except Exception as exc:  # a bug or a device error keeps its traceback, with the count as a note
        exc.add_note(so_far())
        raise
    return summary
