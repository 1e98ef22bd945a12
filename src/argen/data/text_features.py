"""Precomputed caption features: unpadded fp16 storage and the one place where left padding happens.

Contract:
- `left_pad(features, length)`: a list of (L_i, D) tensors/arrays -> (features (B, length, D) float32,
  mask (B, length) float32, 1 on real tokens). Real tokens sit at the right end (left padding, as the
  generator expects); captions longer than `length` keep their first `length` tokens.
- `save_text_features(dir, features_list, ...)` writes `dir/features.npy` (all tokens concatenated,
  (total_tokens, D) fp16), `dir/offsets.npy` ((N + 1,) int64; caption i is rows offsets[i]:offsets[i+1])
  and `dir/meta.json` (count, dim, encoder, max length, optional caption ids/texts). Files are written
  atomically; `meta.json` is written last so a directory with it is complete.
- `TextFeatureStore(dir)`: `len(store)`, `.dim`, `.lengths`, `store.unpadded(i)` -> (L_i, D) float32 and
  `store.get(indices, length)` -> `left_pad(...)` of those captions; arrays are memory-mapped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from argen.utils.errors import ArgenError
from argen.utils.io import atomic_save_npy, atomic_write_json

FEATURES_FILE = "features.npy"
OFFSETS_FILE = "offsets.npy"
META_FILE = "meta.json"


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32)
    return torch.from_numpy(np.asarray(x, dtype=np.float32))


def left_pad(features: Sequence, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (L_i, D) -> (features (B, length, D) float32, mask (B, length) float32)."""
    if length <= 0:
        raise ArgenError(f"caption length must be positive, got {length}")
    if len(features) == 0:
        raise ArgenError("left_pad needs at least one caption")
    items = [_as_tensor(f) for f in features]
    dims = {f.shape[-1] for f in items}
    if len(dims) != 1 or any(f.ndim != 2 for f in items):
        shapes = [tuple(f.shape) for f in items]
        raise ArgenError(f"caption features must all be (L, D) with one D, got shapes {shapes}")
    dim = dims.pop()
    out = torch.zeros(len(items), length, dim)  # (B, T, D)
    mask = torch.zeros(len(items), length)  # (B, T)
    for i, f in enumerate(items):
        f = f[:length]
        n = f.shape[0]
        if n:
            out[i, length - n:] = f
            mask[i, length - n:] = 1.0
    return out, mask


def save_text_features(directory: str | Path, features_list: Sequence, encoder: str = "",
                       max_length: int | None = None, ids: Sequence | None = None,
                       texts: Sequence[str] | None = None) -> Path:
    """Write unpadded fp16 caption features (see module docstring); returns the directory."""
    directory = Path(directory)
    items = [_as_tensor(f) for f in features_list]
    if not items:
        raise ArgenError("no caption features to save")
    dims = {f.shape[-1] for f in items}
    if len(dims) != 1 or any(f.ndim != 2 for f in items):
        raise ArgenError("caption features must all be (L, D) with one D")
    dim = dims.pop()
    lengths = np.array([f.shape[0] for f in items], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = torch.cat(items, dim=0).numpy().astype(np.float16) if offsets[-1] else np.zeros((0, dim), np.float16)
    if ids is not None and len(ids) != len(items):
        raise ArgenError(f"got {len(ids)} caption ids for {len(items)} captions")
    if texts is not None and len(texts) != len(items):
        raise ArgenError(f"got {len(texts)} caption texts for {len(items)} captions")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).unlink(missing_ok=True)
    atomic_save_npy(directory / FEATURES_FILE, flat)
    atomic_save_npy(directory / OFFSETS_FILE, offsets)
    meta = {"count": len(items), "dim": int(dim), "dtype": "float16", "encoder": encoder,
            "max_length": max_length, "total_tokens": int(offsets[-1])}
    if ids is not None:
        meta["ids"] = [i if isinstance(i, str) else int(i) for i in ids]
    if texts is not None:
        meta["texts"] = list(texts)
    atomic_write_json(directory / META_FILE, meta)
    return directory


class TextFeatureStore:
    """Memory-mapped reader for a directory written by `save_text_features`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise ArgenError(f"{self.directory} holds no text features ({META_FILE} missing); run "
                             f"`argen extract-text-features` first")
        self.meta = json.loads(meta_path.read_text())
        try:
            self._features = np.load(self.directory / FEATURES_FILE, mmap_mode="r")
            self._offsets = np.load(self.directory / OFFSETS_FILE)
        except (OSError, ValueError) as exc:
            raise ArgenError(f"text features in {self.directory} are unreadable ({exc}); extract them again") from exc
        if len(self._offsets) != self.meta["count"] + 1 or self._offsets[-1] != self._features.shape[0]:
            raise ArgenError(f"text features in {self.directory} are inconsistent; extract them again")

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self._offsets)

    @property
    def ids(self) -> list | None:
        return self.meta.get("ids")

    def unpadded(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"caption index {index} out of range for {len(self)} captions")
        start, stop = int(self._offsets[index]), int(self._offsets[index + 1])
        return torch.from_numpy(np.asarray(self._features[start:stop], dtype=np.float32))  # (L, D)

    def get(self, indices, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions `indices` -> (features (B, length, D) float32, mask (B, length) float32)."""
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        return left_pad([self.unpadded(int(i)) for i in np.atleast_1d(indices)], length)
