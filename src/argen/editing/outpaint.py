"""`extend`: outpainting past the image's right or bottom edge (or left, through a mirror) with a
sliding window over the token grid.

Contract:
- The image is resized so that its short side is the generator's size S and each side is cropped
  (centred) to a whole number of tokens; that canvas is encoded in one tokenizer call. The extension,
  in pixels of that canvas, is rounded up to whole tokens (p = the tokenizer's downsample).
- Windows of the generator's grid (g x g tokens) slide over the grown token canvas with a stride of
  `stride` tokens (default g // 2), top to bottom, left to right; a window with tokens still unknown
  runs the generator with every known token of the window forced (kept) and samples the rest, which
  then count as known. So each new window keeps the tokens it overlaps, and a 256 px model extends a
  256x256 image into a 256x768 panorama. The whole canvas is decoded at once (no seam from tiling
  the decoder).
- "left" mirrors the image, extends it to the right and mirrors the result back. This is sound for
  generators trained with horizontal flips (LlamaGen's and argen's recipes flip): a mirrored image
  is as likely as the original.
- "up" is refused: a raster-order model generates each row after the rows above it, so new rows on
  top could not see the image below them, and a vertical mirror is not an image the models were
  trained on (no vertical flips). Extend down from a crop instead, or inpaint.
- Image b of the result draws from row_generators[b] (or `generator`) window after window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from argen.editing.edit import encode_images, forced_tokens
from argen.editing.masks import as_rgb, pixel_mask
from argen.engine import decode_codes, generate
from argen.models.gpt import GPT
from argen.models.tokenizer import VQModel
from argen.sampling.logits import SamplingParams
from argen.utils.errors import ArgenError

SIDES = ("right", "down", "left")


@dataclass
class ExtendResult:
    images: np.ndarray  # (B, H', W', 3) uint8: the extended images
    codes: torch.Tensor  # (B, h', w') int64 on the CPU: the token canvas decoded (for left: of the mirror image)
    generated: torch.Tensor  # (h', w') bool: True where the tokens were sampled
    canvas: np.ndarray  # (H, W, 3) uint8: the input as resized and cropped to whole tokens
    windows: int  # generator calls (windows with something to sample)
    downsample: int

    @property
    def pixel_mask(self) -> np.ndarray:
        return pixel_mask(self.generated, self.downsample)


def check_side(side: str, amount: int) -> None:
    if side == "up":
        raise ArgenError("extending up is not supported: a raster-order model generates top to bottom, so rows "
                         "added above could not see the image below them, and the models are not trained on "
                         "vertically flipped images; extend down from a crop, or inpaint with a mask")
    if side not in SIDES:
        raise ArgenError(f"the side to extend must be one of {', '.join(SIDES)}, got {side!r}")
    if int(amount) <= 0:
        raise ArgenError(f"the extension must be a positive number of pixels, got {amount}")


def fit_canvas(image: Image.Image | np.ndarray, size: int, downsample: int) -> np.ndarray:
    """Short side -> `size`, each side centre-cropped to a multiple of `downsample` -> (H, W, 3) uint8."""
    picture = Image.fromarray(as_rgb(image))
    scale = size / min(picture.size)
    width, height = (max(size, round(x * scale)) for x in picture.size)
    if (width, height) != picture.size:
        picture = picture.resize((width, height), resample=Image.Resampling.BICUBIC)
    crop_w, crop_h = width - width % downsample, height - height % downsample
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return np.array(picture.crop((left, top, left + crop_w, top + crop_h)))


def window_starts(length: int, grid: int, stride: int) -> list[int]:
    """Start offsets of windows of `grid` covering [0, length) with `stride`, the last one flush."""
    starts = list(range(0, length - grid + 1, stride))
    if starts[-1] != length - grid:
        starts.append(length - grid)
    return starts


@torch.no_grad()
def extend(gpt: GPT, tokenizer: VQModel, image: Image.Image | np.ndarray, side: str, amount: int,
           cond: torch.Tensor, cond_mask: torch.Tensor | None = None, *, params: SamplingParams | None = None,
           generator: torch.Generator | None = None, row_generators: Sequence[torch.Generator] | None = None,
           stride: int | None = None, progress: Callable[[int], None] | None = None) -> ExtendResult:
    """Extend one image by `amount` pixels on `side`, once per condition in `cond` (B results)."""
    check_side(side, amount)
    cfg = gpt.config
    gpt.check_condition(cond, cond_mask)
    grid, p = cfg.grid_size, cfg.downsample
    stride = grid // 2 if stride is None else int(stride)
    if not 1 <= stride <= grid:
        raise ArgenError(f"the window stride must lie in [1, {grid}] tokens, got {stride}")
    canvas = fit_canvas(image, cfg.image_size, p)
    if side == "left":
        canvas = canvas[:, ::-1].copy()
    batch = cond.shape[0]
    known_codes = encode_images(tokenizer, canvas[None])[0]  # (h, w)
    extra = math.ceil(int(amount) / p)
    h, w = known_codes.shape
    grow_h, grow_w = (h, w + extra) if side in ("right", "left") else (h + extra, w)
    codes = torch.zeros(batch, grow_h, grow_w, dtype=torch.long)
    codes[:, :h, :w] = known_codes
    known = torch.zeros(grow_h, grow_w, dtype=torch.bool)
    known[:h, :w] = True
    generated = ~known
    device = gpt.tok_embeddings.weight.device
    cond, cond_mask = cond.to(device), None if cond_mask is None else cond_mask.to(device)
    windows = 0
    for top in window_starts(grow_h, grid, stride):
        for left in window_starts(grow_w, grid, stride):
            view = (slice(top, top + grid), slice(left, left + grid))
            if known[view].all():
                continue
            todo = (~known[view]).expand(batch, grid, grid)
            forced = forced_tokens(codes[(slice(None), *view)], todo).to(device)
            out = generate(gpt, cond, cond_mask, params=params, generator=generator, row_generators=row_generators,
                           progress=progress, forced_tokens=forced).cpu()
            codes[(slice(None), *view)] = out.view(batch, grid, grid)
            known[view] = True
            windows += 1
    images = decode_codes(tokenizer, codes)  # (B, H', W', 3): the whole canvas in one decoder call
    if side == "left":
        images, generated = images[:, :, ::-1].copy(), generated.flip(-1)
        canvas = canvas[:, ::-1].copy()
    return ExtendResult(images, codes, generated, canvas, windows, p)
