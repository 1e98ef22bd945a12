"""`image_seed`: the seed of image i's own generator, shared by `argen sample` and `argen serve`.

Image i of a request or command with seed s draws from `torch.Generator().manual_seed(image_seed(s, i))`,
so it does not depend on the batch it is sampled in. s must lie in [0, 2**63).
"""

from __future__ import annotations

SEED_STRIDE = 1_000_003  # a prime, so that (s, i) pairs rarely collide for small i


def image_seed(seed: int, index: int) -> int:
    return (seed * SEED_STRIDE + index) % (1 << 63)
