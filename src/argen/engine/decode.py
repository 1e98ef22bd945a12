"""`decode_codes`: image tokens -> uint8 images through a VQ tokenizer, the same way for any batch.

Contract:
- Every call of the tokenizer's decoder sees exactly `micro_batch` images: the last group is padded
  with copies of its last image, and the padding is dropped. Convolution kernels choose their
  algorithm (and so their rounding) by batch size, and on some CPUs batch 1 rounds differently from
  batch 2, so with a fixed micro-batch an image's pixels depend only on its own codes, never on how
  many images were decoded with it (`argen sample --batch-size`, `sample-batch` under any world size,
  the server's co-tenants). Within a micro-batch a row's result does not depend on its neighbours.
- `micro_batch` defaults to `default_micro_batch(device, image_size)`, a function of the device and the
  decoded size alone: 8 on CUDA; on the CPU 8 for images up to `CPU_SMALL_IMAGE` px, whose decoder
  calls are dominated by per-call overhead at batch 1 (the demo's 64 px tokenizer: about 50 ms an
  image alone against 14-22 ms in groups of 8, on 2 cores), and 1 above it, where the cost per image
  does not fall with the batch (VQ-16 at 256 px: 3.0 s an image at batch 1 and 3.1 s at 8) and
  padding a single image to 8 would cost 8 decodes.
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
CPU_SMALL_IMAGE = 128  # px; CPU images up to this size decode in groups of CUDA_MICRO_BATCH, larger ones alone


def default_micro_batch(device: torch.device | str, image_size: int) -> int:
    if torch.device(device).type == "cuda" or image_size <= CPU_SMALL_IMAGE:
        return CUDA_MICRO_BATCH
    return 1


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
    if micro_batch is None:
        micro_batch = default_micro_batch(device, codes.shape[-1] * tokenizer.downsample)
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
