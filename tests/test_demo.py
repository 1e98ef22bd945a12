"""`argen demo` on a slice of the emoji set with a given (untrained) tokenizer: every stage runs, the
report embeds images that exist, and a second run reuses the finished stages."""

import json
import re

import numpy as np
import torch

from argen.checkpoint import save_tokenizer
from argen.cli.main import main
from argen.models.tokenizer import VQModel, vq_config
from argen.training.demo import class_match, color_features


def test_class_match_prefers_own_colour():
    red = np.zeros((4, 8, 8, 3), np.uint8)
    red[..., 0] = 220
    blue = np.zeros((4, 8, 8, 3), np.uint8)
    blue[..., 2] = 220
    feats = color_features(np.concatenate([red, blue]))
    centroids = np.stack([feats[:4].mean(0), feats[4:].mean(0)])
    assert class_match(feats, np.array([0] * 4 + [1] * 4), centroids) == 1.0
    assert class_match(feats, np.array([1] * 4 + [0] * 4), centroids) == 0.0
    white = np.full((1, 8, 8, 3), 255, np.uint8)
    assert color_features(white).sum() == 0  # background is ignored


def test_demo_tokenizer_norms_keep_colour():
    """No GroupNorm of the demo tokenizer normalises a channel on its own: at 8 full-resolution channels and 8
    groups it acted as an instance norm, removed each channel's per-image mean, and the reconstructions lost
    their colours (reds came out brown)."""
    model = VQModel(vq_config("VQ-demo"))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_channels // m.num_groups >= 2 for m in norms)
    assert {m.num_channels for m in norms} >= {8}  # the full-resolution stages are among them


def test_demo_end_to_end_and_reuse(tmp_path, capsys):
    torch.manual_seed(0)
    save_tokenizer(VQModel(vq_config("VQ-demo")), tmp_path / "tok")
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--tokenizer", str(tmp_path / "tok"), "--limit", "48", "--c2i-steps", "3",
            "--t2i-steps", "3", "--samples-per-class", "1", "--batch-size", "8", "--device", "cpu"]
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(images) == 3 and all((out / p).is_file() for p in images)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["c2i_class_match"] <= 1.0 and metrics["c2i_loss_curve"][-1][0] == 3
    weights = (out / "gpt-c2i" / "gpt.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    assert "reusing" in capsys.readouterr().out
    assert (out / "gpt-c2i" / "gpt.safetensors").stat().st_mtime_ns == weights
