"""Image transforms for tokenizer training, evaluation and code extraction (PIL in, tensors out).

Contract (all randomness comes from an explicit `torch.Generator`):
- `center_crop(image, size)`: the ADM/LlamaGen eval recipe: halve with BOX filtering while the short side
  is >= 2 * size, resize the short side to `size` with BICUBIC, then crop the center size x size.
- `random_crop(image, size, generator, min_frac=0.8, max_frac=1.0)`: resize the short side to a random
  length in [size / max_frac, size / min_frac], then crop a random size x size window.
- `crop_variants(image, size, ten_crop, flip, crop_range)`: the augmented copies for code extraction:
  with `ten_crop`, resize/center-crop to int(size * crop_range) first and take the 4 corner crops and the
  center crop; without, the center crop alone. `flip` adds the mirror image of every crop. So
  `ten_crop=True, flip=True` gives LlamaGen's 10 copies. Returns (list of PIL images, names).
- `to_tensor(image)`: PIL RGB -> (3, H, W) float32 in [-1, 1]; `to_uint8(tensor)` is the inverse for
  (B, 3, H, W) tensors -> (B, H, W, 3) uint8 arrays (re-exported from `argen.utils.images`: round half up).
- `TrainTransform(size, hflip=True)` and `EvalTransform(size)` are callables `(image, generator) -> tensor`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from argen.utils.images import to_uint8 as to_uint8  # the one uint8 rule (round half up), re-exported

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def center_crop(image: Image.Image, size: int) -> Image.Image:
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def random_crop(image: Image.Image, size: int, generator: torch.Generator | None = None,
                min_frac: float = 0.8, max_frac: float = 1.0) -> Image.Image:
    lo, hi = math.ceil(size / max_frac), math.ceil(size / min_frac)
    short = lo + int(_uniform(generator) * (hi - lo + 1)) if hi > lo else lo
    short = min(short, hi)
    while min(image.size) >= 2 * short:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = short / min(image.size)
    image = image.resize(tuple(max(size, round(x * scale)) for x in image.size), resample=Image.Resampling.BICUBIC)
    w, h = image.size
    left = int(_uniform(generator) * (w - size + 1))
    top = int(_uniform(generator) * (h - size + 1))
    return image.crop((left, top, left + size, top + size))


def crop_variants(image: Image.Image, size: int, ten_crop: bool = False, flip: bool = False,
                  crop_range: float = 1.1) -> tuple[list[Image.Image], list[str]]:
    if ten_crop:
        big = center_crop(image, int(size * crop_range))
        w, h = big.size
        boxes = {"top_left": (0, 0), "top_right": (w - size, 0), "bottom_left": (0, h - size),
                 "bottom_right": (w - size, h - size), "center": ((w - size) // 2, (h - size) // 2)}
        crops = [big.crop((x, y, x + size, y + size)) for x, y in boxes.values()]
        names = list(boxes)
    else:
        crops, names = [center_crop(image, size)], ["center"]
    if flip:
        crops = crops + [c.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for c in crops]
        names = names + [f"{n}_flip" for n in names]
    return crops, names


def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1).contiguous()  # (3, H, W)


class TrainTransform:
    def __init__(self, size: int, hflip: bool = True, min_frac: float = 0.8, max_frac: float = 1.0):
        self.size, self.hflip, self.min_frac, self.max_frac = size, hflip, min_frac, max_frac

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        image = random_crop(image, self.size, generator, self.min_frac, self.max_frac)
        if self.hflip and _uniform(generator) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(image)


class EvalTransform:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        return to_tensor(center_crop(image, self.size))
