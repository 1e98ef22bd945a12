"""Tokenizer training: losses, LPIPS from local files, discriminator, and exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import argen
from argen.models.discriminator import PatchGANDiscriminator
from argen.models.lpips import LPIPS, vgg16_trunk
from argen.training.losses import hinge_d_loss, hinge_g_loss, psnr
from argen.training.tokenizer import TokenizerTrainConfig, train_tokenizer
from argen.utils.errors import ArgenError


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """A random VGG16 trunk in torchvision's layout and random LPIPS heads (no network)."""
    folder = tmp_path_factory.mktemp("lpips")
    g = torch.Generator().manual_seed(0)
    trunk = {f"features.{k}": torch.randn(v.shape, generator=g) * 0.05 for k, v in vgg16_trunk().state_dict().items()}
    trunk["classifier.0.weight"] = torch.zeros(2, 2)  # real files carry the classifier too; it is ignored
    torch.save(trunk, folder / "vgg16.pth")
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
             for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(heads, folder / "heads.pth")
    return folder / "vgg16.pth", folder / "heads.pth"


def test_lpips_matches_reference_package(lpips_files):
    import warnings

    import lpips as lpips_package

    vgg, heads = lpips_files
    ours = LPIPS(vgg, heads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips_package.LPIPS(net="vgg", pnet_rand=True, model_path=str(heads), verbose=False)
    state = torch.load(vgg)
    for s in range(1, 6):
        slice_ = getattr(ref.net, f"slice{s}")
        slice_.load_state_dict({k: state[f"features.{k}"] for k in slice_.state_dict()})
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    torch.testing.assert_close(ours(a, b), ref(a, b).flatten())
    assert float(ours(a, a).abs().max()) < 1e-6
    x = a.clone().requires_grad_(True)
    ours(x, b).sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in ours.parameters())


def test_lpips_rejects_wrong_files(tmp_path, lpips_files):
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ArgenError, match="VGG16"):
        LPIPS(tmp_path / "bad.pth")
    with pytest.raises(ArgenError, match="does not exist"):
        LPIPS(tmp_path / "missing.pth")
    with pytest.raises(ArgenError, match="lin0"):
        LPIPS(lpips_files[0], tmp_path / "bad.pth")


def test_discriminator_and_losses():
    disc = PatchGANDiscriminator(3, 16, 3)
    assert disc(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))
    assert float(hinge_g_loss(fake)) == pytest.approx(1.0)
    x = torch.zeros(1, 3, 4, 4)
    assert float(psnr(x, x + 0.2)) == pytest.approx(-10 * torch.log10(torch.tensor(0.01)).item(), rel=1e-4)


@pytest.fixture()
def one_thread():
    """Single-threaded CPU kernels, restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _cfg(out, lpips_files, **kw):
    vgg, heads = lpips_files
    base = dict(out=str(out), data="demo", config="VQ-tiny", image_size=16, batch_size=4, max_steps=8,
                vgg_weights=str(vgg), lpips_heads=str(heads), disc_start=3, ema=True, ema_decay=0.9,
                ckpt_every=1, log_every=1, seed=3, progress=False)
    base.update(kw)
    return TokenizerTrainConfig(**base)


def _state(out):
    return load_file(str(Path(out) / "tokenizer.safetensors"))


def test_train_writes_loadable_tokenizer_and_logs(tmp_path, lpips_files, one_thread):
    summary = train_tokenizer(_cfg(tmp_path / "run", lpips_files, max_steps=4, ema=False))
    assert summary["steps"] == 4 and summary["perceptual"]
    model = argen.load_tokenizer(tmp_path / "run")
    assert model.config.codebook_size == 512
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["psnr"] > 0 and 0 < r["codebook_usage"] <= 1 and r["images_per_s"] > 0 for r in records)
    assert records[-1]["d_loss"] > 0 and records[0].get("d_loss") is None  # GAN starts at disc_start
    with pytest.raises(ArgenError, match="--resume"):
        train_tokenizer(_cfg(tmp_path / "run", lpips_files, max_steps=4, ema=False))
    with pytest.raises(ArgenError, match="differ"):
        train_tokenizer(_cfg(tmp_path / "run", lpips_files, max_steps=4, ema=False, resume=True, lr=1e-3))


def test_sigkill_then_resume_gives_identical_weights(tmp_path, lpips_files):
    """A default run (no --deterministic) with two threads, killed and resumed in another process, ends
    bit-identical to a straight one."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(2)  # like the OMP_NUM_THREADS=2 subprocess (the 2-core default)
    try:
        _sigkill_then_resume(tmp_path, lpips_files)
    finally:
        torch.set_num_threads(old_threads)


