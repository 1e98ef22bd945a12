"""`decode_codes`: image tokens -> uint8 images through a VQ tokenizer, a chunk at a time.

Peak memory is bounded by `chunk` images of decoder activations whatever the number of codes;
results are moved to the host per chunk.
"""

from __future__ import annotations

import numpy as np
import torch

from argen.models.tokenizer import VQModel
from argen.utils.errors import ArgenError
from argen.utils.images import to_uint8


@torch.inference_mode()
def decode_codes(tokenizer: VQModel, codes: torch.Tensor, chunk: int = 16) -> np.ndarray:
    """(B, N) or (B, h, w) int64 codes -> (B, H, W, 3) uint8 images, decoding `chunk` at a time."""
    if chunk < 1:
        raise ArgenError(f"decode chunk must be >= 1, got {chunk}")
    if codes.ndim == 2:
        grid = int(round(codes.shape[1] ** 0.5))
        if grid * grid != codes.shape[1]:
            raise ArgenError(f"{codes.shape[1]} codes per image do not form a square grid")
        codes = codes.view(codes.shape[0], grid, grid)
    if codes.ndim != 3:
        raise ArgenError(f"codes must be (B, N) or (B, h, w), got {tuple(codes.shape)}")
    device = next(tokenizer.parameters()).device
    parts = []
    for start in range(0, codes.shape[0], chunk):
        images = tokenizer.decode(codes[start:start + chunk].to(device))
        parts.append(to_uint8(images))
    if not parts:
        size = codes.shape[1] * tokenizer.downsample
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.concatenate(parts)
