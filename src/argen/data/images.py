"""Robust image decoding: any PIL-readable file -> 8-bit RGB, or `BadImage` with the reason.

Contract:
- `to_rgb(image)`: CMYK, palette (with or without transparency), L/LA, RGBA, 16-bit and 32-bit integer
  or float greyscale become 8-bit RGB; transparent pixels are composited on white.
- `load_image(path, min_size)`: fully decodes the file (so truncated files fail here, not later) and
  raises `BadImage` for unreadable/corrupt/truncated files or images smaller than `min_size` on a side.
- `FailureTracker`: counts skipped records, logs each skipped path once, and raises `ArgenError` when the
  failure fraction exceeds `max_fraction` (checked once `min_count` records were tried) or when every
  record failed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from argen.utils.errors import ArgenError

log = logging.getLogger("argen.data")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}


class BadImage(Exception):
    """An image that cannot be used; `str(exc)` says why."""


def _on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        return _on_white(image.convert("RGBA"))
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        if mode == "F":
            top = max(float(array.max()), 1.0) if array.max() > 1.0 else 1.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    return image.convert("RGB")  # CMYK, P, L, 1, YCbCr, ...


def load_image(path: str | Path, min_size: int = 8) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            rgb = to_rgb(image)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadImage(f"unreadable image ({type(exc).__name__}: {exc})") from exc
    if min(rgb.size) < min_size:
        raise BadImage(f"too small ({rgb.size[0]}x{rgb.size[1]} < {min_size})")
    return rgb


class FailureTracker:
    """Count bad records; stop with a clear error when there are too many."""

    def __init__(self, max_fraction: float = 0.05, min_count: int = 100, what: str = "images"):
        self.max_fraction = max_fraction
        self.min_count = min_count
        self.what = what
        self.tried = 0
        self.failed = 0
        self.skipped: list[str] = []

    def ok(self, n: int = 1) -> None:
        self.tried += n

    def fail(self, source: str, reason: str) -> None:
        self.tried += 1
        self.failed += 1
        self.skipped.append(source)
        log.warning("skipped %s: %s", source, reason)
        self.check()

    def record(self, images, failures: list[tuple[str, str]]) -> bool:
        """Account for one collated batch (its images or None, and its failures); True if it has images."""
        for source, reason in failures:
            self.fail(source, reason)
        if images is None:
            return False
        self.ok(images.shape[0])
        return True

    def check(self, final: bool = False) -> None:
        if self.tried and self.failed == self.tried and (final or self.tried >= self.min_count):
            raise ArgenError(f"all {self.tried} {self.what} tried so far failed to load (e.g. {self.skipped[0]}); "
                             f"check the data path and formats")
        if (self.tried >= self.min_count or final) and self.failed > self.max_fraction * self.tried:
            raise ArgenError(f"{self.failed} of {self.tried} {self.what} failed to load (more than "
                             f"{self.max_fraction:.1%}; e.g. {self.skipped[0]}); fix the data or raise "
                             f"--max-bad-fraction")

    def summary(self) -> dict:
        return {"tried": self.tried, "skipped": self.failed, "skipped_paths": self.skipped[:100]}

    def skipped_message(self) -> str:
        """'skipped 3 unreadable images: a, b, c' (the first ten named)."""
        what = self.what[:-1] if self.failed == 1 and self.what.endswith("s") else self.what
        more = f" and {self.failed - 10} more" if self.failed > 10 else ""
        return f"skipped {self.failed} unreadable {what}: {', '.join(self.skipped[:10])}{more}"
