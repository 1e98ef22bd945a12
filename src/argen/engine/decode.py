"""`decode_codes`: image tokens -> uint8 images through a VQ tokenizer, the same way for any batch.

Contract:
- Every call of the tokenizer's decoder sees exactly `micro_batch` images: the last group is padded
  with copies of its last image, and the padding is dropped. Convolution kernels choose their
  algorithm (and so their rounding) by batch size, and on some CPUs batch 1 rounds differently from
  batch 2, so with a fixed micro-batch an image's pixels depend only on its own codes, never on how
  many images were decoded with it (`argen sample --batch-size`, `sample-batch` under any world size,
  the server's co-tenants). Within a micro-batch a row's result does not depend on its neighbours.
- `micro_batch` defaults to `default_micro_batch(device)`: 1 on the CPU, where a decoder's cost per
  image does not fall with the batch (VQ-16 at 256 px: 3.0 s an image at batch 1 and 3.1 s at 8, on 2
  cores), and 8 on CUDA, where larger batches pay.
- `resize` (optional) maps each micro-batch's float images (b, 3, H, W) before the uint8 conversion,
  so resized images are batch-independent too.
- Peak memory is bounded by one micro-batch of decoder activations; results move to the host per group.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from argen.models.tokenizer import VQModel
from argen.utils.errors import ArgenError
from argen.utils.images import to_uint8

CUDA_MICRO_BATCH = 8


def default_micro_batch(device: torch.device | str) -> int:
    return CUDA_MICRO_BATCH if torch.device(device).type == "cuda" else 1


@torch.inference_mode()
def decode_codes(tokenizer: VQModel, codes: torch.Tensor, micro_batch: int | None = None,
                 resize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """(B, N) or (B, h, w) int64 codes -> (B, H, W, 3) uint8 images, `micro_batch` images per decoder call."""
    if codes.ndim == 2:
        grid = int(round(codes.shape[1] ** 0.5))
        if grid * grid != codes.shape[1]:
            raise ArgenError(f"{codes.shape[1]} codes per image do not form a square grid")
        codes = codes.view(codes.shape[0], grid, grid)
    if codes.ndim != 3:
        raise ArgenError(f"codes must be (B, N) or (B, h, w), got {tuple(codes.shape)}")
    device = next(tokenizer.parameters()).device
    micro_batch = default_micro_batch(device) if micro_batch is None else micro_batch
    if micro_batch < 1:
        raise ArgenError(f"decode micro-batch must be >= 1, got {micro_batch}")
    parts = []
    for start in range(0, codes.shape[0], micro_batch):
        group = codes[start:start + micro_batch]  # (b, h, w), b <= micro_batch
        real = group.shape[0]
        if real < micro_batch:
            group = torch.cat([group, group[-1:].expand(micro_batch - real, -1, -1)])
        images = tokenizer.decode(group.to(device))  # (micro_batch, 3, H, W)
        if resize is not None:
            images = resize(images)
        parts.append(to_uint8(images[:real]))
    if not parts:
        size = codes.shape[1] * tokenizer.downsample
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.concatenate(parts)