def _sigkill_then_resume(tmp_path, lpips_files):
    full = tmp_path / "full"
    train_tokenizer(_cfg(full, lpips_files))
    killed = tmp_path / "killed"
    vgg, heads = lpips_files
    cmd = [sys.executable, "-m", "argen.cli.main", "train-tokenizer", "--data", "demo", "--config", "VQ-tiny",
           "--out", str(killed), "--max-steps", "8", "--image-size", "16", "--batch-size", "4",
           "--vgg-weights", str(vgg), "--lpips-heads", str(heads), "--disc-start", "3", "--ema", "--ema-decay",
           "0.9", "--ckpt-every", "1", "--log-every", "1", "--seed", "3", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after = 4  # killed somewhere after this step's log line: mid-step or between checkpoints
    log = killed / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "tokenizer.safetensors").exists()
    latest = (killed / "checkpoints" / "latest").read_text().strip()
    step_at_kill = torch.load(killed / "checkpoints" / latest, weights_only=True)["step"]
    assert kill_after - 1 <= step_at_kill < 8
    train_tokenizer(_cfg(killed, lpips_files, resume=True))
    a, b = _state(full), _state(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(x)["step"] for x in (killed / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # lines past the checkpoint are replaced, not repeated
    # and the run really trained: the weights moved away from a fresh model's
    fresh = argen.models.tokenizer.VQModel(argen.load_tokenizer(full).config).state_dict()
    assert any(not torch.equal(fresh[k], a[k]) for k in a if k in fresh and a[k].is_floating_point())


def test_restart_dead_codes_moves_only_unused_entries():
    from argen.models.tokenizer import VQModel, vq_config
    from argen.training.tokenizer import restart_dead_codes

    torch.manual_seed(0)
    model = VQModel(vq_config("VQ-tiny"))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    model.train()
    codes = model(images).codes.unique()
    before = model.quantize.embedding.weight.clone()
    moved = restart_dead_codes(model, images, seed=1)
    after = model.quantize.embedding.weight
    assert moved == 512 - codes.numel()
    changed = (after != before).any(dim=1)
    assert not changed[codes].any() and changed.sum() == moved
    latents = torch.nn.functional.normalize(model.encode_latents(images).permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    dists = torch.cdist(after[changed], latents).min(dim=1).values
    assert dists.max() < 0.01  # moved onto current encoder outputs


def _folder(root, good, bad):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(good):
        (root / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "a" / f"{i}.png")
    for i in range(bad):
        (root / "b").mkdir(parents=True, exist_ok=True)
        (root / "b" / f"bad{i}.jpg").write_bytes(b"corrupt")
    return root


def test_training_skips_bad_images_and_refuses_all_bad_data(tmp_path, one_thread):
    data = _folder(tmp_path / "mixed", good=6, bad=2)
    cfg = dict(config="VQ-tiny", image_size=16, batch_size=4, max_steps=4, vgg_weights="none", use_disc=False,
               progress=False, split="all")
    summary = train_tokenizer(TokenizerTrainConfig(out=str(tmp_path / "r1"), data=str(data), max_bad_fraction=0.5,
                                                   **cfg))
    assert summary["steps"] == 4 and summary["skipped_images"] >= 1
    with pytest.raises(ArgenError, match="failed to load"):
        train_tokenizer(TokenizerTrainConfig(out=str(tmp_path / "r2"), data=str(data), max_bad_fraction=0.01, **cfg))
    all_bad = _folder(tmp_path / "bad", good=0, bad=4)
    with pytest.raises(ArgenError, match="failed to load"):
        train_tokenizer(TokenizerTrainConfig(out=str(tmp_path / "r3"), data=str(all_bad), max_bad_fraction=1.0,
                                             **cfg))
    assert not (tmp_path / "r3" / "tokenizer.safetensors").exists()
