"""`edit`: regenerate the masked part of images, keeping the rest token for token (inpainting).

Contract:
- Each image is centre-cropped and resized to the generator's size (`fit_image`); its kept tokens
  are the tokenizer's codes of that image (`encode_images`: one image per encoder call, so an image's
  codes never depend on the others). The pixel mask (True = edit, the input image's size) is rounded to
  the token grid by `token_mask`: a token is regenerated when any pixel it covers is masked.
- The generator runs with `forced_tokens`: kept positions are given (fed, never sampled), the others are
  sampled from the condition `cond`, which may differ from the image's own (conditional editing: draw
  a cat's body under a dog's head). A regenerated token draws the uniform that plain sampling draws at
  that position, so a mask of everything gives `argen.generate`'s image for the same generators, and an
  image's result depends only on its own image, mask, condition, settings and generator.
- A mask that keeps every token samples nothing: the result is the tokenizer's round trip of the
  input and `EditResult.kept_everything` says so.
- Images and conditions broadcast: one image (and mask) with B conditions gives B edits of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from argen.editing.masks import check_mask, fit_image, pixel_mask, token_mask
from argen.engine import decode_codes, generate
from argen.models.gpt import GPT
from argen.models.tokenizer import VQModel
from argen.sampling.logits import SamplingParams
from argen.utils.errors import ArgenError
from argen.utils.images import from_uint8

ImageLike = Image.Image | np.ndarray


@dataclass
class EditResult:
    images: np.ndarray  # (B, S, S, 3) uint8 edited images
    codes: torch.Tensor  # (B, N) int64 on the CPU: the kept tokens plus the regenerated ones
    token_mask: torch.Tensor  # (B, g, g) bool, True = regenerated: the mask that was used
    inputs: np.ndarray  # (B, S, S, 3) uint8: the inputs as cropped and resized to the generator's size
    downsample: int

    @property
    def pixel_mask(self) -> np.ndarray:
        """(B, S, S) bool: the token mask at the generator's resolution."""
        return pixel_mask(self.token_mask, self.downsample)

    @property
    def kept_everything(self) -> bool:
        return not bool(self.token_mask.any())

    @property
    def regenerated(self) -> list[int]:
        """Tokens regenerated per image."""
        return [int(m.sum()) for m in self.token_mask]


@torch.no_grad()
def encode_images(tokenizer: VQModel, images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, H/p, W/p) int64 codes on the CPU, one image per encoder call."""
    device = next(tokenizer.parameters()).device
    return torch.cat([tokenizer.encode(from_uint8(image[None]).to(device)).cpu() for image in images])


def forced_tokens(codes: torch.Tensor, regenerate: torch.Tensor) -> torch.Tensor:
    """(B, h, w) codes, (B, h, w) bool -> (B, h * w) int64: the code where kept, -1 where regenerated."""
    return torch.where(regenerate, -1, codes).flatten(1).long()


def _as_list(items, what: str) -> list:
    if isinstance(items, (list, tuple)):
        return list(items)
    if isinstance(items, np.ndarray) and items.ndim == (4 if what == "images" else 3):
        return list(items)
    return [items]


def _broadcast(items: list, batch: int, what: str) -> list:
    if len(items) == batch:
        return items
    if len(items) == 1:
        return items * batch
    raise ArgenError(f"{len(items)} {what} for {batch} conditions; give one or {batch}")


@torch.no_grad()
def edit(gpt: GPT, tokenizer: VQModel, images: ImageLike | Sequence[ImageLike], mask: np.ndarray | Sequence,
         cond: torch.Tensor, cond_mask: torch.Tensor | None = None, *, params: SamplingParams | None = None,
         generator: torch.Generator | None = None, row_generators: Sequence[torch.Generator] | None = None,
         progress: Callable[[int], None] | None = None, decode: str = "ar",
         window: int | None = None) -> EditResult:
    """Regenerate the masked tokens of `images` under `cond` -> EditResult.

    images: a PIL image or (H, W, 3) uint8 array, or a list / (B, H, W, 3) array of them. mask: (H, W)
    bool per image (True = edit), the size of its image, one for all or one per image. cond: (B,) class
    ids or (B, L, D) caption features (+ cond_mask), as for `argen.generate`; params, generator,
    row_generators, progress, decode and window are `argen.generate`'s.
    """
    cfg = gpt.config
    gpt.check_condition(cond, cond_mask)
    batch = cond.shape[0]
    pictures = _broadcast(_as_list(images, "images"), batch, "images")
    masks = _broadcast(_as_list(mask, "masks"), batch, "masks")
    grid, size = cfg.grid_size, cfg.image_size
    if tokenizer.downsample != cfg.downsample:
        raise ArgenError(f"the tokenizer's downsample ({tokenizer.downsample}) is not the generator's "
                         f"({cfg.downsample})")
    regenerate, fitted = [], []
    for picture, pixels in zip(pictures, masks):
        rgb = np.asarray(picture.convert("RGB")) if isinstance(picture, Image.Image) else np.asarray(picture)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ArgenError(f"images must be (H, W, 3), got {rgb.shape}")
        regenerate.append(token_mask(check_mask(pixels, rgb.shape[0], rgb.shape[1]), grid))
        fitted.append(fit_image(rgb, size))
    inputs = np.stack(fitted)  # (B, S, S, 3)
    regenerate = torch.stack(regenerate)  # (B, g, g)
    codes = encode_images(tokenizer, inputs)  # (B, g, g)
    if regenerate.any():
        device = gpt.tok_embeddings.weight.device
        forced = forced_tokens(codes, regenerate).to(device)
        codes = generate(gpt, cond.to(device), None if cond_mask is None else cond_mask.to(device), params=params,
                         generator=generator, row_generators=row_generators, progress=progress, decode=decode,
                         window=window, forced_tokens=forced).cpu().view(batch, grid, grid)
    pictures_out = decode_codes(tokenizer, codes)
    return EditResult(pictures_out, codes.flatten(1), regenerate, inputs, cfg.downsample)
