"""Image tensor <-> uint8 conversion, PNG writing, grids and side-by-side rows.

Model images are float in [-1, 1], (B, 3, H, W). Conversion to uint8 clamps, maps to [0, 255] and
rounds to nearest, matching torchvision's `save_image(normalize=True, value_range=(-1, 1))`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from argen.utils.io import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8."""
    scaled = (images.detach().float().clamp(-1, 1) + 1) * 127.5
    return (scaled + 0.5).floor().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    pixels = np.array(images, order="C")  # a writable copy: PIL's arrays are read-only, which torch warns about
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def make_grid(images: np.ndarray, cols: int | None = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """(B, H, W, 3) uint8 -> one (rows*H', cols*W', 3) uint8 grid image."""
    count, height, width, _ = images.shape
    cols = cols or max(1, math.ceil(math.sqrt(count)))
    rows = math.ceil(count / cols)
    grid = np.full((rows * (height + pad) + pad, cols * (width + pad) + pad, 3), fill, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        grid[top:top + height, left:left + width] = image
    return grid


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write one (H, W, 3) uint8 image atomically."""
    return atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def side_by_side(images: list[np.ndarray], pad: int = 2, fill: int = 255) -> np.ndarray:
    """(H_i, W_i, 3) uint8 images of any sizes -> one row, top-aligned, `pad` px of `fill` around each."""
    height = max(image.shape[0] for image in images) + 2 * pad
    width = sum(image.shape[1] + pad for image in images) + pad
    row = np.full((height, width, 3), fill, dtype=np.uint8)
    left = pad
    for image in images:
        row[pad:pad + image.shape[0], left:left + image.shape[1]] = image
        left += image.shape[1] + pad
    return row
