"""2D rotary position embedding over a raster-ordered h x w token grid.

The table has one row per sequence position, shape (prefix_len + grid*grid, head_dim // 2, 2)
holding (cos, sin). Rotation pairs are adjacent channels (2i, 2i+1). The first half of the pairs
rotate with the token's row index, the second half with its column index.

The condition prefix rows are all zeros (cos = sin = 0). This reproduces the released LlamaGen
models exactly: their condition tokens' queries and keys are zeroed by the rotation, so a condition
token contributes only through its value vector. Loading those weights requires the same table.
"""

from __future__ import annotations

import torch


def rope_2d_table(grid_size: int, head_dim: int, base: float = 10000.0, prefix_len: int = 1) -> torch.Tensor:
    """Return (prefix_len + grid_size**2, head_dim // 2, 2) float32 cos/sin table."""
    if head_dim % 4 != 0:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    axis_dim = head_dim // 2  # channels given to each of the two axes
    inv_freq = 1.0 / (base ** (torch.arange(0, axis_dim, 2, dtype=torch.float32) / axis_dim))  # (head_dim/4,)
    coords = torch.arange(grid_size, dtype=torch.float32)
    angles = torch.outer(coords, inv_freq)  # (grid, head_dim/4)
    rows = angles[:, None, :].expand(grid_size, grid_size, -1)
    cols = angles[None, :, :].expand(grid_size, grid_size, -1)
    grid_angles = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, -1)  # (grid^2, head_dim/2)
    table = torch.stack([grid_angles.cos(), grid_angles.sin()], dim=-1)  # (grid^2, head_dim/2, 2)
    prefix = torch.zeros(prefix_len, head_dim // 2, 2)
    return torch.cat([prefix, table], dim=0)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by table (T, D/2, 2); computed in float32, returned in x's dtype."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, D/2, 2)
    cos = table[None, :, None, :, 0]
    sin = table[None, :, None, :, 1]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
    return rotated.flatten(3).type_as(x)
