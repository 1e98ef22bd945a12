"""A folder of reference images read as an ADM-style batch (`argen evaluate REF_FOLDER samples.npz`).

Contract:
- `ImageFolderBatch(path, size, limit=None)` lists the images under `path` (recursively; the extensions of
  `argen.data.images.IMAGE_EXTENSIONS`; sorted by relative path) and serves them like `ImageBatchFile`:
  `count`, `image_size` (size, size), `iter_batches(n)` -> uint8 (b, size, size, 3). Each image is decoded
  with pillow into 8-bit RGB (`argen.data.images.load_image`: CMYK, palette, greyscale, alpha on white) and
  brought to the samples' size with the ADM/LlamaGen evaluation center crop (`argen.data.transforms.center_crop`:
  box-halving, bicubic resize of the short side, center crop), the preprocessing of argen's reference and
  eval images; Inception's own resize to 299 follows, as for an npz.
- An unreadable image stops the run with a one-line `ArgenError` naming the file (a reference set must be
  complete); an empty folder, fewer images than `limit` asks for, or a missing folder too.
- `digest()`: sha256 over the relative paths, sizes and modification times of the images and the target
  size, which keys the statistics cache (`argen.evaluation.evaluate`) as the file hash keys an npz's.
  `statistics()` is None (a folder carries no precomputed mu/sigma).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from argen.data.images import IMAGE_EXTENSIONS, BadImage, load_image
from argen.data.transforms import center_crop
from argen.utils.errors import ArgenError


class ImageFolderBatch:
    """Reference images in a folder, center-cropped to `size` x `size`; see the module docstring."""

    def __init__(self, path: str | Path, size: int, name: str = "reference folder", limit: int | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ArgenError(f"{name} {self.path} does not exist")
        if limit is not None and limit < 1:
            raise ArgenError("the image limit must be >= 1")
        files = sorted((p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                       key=lambda p: p.relative_to(self.path).as_posix())
        if not files:
            raise ArgenError(f"{name} {self.path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.files = files[:limit] if limit is not None else files
        self.size, self.limit, self.key = int(size), limit, f"{int(size)}px"
        self.cacheable = True

    @property
    def count(self) -> int:
        return len(self.files)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.size, self.size

    def statistics(self) -> None:
        return None

    def digest(self) -> str:
        digest = hashlib.sha256(f"center_crop {self.size}\n".encode())
        for file in self.files:
            stat = file.stat()
            digest.update(f"{file.relative_to(self.path).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def _image(self, file: Path) -> np.ndarray:
        try:
            image = load_image(file, min_size=1)
        except BadImage as exc:
            raise ArgenError(f"reference image {file}: {exc}; remove it or replace it") from None
        return np.asarray(center_crop(image, self.size), dtype=np.uint8)

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, self.count, batch_size):
            yield np.stack([self._image(f) for f in self.files[start:start + batch_size]])
