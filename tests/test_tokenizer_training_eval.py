"""Reconstruction metrics (PSNR, SSIM against a scipy reference) and `argen eval-tokenizer`."""

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from argen.checkpoint import save_tokenizer
from argen.cli.main import main
from argen.evaluation.recon_metrics import psnr_uint8, side_by_side, ssim_uint8
from argen.models.tokenizer import VQModel, vq_config


def _reference_ssim(a, b):
    """Wang et al. SSIM with a sigma-1.5 Gaussian, population covariance, border cropped (skimage's recipe)."""
    values = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        f = lambda z: gaussian_filter(z, 1.5, truncate=3.5)  # noqa: E731
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        values.append(s[5:-5, 5:-5].mean())
    return float(np.mean(values))


def test_ssim_matches_reference_and_psnr_formula():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 24, 30, 3), dtype=np.uint8)
    noise = rng.integers(-20, 21, a.shape)
    b = np.clip(a.astype(int) + noise, 0, 255).astype(np.uint8)
    ours = ssim_uint8(a, b)
    for i in range(3):
        assert ours[i] == pytest.approx(_reference_ssim(a[i], b[i]), abs=1e-9)
    assert np.allclose(ssim_uint8(a, a), 1.0)
    assert ours.max() < 0.99
    mse = ((a.astype(float) - b) ** 2).reshape(3, -1).mean(1)
    assert np.allclose(psnr_uint8(a, b), 10 * np.log10(255**2 / mse))
    assert psnr_uint8(a, a).tolist() == [100.0] * 3


def test_side_by_side_layout():
    orig = np.zeros((3, 4, 4, 3), np.uint8)
    recon = np.full((3, 4, 4, 3), 9, np.uint8)
    grid = side_by_side(orig, recon, per_row=2, pad=1)
    assert grid.shape == (2 * 2 * 5 + 1, 2 * 5 + 1, 3)
    assert (grid[1:5, 1:5] == 0).all() and (grid[6:10, 1:5] == 9).all()


def test_eval_tokenizer_cli(tmp_path, capsys):
    torch.manual_seed(0)
    model = VQModel(vq_config("VQ-tiny"))
    save_tokenizer(model, tmp_path / "tok")
    rc = main(["eval-tokenizer", "--tokenizer", str(tmp_path / "tok"), "--data", "demo", "--split", "val",
               "--out", str(tmp_path / "eval"), "--image-size", "16", "--max-images", "20", "--no-progress",
               "--vgg-weights", "none", "--grid", "4"])
    assert rc == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 20 and 0 < metrics["codebook_usage"] <= 1
    assert 0 < metrics["psnr"] < 100 and -1 <= metrics["ssim"] <= 1
    assert "lpips" not in metrics and "rfid" not in metrics  # no VGG16 weights, no --inception
    # recomputed here: center crops of the first 20 val images, encoded, decoded, clamped and rounded to uint8
    from argen.data.datasets import DemoDataset
    from argen.data.transforms import center_crop

    ds = DemoDataset("val")
    orig = np.stack([np.asarray(center_crop(ds.load(i), 16)) for i in range(20)])  # (20, 16, 16, 3) uint8
    x = torch.from_numpy(orig).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        decoded = model.decode(model.encode(x)).clamp(-1, 1)
    recon = ((decoded + 1) * 127.5).round().permute(0, 2, 3, 1).to(torch.uint8).numpy()
    mse = ((orig.astype(float) - recon) ** 2).reshape(20, -1).mean(1)
    assert metrics["psnr"] == pytest.approx(float(np.mean(10 * np.log10(255**2 / mse))), rel=1e-6)
    assert metrics["ssim"] == pytest.approx(float(np.mean([_reference_ssim(orig[i], recon[i]) for i in range(20)])),
                                            abs=1e-9)
    assert metrics["codes_used"] == model.encode(x).unique().numel()  # distinct codes over the set
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "eval" / "reconstructions.png").convert("RGB"))
    assert grid.shape == (2 * 16 + 3 * 2, 4 * 16 + 5 * 2, 3)  # one row of 4 originals above their reconstructions
    assert np.array_equal(grid[2:18, 2:18], orig[0]) and np.array_equal(grid[20:36, 2:18], recon[0])
    assert main(["eval-tokenizer", "--tokenizer", str(tmp_path / "none"), "--data", "demo",
                 "--out", str(tmp_path / "e2")]) == 2
