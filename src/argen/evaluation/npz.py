"""ADM-format image batches: read (streamed) and write (streamed) `.npz` files.

Format: `arr_0` uint8 (N, H, W, 3) NHWC images; optional `arr_1` (N,) int64 labels; reference batches may
also carry precomputed `mu`, `sigma` (pool features) and `mu_s`, `sigma_s` (spatial features).

Contract:
- `ImageBatchFile(path, key="arr_0", limit=None)` validates the npz header without loading the images
  (`key` picks another uint8 NHWC member, e.g. the demo set's `images`; `limit` keeps the first N): a missing key, a
  non-uint8 dtype, a non-4D shape, NCHW layout or a channel count other than 3 raise `ArgenError`
  saying what to fix. `iter_batches(n)` reads `n` images at a time from the zip member (stored or
  deflated), so a 50k x 256 x 256 batch never sits in memory whole.
- `NpzImageWriter(path, shape)` streams chunks of `arr_0` into an uncompressed zip (zip64) under a temp
  name and renames it into place on `close()`; `np.load` reads the result.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from argen.utils.errors import ArgenError
from argen.utils.io import atomic_path, sha256_file

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def _read_header(handle) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)
    return np.lib.format.read_array_header_2_0(handle)


class ImageBatchFile:
    """An ADM-format npz opened for streaming; see the module docstring."""

    def __init__(self, path: str | Path, name: str = "batch", key: str = "arr_0", limit: int | None = None):
        self.path = Path(path)
        self.key = key
        if not self.path.is_file():
            raise ArgenError(f"{name} {self.path} does not exist")
        try:
            with zipfile.ZipFile(self.path) as zf:
                self.members = {Path(n).stem: n for n in zf.namelist() if n.endswith(".npy")}
                if key not in self.members:
                    raise ArgenError(f"{self.path} has no `{key}`: an ADM batch needs arr_0 = uint8 images "
                                     f"(N, H, W, 3); it holds {sorted(self.members) or 'no arrays'}")
                with zf.open(self.members[key]) as handle:
                    self.shape, self.fortran_order, self.dtype = _read_header(handle)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise ArgenError(f"cannot read {self.path} as an npz file ({exc}); write it with numpy.savez") from exc
        self._validate()
        if limit is not None:
            if limit < 1:
                raise ArgenError("the image limit must be >= 1")
            self.shape = (min(int(self.shape[0]), limit),) + tuple(self.shape[1:])
        self.limit = limit
        self.cacheable = True

    def _validate(self) -> None:
        shape = self.shape
        if self.dtype != np.uint8:
            raise ArgenError(f"{self.path}: {self.key} must be uint8 images on 0..255, got {self.dtype}; scale and "
                             f"convert with .clip(0, 255).round().astype(np.uint8)")
        if len(shape) != 4:
            raise ArgenError(f"{self.path}: {self.key} must be 4-D (N, H, W, 3), got shape {shape}")
        if shape[-1] != 3:
            if shape[1] == 3:
                raise ArgenError(f"{self.path}: {self.key} has shape {shape}, which is NCHW; ADM batches are NHWC: "
                                 f"save arr_0.transpose(0, 2, 3, 1)")
            raise ArgenError(f"{self.path}: {self.key} must have 3 (RGB) channels last, got shape {shape}")

    @property
    def count(self) -> int:
        return int(self.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.shape[1]), int(self.shape[2])

    def has(self, key: str) -> bool:
        return key in self.members

    def digest(self) -> str:
        """sha256 of the file: the key of its statistics cache."""
        return sha256_file(self.path)

    def load(self, key: str) -> np.ndarray:
        """Load a small member array (labels, statistics) whole."""
        with np.load(self.path) as data:
            return data[key]

    def statistics(self) -> dict[str, np.ndarray] | None:
        """The precomputed (mu, sigma, mu_s, sigma_s) if all four are present, else None."""
        if not all(self.has(k) for k in STAT_KEYS):
            return None
        with np.load(self.path) as data:
            return {k: np.asarray(data[k], dtype=np.float64) for k in STAT_KEYS}

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        per_image = int(np.prod(self.shape[1:]))
        if self.fortran_order:
            images = self.load(self.key)[:self.count]
            for start in range(0, self.count, batch_size):
                yield np.ascontiguousarray(images[start:start + batch_size])
            return
        with zipfile.ZipFile(self.path) as zf, zf.open(self.members[self.key]) as handle:
            _read_header(handle)
            for start in range(0, self.count, batch_size):
                n = min(batch_size, self.count - start)
                data = handle.read(n * per_image)
                if len(data) != n * per_image:
                    raise ArgenError(f"{self.path}: {self.key} is truncated at image {start + len(data) // per_image}")
                yield np.frombuffer(data, dtype=np.uint8).reshape((n,) + tuple(self.shape[1:]))


class NpzImageWriter:
    """Stream `arr_0` (N, H, W, 3) uint8 in chunks, then optional extra arrays, into `path` atomically."""

    def __init__(self, path: str | Path, shape: tuple[int, int, int, int]):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._zip = zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._member = self._zip.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": self.shape}
        np.lib.format.write_array_header_2_0(self._member, header)
        self.written = 0

    def write(self, images: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.shape[1:] != self.shape[1:]:
            raise ValueError(f"chunk {images.shape} {images.dtype} does not fit arr_0 {self.shape} uint8")
        self._member.write(np.ascontiguousarray(images).tobytes())
        self.written += images.shape[0]

    def close(self, extra: dict[str, np.ndarray] | None = None) -> Path:
        if self.written != self.shape[0]:
            self.abort()
            raise ValueError(f"wrote {self.written} images, header says {self.shape[0]}")
        self._member.close()
        for key, value in (extra or {}).items():
            with self._zip.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
        self._zip.close()
        self._ctx.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        """Drop the temp file; safe after a failed write (e.g. a full disk) or a failed close."""
        for close in (self._member.close, self._zip.close):
            try:
                close()
            except (OSError, ValueError):  # a full disk fails the flush again; the temp file goes below
                pass
        err = RuntimeError("aborted")
        try:
            self._ctx.__exit__(RuntimeError, err, None)
        except RuntimeError:
            pass
