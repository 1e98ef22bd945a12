"""Tokenizer reconstruction metrics: PSNR, SSIM, LPIPS, codebook usage and (optionally) rFID.

Contract:
- `psnr(a, b, peak=255)`: the one PSNR of argen: (B, ...) arrays or tensors -> (B,) PSNR in dB, in
  float64, capped at 100 dB (an exact match). `psnr_uint8(a, b)` is it for uint8 images (peak 255);
  the tokenizer trainer logs it on [0, 1] images (peak 1).
- `ssim_uint8(a, b)`: (B, H, W, 3) uint8 -> (B,) SSIM as in skimage's `structural_similarity(...,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1)`
  (the SDXL/Wang et al. setting): 11x11 Gaussian window (truncate 3.5), K1=0.01, K2=0.03, mean over the
  valid interior (5-pixel border cropped) and over the three channels. Computed in float64.
- `evaluate_tokenizer(model, dataset, ...)`: center-crops every image of `dataset` (a `argen.data.datasets`
  dataset) to `image_size`, reconstructs it (encode -> decode, clamped, rounded to uint8) and returns
  {"psnr", "ssim", "lpips" (when an LPIPS model is given), "codebook_usage" (distinct codes used over the
  whole set / codebook size), "rfid" (when an Inception model and the FID module are given), "num_images",
  "skipped_images", ...}. The first `grid_count` originals/reconstructions are returned for a PNG.
- `side_by_side(originals, reconstructions, per_row)`: uint8 grid image, each row of originals followed
  by the row of their reconstructions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from argen.data.datasets import TransformedDataset, collate_skip
from argen.data.images import FailureTracker
from argen.data.transforms import EvalTransform
from argen.utils.errors import ArgenError
from argen.utils.images import make_grid, to_uint8

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
MAX_PSNR_DB = 100.0  # an exact match


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, peak: float = 255.0) -> np.ndarray:
    """Per-item PSNR in dB over all but the first axis, computed in float64, capped at MAX_PSNR_DB."""
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = (diff**2).reshape(diff.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(peak**2 / mse)
    return np.minimum(out, MAX_PSNR_DB)


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 pairs -> (B,) PSNR in dB with peak 255."""
    return psnr(a, b, 255.0)


def gaussian_window(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()  # (2r+1,)


def _filter(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable valid filtering of (N, 1, H, W) float64."""
    k = window.numel()
    x = F.conv2d(x, window.view(1, 1, 1, k))
    return F.conv2d(x, window.view(1, 1, k, 1))


def ssim_uint8(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs two (B, H, W, C) arrays of one shape, got {a.shape} and {b.shape}")
    window = gaussian_window()
    if min(a.shape[1:3]) < window.numel():
        raise ArgenError(f"SSIM needs images of at least {window.numel()}x{window.numel()} pixels")
    batch, _, _, channels = a.shape
    x = torch.from_numpy(a).double().permute(0, 3, 1, 2).reshape(batch * channels, 1, *a.shape[1:3])
    y = torch.from_numpy(b).double().permute(0, 3, 1, 2).reshape(batch * channels, 1, *a.shape[1:3])
    c1, c2 = (SSIM_K1 * 255.0) ** 2, (SSIM_K2 * 255.0) ** 2
    mx, my = _filter(x, window), _filter(y, window)
    vx = _filter(x * x, window) - mx * mx
    vy = _filter(y * y, window) - my * my
    cxy = _filter(x * y, window) - mx * my
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return smap.reshape(batch, channels, -1).mean(dim=(1, 2)).numpy()


def side_by_side(originals: np.ndarray, reconstructions: np.ndarray, per_row: int = 8, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 pairs -> one uint8 image: rows of originals, each followed by its reconstructions."""
    n = originals.shape[0]
    per_row = max(1, min(per_row, n))
    blank = np.full((per_row, *originals.shape[1:]), 255, np.uint8)
    cells = []
    for start in range(0, n, per_row):
        for images in (originals, reconstructions):
            row = images[start:start + per_row]
            cells += [row, blank[:per_row - len(row)]]
    return make_grid(np.concatenate(cells), cols=per_row, pad=pad)


@torch.no_grad()
def evaluate_tokenizer(model, dataset, image_size: int, batch_size: int = 64, lpips=None, inception=None,
                       device: torch.device | str = "cpu", max_images: int | None = None, grid_count: int = 16,
                       max_bad_fraction: float = 0.05, progress: bool = True) -> tuple[dict, np.ndarray, np.ndarray]:
    """-> (metrics dict, originals (G, S, S, 3) uint8, reconstructions (G, S, S, 3) uint8)."""
    if image_size % model.downsample:
        raise ArgenError(f"--image-size {image_size} is not a multiple of the tokenizer's downsample "
                         f"{model.downsample}")
    model = model.eval().to(device)
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    if count == 0:
        raise ArgenError("the evaluation set has no images")
    tds = TransformedDataset(dataset, EvalTransform(image_size))
    loader = torch.utils.data.DataLoader(tds, batch_size=batch_size, sampler=range(count), collate_fn=collate_skip)
    tracker = FailureTracker(max_bad_fraction, min_count=min(100, count))
    psnrs, ssims, lpips_values = [], [], []
    used = torch.zeros(model.config.codebook_size, dtype=torch.bool)
    grid_orig, grid_recon = [], []

    def pairs():
        """Reconstruct batch by batch, record the metrics, yield (originals, reconstructions) uint8 for rFID."""
        bar = tqdm(total=count, desc="eval-tokenizer", unit="img", disable=not progress)
        for images, _, _, failures in loader:
            bar.update(len(failures))
            if not tracker.record(images, failures):
                continue
            images = images.to(device)
            codes = model.encode(images)  # (B, h, w)
            used[codes.flatten().cpu().unique()] = True
            recon = model.decode(codes).float().clamp(-1, 1)  # (B, 3, H, W)
            orig8, recon8 = to_uint8(images), to_uint8(recon)
            psnrs.append(psnr_uint8(orig8, recon8))
            ssims.append(ssim_uint8(orig8, recon8))
            if lpips is not None:
                lpips_values.append(lpips(images.float(), recon).cpu().numpy())
            if sum(len(g) for g in grid_orig) < grid_count:
                grid_orig.append(orig8)
                grid_recon.append(recon8)
            bar.update(images.shape[0])
            yield orig8, recon8
        bar.close()

    rfid = None
    if inception is not None:
        from argen.evaluation.fid import reconstruction_fid

        rfid = float(reconstruction_fid(pairs(), inception, total=count, progress=False))
    else:
        for _ in pairs():
            pass
    tracker.check(final=True)
    if not psnrs:
        raise ArgenError("no image could be evaluated")
    metrics = {
        "psnr": float(np.concatenate(psnrs).mean()),
        "ssim": float(np.concatenate(ssims).mean()),
        "codebook_usage": float(used.sum()) / model.config.codebook_size,
        "codes_used": int(used.sum()),
        "codebook_size": model.config.codebook_size,
        "num_images": int(sum(len(p) for p in psnrs)),
        "skipped_images": tracker.failed,
        "image_size": image_size,
    }
    if lpips_values:
        metrics["lpips"] = float(np.concatenate(lpips_values).mean())
    if rfid is not None:
        metrics["rfid"] = rfid
    originals = np.concatenate(grid_orig)[:grid_count]
    reconstructions = np.concatenate(grid_recon)[:grid_count]
    return metrics, originals, reconstructions
