"""Inception activations and Gaussian statistics of image sets, memory-bounded.

Contract:
- Images come as an iterable of uint8 NHWC batches ((B, H, W, 3) numpy arrays or tensors; a single
  (H, W, 3) image counts as a batch of one), all of one size. They are re-batched to `batch_size`.
- `compute_activations(images, inception, ...)` -> `Activations`: `pool` (N, 2048) float32 kept in
  memory (needed for precision/recall and IS), and the mean/covariance of the pool and of the spatial
  (sFID) features, accumulated in float64 without storing the spatial features.
- `compute_statistics(images, inception, ...)` -> (mu (2048,), sigma (2048, 2048)): the hook for rFID
  (`argen eval-tokenizer`): originals and reconstructions each go through it, then
  `frechet_distance(*stats_a, *stats_b)`.
- `paired_statistics(pairs, inception)`: one pass over an iterable of (originals, reconstructions) uint8
  NHWC batch pairs -> ((mu, sigma) of the originals, (mu, sigma) of the reconstructions); with
  `reconstruction_fid(pairs, inception)` = the Fréchet distance between the two (rFID).
- Inception runs with cuDNN TF32 convolutions disabled (restored afterwards), in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from argen.evaluation.metrics import feature_statistics, frechet_distance
from argen.models.inception import FIDInception
from argen.utils.errors import ArgenError


@dataclass
class Activations:
    pool: np.ndarray  # (N, 2048) float32
    mu: np.ndarray  # (2048,)
    sigma: np.ndarray  # (2048, 2048)
    mu_s: np.ndarray | None  # (2023,)
    sigma_s: np.ndarray | None  # (2023, 2023)

    @property
    def count(self) -> int:
        return int(self.pool.shape[0])


class RunningCovariance:
    """Streaming mean/covariance in float64. Rows are shifted by the first batch's mean before the
    sums are taken, which keeps the `sum(x x^T) - n mu mu^T` cancellation small."""

    def __init__(self):
        self.count = 0
        self.shift: np.ndarray | None = None
        self.total: np.ndarray | None = None
        self.outer: np.ndarray | None = None

    def update(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        if self.shift is None:
            self.shift = rows.mean(axis=0)
            self.total = np.zeros_like(self.shift)
            self.outer = np.zeros((rows.shape[1], rows.shape[1]))
        centred = rows - self.shift
        self.count += rows.shape[0]
        self.total += centred.sum(axis=0)
        self.outer += centred.T @ centred

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ArgenError(f"statistics need at least 2 images, got {self.count}")
        mean = self.total / self.count
        cov = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return self.shift + mean, cov


def _as_uint8_batch(batch) -> np.ndarray:
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().cpu().numpy()
    batch = np.asarray(batch)
    if batch.ndim == 3:
        batch = batch[None]
    if batch.dtype != np.uint8:
        raise ArgenError(f"images must be uint8 (0..255), got {batch.dtype}; convert them with "
                         f"argen.utils.images.to_uint8 or ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)")
    if batch.ndim != 4 or batch.shape[-1] != 3:
        hint = " (this looks like NCHW: transpose to NHWC)" if batch.ndim == 4 and batch.shape[1] == 3 else ""
        raise ArgenError(f"images must be (N, H, W, 3) NHWC, got shape {batch.shape}{hint}")
    return batch


def rebatch(images: Iterable, batch_size: int) -> Iterator[np.ndarray]:
    """Re-chunk an iterable of uint8 NHWC batches into batches of `batch_size` (the last may be short)."""
    pending: list[np.ndarray] = []
    held = 0
    size = None
    for batch in images:
        batch = _as_uint8_batch(batch)
        if size is None:
            size = batch.shape[1:3]
        elif batch.shape[1:3] != size:
            raise ArgenError(f"all images of a set must share one size; got {tuple(size)} and {batch.shape[1:3]}")
        pending.append(batch)
        held += batch.shape[0]
        while held >= batch_size:
            joined = np.concatenate(pending)
            yield joined[:batch_size]
            rest = joined[batch_size:]
            pending, held = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
    if held:
        yield np.concatenate(pending)


@contextlib.contextmanager
def full_precision_convolutions():
    """Turn cuDNN's TF32 convolutions off for the duration (TF32 would move Inception features by ~1e-3)."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


@torch.no_grad()
def compute_activations(images: Iterable, inception: FIDInception, batch_size: int = 50, spatial: bool = True,
                        total: int | None = None, desc: str = "inception", progress: bool = True) -> Activations:
    """Run `inception` over all images; see the module docstring."""
    if batch_size < 1:
        raise ArgenError("--batch-size must be >= 1")
    device = inception.fc.weight.device
    pools: list[np.ndarray] = []
    spatial_stats = RunningCovariance() if spatial else None
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    for batch in rebatch(images, batch_size):
        with full_precision_convolutions():
            feats = inception(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
        pools.append(feats.pool.cpu().numpy())
        if spatial_stats is not None:
            spatial_stats.update(feats.spatial.double().cpu().numpy())
        bar.update(batch.shape[0])
    bar.close()
    if not pools:
        raise ArgenError("no images to evaluate")
    pool = np.concatenate(pools).astype(np.float32)
    if pool.shape[0] < 2:
        raise ArgenError(f"statistics need at least 2 images, got {pool.shape[0]}")
    mu, sigma = feature_statistics(pool)
    mu_s, sigma_s = spatial_stats.finalize() if spatial_stats is not None else (None, None)
    return Activations(pool, mu, sigma, mu_s, sigma_s)


def compute_statistics(images: Iterable, inception: FIDInception, batch_size: int = 50,
                       total: int | None = None, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the 2048-wide pool features of uint8 NHWC images: the rFID hook."""
    acts = compute_activations(images, inception, batch_size, spatial=False, total=total, progress=progress)
    return acts.mu, acts.sigma


@torch.no_grad()
def paired_statistics(pairs: Iterable, inception: FIDInception, total: int | None = None, progress: bool = True):
    """((mu, sigma) of the originals, (mu, sigma) of the reconstructions) from (orig, recon) batch pairs."""
    device = inception.fc.weight.device
    stats = (RunningCovariance(), RunningCovariance())
    bar = tqdm(total=total, desc="rFID inception", unit="img", disable=not progress, dynamic_ncols=True)
    for originals, reconstructions in pairs:
        batches = (_as_uint8_batch(originals), _as_uint8_batch(reconstructions))
        if batches[0].shape != batches[1].shape:
            raise ArgenError(f"originals {batches[0].shape} and reconstructions {batches[1].shape} differ in shape")
        for batch, acc in zip(batches, stats):
            with full_precision_convolutions():
                pool = inception(torch.from_numpy(np.ascontiguousarray(batch)).to(device)).pool
            acc.update(pool.double().cpu().numpy())
        bar.update(batches[0].shape[0])
    bar.close()
    return stats[0].finalize(), stats[1].finalize()


def reconstruction_fid(pairs: Iterable, inception: FIDInception, total: int | None = None,
                       progress: bool = True, method: str = "sqrtm") -> float:
    """rFID: Fréchet distance between the Inception pool statistics of originals and reconstructions."""
    (mu_a, sigma_a), (mu_b, sigma_b) = paired_statistics(pairs, inception, total, progress)
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b, method=method)
