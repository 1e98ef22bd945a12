"""`derive_seed(*keys)`: the one rule that turns a tuple of keys into an independent 63-bit seed.

Rule (stable; changing it changes what seeded commands write):
- each key is an int in [0, 2**64) or a str (a str stands for the first 8 bytes, little endian, of its
  UTF-8 sha256);
- the entropy is the 32-bit word list [len(keys), k1 low, k1 high, k2 low, k2 high, ...], so keys of any
  size and any count give distinct inputs (no (a, 0) == (a,) collision);
- `numpy.random.SeedSequence(entropy).generate_state(1, numpy.uint64)[0] >> 1` is the seed, in [0, 2**63),
  which `torch.Generator().manual_seed` and `numpy.random.default_rng` both accept.

Unlike additive mixers such as `seed * p + index`, nearby key tuples give unrelated seeds, and no tuple
of distinct keys maps onto another one's seed by construction. Use a str first key to name the purpose
(`derive_seed("dropout", seed, step)`), so two uses of one user seed draw different streams.
`argen.sampling.image_seed` keeps its own documented rule (`seed * 1000003 + i`): it is user-facing.
"""

from __future__ import annotations

import hashlib

import numpy as np

from argen.utils.errors import ArgenError

_WORD = 0xFFFFFFFF


def _key_value(key: int | str) -> int:
    if isinstance(key, str):
        return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
        raise ArgenError(f"derive_seed keys must be ints or strings, got {type(key).__name__}")
    value = int(key)
    if not 0 <= value < 1 << 64:
        raise ArgenError(f"derive_seed keys must lie in [0, 2**64), got {value}")
    return value


def derive_seed(*keys: int | str) -> int:
    """A seed in [0, 2**63) derived from `keys` by the rule in the module docstring."""
    if not keys:
        raise ArgenError("derive_seed needs at least one key")
    entropy = [len(keys)]
    for key in keys:
        value = _key_value(key)
        entropy += [value & _WORD, value >> 32 & _WORD]
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)
    return int(state[0]) >> 1
