"""`edit_to_folder`: the `argen edit` pipeline below the CLI: one input image, a mask (or an extension),
conditions -> edited PNGs and a side-by-side.

Contract:
- `EditTarget`: what to change: `mask` ((H, W) bool at the input's size, True = edit: from a mask PNG,
  `argen.editing.masks.mask_from_image`, or a box, `box_mask`) or `extend` ((side, pixels)).
  `parse_box("x0,y0,x1,y1")` and `parse_extend("right:256")` read the CLI's spellings.
- Image i (the n images of condition 0 first, then condition 1, ...) draws from its own generator
  seeded with `argen.sampling.image_seed(seed, i)`, the rule of `argen sample`: with a mask of
  everything, image i is `argen sample`'s image i for the same seed, conditions and settings.
- Writes OUT/NNNNN_<tag>.png (the edited images, at the generator's resolution), OUT/input.png (the
  input as cropped and resized), OUT/mask.png (the mask that was used, rounded to whole tokens; white =
  regenerated) and OUT/side_by_side.png (input, the input with the regenerated pixels tinted magenta,
  results in one row). Returns an `EditSummary`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from argen.editing.edit import edit
from argen.editing.outpaint import check_side, extend
from argen.evaluation.pipeline import Conditions
from argen.models.gpt import GPT
from argen.models.tokenizer import VQModel
from argen.sampling.logits import SamplingParams
from argen.sampling.seeds import image_seed
from argen.utils.errors import ArgenError
from argen.utils.images import save_png, side_by_side
from argen.utils.io import make_output_dir


@dataclass
class EditTarget:
    mask: np.ndarray | None = None  # (H, W) bool, True = edit
    extend: tuple[str, int] | None = None  # (side, pixels)


@dataclass
class EditSummary:
    total: int
    regenerated: int  # tokens sampled per image
    tokens: int  # tokens per image
    kept_everything: bool
    seconds: float
    out: Path


def parse_box(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise ArgenError(f"--box takes four integers x0,y0,x1,y1 (pixels, x1 and y1 exclusive), got {text!r}")
    return values


def parse_extend(text: str) -> tuple[str, int]:
    side, _, amount = text.partition(":")
    try:
        pixels = int(amount)
    except ValueError:
        raise ArgenError(f"--extend takes SIDE:PIXELS, e.g. right:256, got {text!r}") from None
    check_side(side, pixels)
    return side, pixels


def _mask_picture(mask: np.ndarray) -> np.ndarray:
    return np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=-1)


def _overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the edited pixels tinted magenta (the side-by-side's picture of the mask)."""
    tinted = image.astype(np.float32)
    tinted[mask] = 0.45 * tinted[mask] + 0.55 * np.array([230, 0, 160], np.float32)
    return tinted.round().astype(np.uint8)


def edit_to_folder(tokenizer: VQModel, gpt: GPT, image: Image.Image, target: EditTarget, conditions: Conditions,
                   params: SamplingParams, out: str | Path, *, n: int = 1, seed: int = 0,
                   stride: int | None = None, progress=None) -> EditSummary:
    """Edit (or extend) `image` n times per condition, write the PNGs and the side-by-side."""
    out = make_output_dir(out)
    total = len(conditions.tags) * n
    which = [i // n for i in range(total)]
    cond, cond_mask = conditions.load(which)
    device = gpt.tok_embeddings.weight.device
    gens = [torch.Generator(device=device).manual_seed(image_seed(seed, i)) for i in range(total)]
    started = time.perf_counter()
    if target.extend is not None:
        side, pixels = target.extend
        result = extend(gpt, tokenizer, image, side, pixels, cond, cond_mask, params=params, row_generators=gens,
                        stride=stride, progress=progress)
        canvas = np.full_like(result.images[0], 128)
        h, w = result.canvas.shape[:2]
        if side == "left":
            canvas[:h, -w:] = result.canvas
        else:
            canvas[:h, :w] = result.canvas
        shown, used, images = canvas, result.pixel_mask, result.images
        regenerated, tokens, kept = int(result.generated.sum()), result.generated.numel(), False
    else:
        result = edit(gpt, tokenizer, image, target.mask, cond, cond_mask, params=params, row_generators=gens,
                      progress=progress)
        shown, used, images = result.inputs[0], result.pixel_mask[0], result.images
        regenerated, tokens, kept = result.regenerated[0], gpt.config.num_image_tokens, result.kept_everything
    seconds = time.perf_counter() - started
    for i, picture in enumerate(images):
        save_png(picture, out / f"{i:05d}_{conditions.tags[which[i]]}.png")
    save_png(shown, out / "input.png")
    save_png(_mask_picture(used), out / "mask.png")
    save_png(side_by_side([shown, _overlay(shown, used), *images]), out / "side_by_side.png")
    return EditSummary(total, regenerated, tokens, kept, seconds, out)
