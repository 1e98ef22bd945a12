"""Images and masks for editing: reading, fitting to the generator, and rounding masks to the token grid.

Contract:
- `read_image(source)`: a path or bytes -> PIL image (its alpha kept); an unreadable file is an `ArgenError`.
- `fit_image(image, size)`: RGB, centre-cropped to a square and resized to `size` (the evaluation recipe
  `argen.data.transforms.center_crop`) -> (size, size, 3) uint8. An image already `size` square is unchanged.
- `mask_from_image(mask)`: a mask picture -> (H, W) bool, True = edited. With an alpha channel (RGBA, LA,
  or a palette with transparency), fully transparent pixels (alpha 0) are edited, as in OpenAI's images
  API; without one, white pixels (grey level >= 128) are edited.
- `box_mask(height, width, box)`: (x0, y0, x1, y1) in pixels, x1 and y1 exclusive -> (H, W) bool; a box
  that is empty or reaches outside the image is an `ArgenError`.
- `token_mask(mask, grid)`: (H, W) bool pixels -> (grid, grid) bool tokens. The mask is centre-cropped
  to the square the image is cropped to, that square is cut into grid x grid cells (adaptive max
  pooling: cell i spans pixels floor(i * side / grid) to ceil((i + 1) * side / grid)), and a token is
  regenerated when ANY pixel of its cell is masked. So a mask never shrinks: the edited region is the
  mask grown to whole tokens.
- `pixel_mask(tokens, downsample)`: the token mask back at the generator's resolution (what was used).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from argen.data.transforms import center_crop
from argen.utils.errors import ArgenError


def read_image(source: str | Path | bytes, what: str = "image") -> Image.Image:
    """Open an image file (or its bytes); an unreadable or non-image file is an ArgenError naming it."""
    name = "the uploaded file" if isinstance(source, bytes) else str(source)
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        detail = "not an image PIL can read" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise ArgenError(f"cannot read the {what} {name}: {detail}") from None
    return image


def as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """PIL image or (H, W, 3) uint8 array -> (H, W, 3) uint8 (alpha dropped)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ArgenError(f"images must be (H, W, 3) uint8, got {array.shape} {array.dtype}")
    return array


def fit_image(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square and resize to `size` -> (size, size, 3) uint8."""
    return np.array(center_crop(Image.fromarray(as_rgb(image)), size).convert("RGB"))


def mask_from_image(mask: Image.Image) -> np.ndarray:
    """A mask picture -> (H, W) bool, True where edited (alpha 0; else white when it has no alpha)."""
    if mask.mode == "P" and "transparency" in mask.info:
        mask = mask.convert("RGBA")
    if mask.mode in ("RGBA", "LA", "PA"):
        return np.asarray(mask.getchannel("A")) == 0
    return np.asarray(mask.convert("L")) >= 128


def image_alpha_mask(image: Image.Image) -> np.ndarray | None:
    """The image's own transparent pixels as a mask (OpenAI's rule when no mask is sent), or None."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return mask_from_image(image)
    return None


def box_mask(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """(x0, y0, x1, y1), x1/y1 exclusive -> (H, W) bool with the box True."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ArgenError(f"the box {x0},{y0},{x1},{y1} is not a non-empty box inside the {width}x{height} image "
                         f"(need 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height})")
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def check_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != (height, width):
        raise ArgenError(f"the mask is {mask.shape[1] if mask.ndim > 1 else '?'}x{mask.shape[0]} but the image is "
                         f"{width}x{height}; they must be the same size")
    return mask.astype(bool)


def token_mask(mask: np.ndarray, grid: int) -> torch.Tensor:
    """(H, W) bool pixels -> (grid, grid) bool: a token is regenerated when any pixel of its cell is."""
    height, width = mask.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = torch.from_numpy(np.ascontiguousarray(mask[top:top + side, left:left + side])).float()
    return F.adaptive_max_pool2d(square[None, None], grid)[0, 0] > 0


def pixel_mask(tokens: torch.Tensor, downsample: int) -> np.ndarray:
    """(..., h, w) bool tokens -> (..., h * p, w * p) bool pixels."""
    return tokens.repeat_interleave(downsample, -2).repeat_interleave(downsample, -1).cpu().numpy()
