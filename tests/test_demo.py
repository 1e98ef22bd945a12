"""`argen demo` on a slice of the emoji set with a given (untrained) tokenizer: every stage runs, the
report embeds images that exist, and a second run reuses the finished stages."""

import json
import re

import numpy as np
import pytest
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
    assert len(images) == 5 and all((out / p).is_file() for p in images)  # with the bundled generators' two
    assert "images/bundled_c2i_samples.png" in images and "argen serve" in report
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["c2i_classifier_accuracy"] <= 1.0 and metrics["c2i_loss_curve"][-1][0] == 3
    assert 0.0 <= metrics["bundled"]["c2i_classifier_accuracy"] <= 1.0
    assert metrics["bundled"]["sampling"]["c2i"]["top_k"] == 50  # the bundled generator's own settings
    weights = (out / "gpt-c2i" / "gpt.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    assert "reusing" in capsys.readouterr().out
    assert (out / "gpt-c2i" / "gpt.safetensors").stat().st_mtime_ns == weights


def test_scorer_scores_real_images_as_the_classifier_does():
    """The report's c2i score on real images is the classifier's accuracy; the t2i score gives the reference
    images of each prompt their own prompt, and mislabelled ones score lower."""
    from argen.data.datasets import DemoDataset
    from argen.training.demo import PROMPTS, DemoScorer, mean_scores

    train, val = DemoDataset("train"), DemoDataset("val")
    scorer = DemoScorer(train)
    real = scorer.real(val.images, val.labels)
    assert real["accuracy"] == pytest.approx(scorer.info["val_accuracy"], abs=0.005)
    rows = [i for refs in scorer.prompt_refs for i in refs]
    ids = np.array([k for k, refs in enumerate(scorer.prompt_refs) for _ in refs])
    own = scorer.t2i(train.images[rows], ids)
    assert own["match"] >= 0.9 and len(own["per_prompt"]) == len(PROMPTS)
    shifted = scorer.t2i(train.images[rows], (ids + 1) % len(PROMPTS))
    assert shifted["match"] <= 0.2
    both = mean_scores([own, shifted])
    assert both["match"] == pytest.approx((own["match"] + shifted["match"]) / 2)
    assert both["per_prompt"][0] == pytest.approx((own["per_prompt"][0] + shifted["per_prompt"][0]) / 2)


def test_bundled_tokenizer_reconstructs_and_is_copied_into_the_run(tmp_path):
    from argen.checkpoint import load_tokenizer
    from argen.data.datasets import DemoDataset
    from argen.evaluation.recon_metrics import psnr_uint8
    from argen.training.demo import CPU_PLAN, DEMO_TOKENIZER, stage_tokenizer
    from argen.utils.errors import ArgenError
    from argen.utils.images import from_uint8, to_uint8
    from argen.utils.io import sha256_file

    tok_dir = stage_tokenizer(tmp_path, CPU_PLAN, 0, None, progress=False)
    assert sha256_file(tok_dir / "tokenizer.safetensors") == sha256_file(DEMO_TOKENIZER)
    tokenizer = load_tokenizer(tok_dir)
    val = DemoDataset("val").images[::4]
    with torch.no_grad():
        recon = to_uint8(tokenizer.decode(tokenizer.encode(from_uint8(val)).view(-1, 8, 8)))
    assert float(psnr_uint8(val[None], recon[None])[0]) >= 19.5
    with pytest.raises(ArgenError, match="holds the bundled tokenizer"):
        stage_tokenizer(tmp_path, CPU_PLAN, 0, None, progress=False, train=True)


def test_demo_refuses_to_mix_tokenizers_and_bad_flag_pairs(tmp_path, capsys):
    torch.manual_seed(0)
    save_tokenizer(VQModel(vq_config("VQ-demo")), tmp_path / "tok-a")
    save_tokenizer(VQModel(vq_config("VQ-demo")), tmp_path / "tok-b")
    out = tmp_path / "demo"
    base = ["demo", "--out", str(out), "--limit", "16", "--c2i-steps", "1", "--t2i-steps", "1",
            "--samples-per-class", "1", "--batch-size", "4", "--device", "cpu", "--no-progress"]
    assert main(base + ["--tokenizer", str(tmp_path / "tok-a")]) == 0
    capsys.readouterr()
    assert main(base + ["--tokenizer", str(tmp_path / "tok-b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "made with the tokenizer" in err and "tok-a" in err and len(err.splitlines()) == 1
    assert main(base + ["--tokenizer-steps", "5"]) == 2
    assert "needs --train-tokenizer" in capsys.readouterr().err
    assert main(base + ["--tokenizer", str(tmp_path / "tok-a"), "--train-tokenizer"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_fastest_threads_picks_the_faster_count_and_sets_it(monkeypatch):
    from argen.training import demo

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(demo, "_probe_seconds", lambda n: {4: 0.30, 1: 0.12}[n])  # busy: waiting threads
        assert demo.fastest_threads(4) == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(demo, "_probe_seconds", lambda n: {4: 0.05, 1: 0.12}[n])  # idle: more is faster
        assert demo.fastest_threads(4) == 4 and torch.get_num_threads() == 4
        monkeypatch.setattr(demo, "_probe_seconds", lambda n: {4: 0.13, 1: 0.12}[n])  # within noise: keep them all
        assert demo.fastest_threads(4) == 4
        assert demo.fastest_threads(1) == 1
    finally:
        torch.set_num_threads(before)
