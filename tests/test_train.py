"""Generator trainer: end to end through the CLI, t2i, stage II, accumulation, bad input, save failures."""

import errno
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import argen
from argen.checkpoint import save_tokenizer
from argen.cli.main import main
from argen.data.codes import CodeShardWriter
from argen.data.text_features import save_text_features
from argen.models.tokenizer import VQModel, vq_config
from argen.training import checkpointing
from argen.training.generator import TrainConfig, param_groups, train
from argen.utils.errors import ArgenError


def make_codes(root, kind="c2i", n=24, grid=4, codebook=512, caption_dim=32, num_captions=None):
    """Codes whose tokens depend on the label, so a generator can learn them."""
    rng = np.random.default_rng(0)
    meta = {"kind": kind, "codebook_size": codebook, "grid": [grid, grid], "image_size": grid * 16, "num_augs": 2,
            "num_classes": 10}
    labels = rng.integers(0, 10, n)
    if kind == "t2i":
        num_captions = num_captions or n
        labels = np.arange(n) % num_captions
        feats = [torch.randn(3 + i % 4, caption_dim) for i in range(num_captions)]
        save_text_features(root / "text", feats, encoder="test")
        meta["text_features"] = "../text"
    writer = CodeShardWriter(root / "codes", meta)
    codes = (labels[:, None, None, None] * 37 + rng.integers(0, 3, (n, 2, grid, grid))) % codebook
    writer.write_shard(0, codes[: n // 2], labels[: n // 2])
    writer.write_shard(1, codes[n // 2:], labels[n // 2:])
    writer.finalize()
    return root / "codes"


def quick(codes, out, **kw):
    base = dict(codes=str(codes), out=str(out), config="GPT-tiny", max_steps=4, batch_size=8, lr=1e-2,
                log_every=1, tensorboard=False, progress=False, ckpt_every=2)
    base.update(kw)
    return TrainConfig(**base)


def weights(path):
    return load_file(str(path / "gpt.safetensors"))


def test_cli_trains_and_loss_falls(tmp_path):
    codes = make_codes(tmp_path)
    out = tmp_path / "run"
    rc = main(["train", "--codes", str(codes), "--config", "GPT-tiny", "--out", str(out), "--max-steps", "40",
               "--batch-size", "8", "--lr", "0.02", "--log-every", "1", "--no-progress", "--ckpt-every", "20"])
    assert rc == 0
    model = argen.load_gpt(out)
    assert model.config.kind == "c2i" and model.config.vocab_size == 512
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41))
    assert np.mean([r["loss"] for r in log[-5:]]) < log[0]["loss"] - 0.5
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000040.pt"
    assert list((out / "tb").iterdir())  # TensorBoard event file


def test_t2i_with_ema_and_sample_grid(tmp_path):
    codes = make_codes(tmp_path, kind="t2i", num_captions=6)
    tok_dir = tmp_path / "tok"
    torch.manual_seed(0)
    save_tokenizer(VQModel(vq_config("VQ-tiny")), tok_dir)  # downsample 2 -> use a 4x4 grid at image_size 8
    out = tmp_path / "run"
    result = train(quick(codes, out, ema=True, tokenizer=str(tok_dir), sample_every=2))
    assert result["kind"] == "t2i"
    ema, raw = weights(out), load_file(str(out / "raw" / "gpt.safetensors"))
    assert not torch.equal(ema["output.weight"], raw["output.weight"])
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]


def test_param_groups_decay_only_matrices():
    from argen.models.gpt import GPT, gpt_config

    groups = param_groups(GPT(gpt_config("GPT-tiny")), 0.05)
    assert groups[0]["weight_decay"] == 0.05 and all(p.ndim >= 2 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["params"] and all(p.ndim == 1 for p in groups[1]["params"])


def test_grad_accum_matches_full_batch(tmp_path):
    codes = make_codes(tmp_path)
    train(quick(codes, tmp_path / "a", dropout=0.0))
    train(quick(codes, tmp_path / "b", dropout=0.0, grad_accum=4))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert not torch.equal(a["output.weight"], torch.zeros_like(a["output.weight"]))


def test_stage_two_from_lower_resolution(tmp_path):
    small = make_codes(tmp_path / "s", grid=4)
    train(quick(small, tmp_path / "stage1"))
    big = make_codes(tmp_path / "b", grid=8)
    # lr 0: the one stage II step changes nothing, so its weights must be exactly stage I's
    train(quick(big, tmp_path / "stage2", image_size=128, init_from=str(tmp_path / "stage1"), max_steps=1, lr=0.0))
    model = argen.load_gpt(tmp_path / "stage2")
    assert model.config.image_size == 128 and model.config.grid_size == 8
    stage1, stage2 = weights(tmp_path / "stage1"), weights(tmp_path / "stage2")
    assert stage1.keys() == stage2.keys()
    assert all(torch.equal(stage1[k], stage2[k]) for k in stage1)
    assert stage1["output.weight"].abs().sum() > 0  # stage I trained away from the zero-initialised head


def test_bad_input_errors(tmp_path):
    codes = make_codes(tmp_path)
    with pytest.raises(ArgenError, match="codebook size 512"):
        train(quick(codes, tmp_path / "x", vocab_size=1024))  # an explicit flag that contradicts the codes
    with pytest.raises(ArgenError, match="grid"):
        train(quick(codes, tmp_path / "x", image_size=128))
    with pytest.raises(ArgenError, match="holds c2i codes"):
        train(quick(codes, tmp_path / "x", kind="t2i"))
    with pytest.raises(ArgenError, match="class labels up to"):
        train(quick(codes, tmp_path / "x", num_classes=2))
    with pytest.raises(ArgenError, match="divisible"):
        train(quick(codes, tmp_path / "x", batch_size=6, grad_accum=4))
    with pytest.raises(ArgenError, match="extract-codes"):
        train(quick(tmp_path / "none", tmp_path / "x"))
    assert main(["train", "--codes", str(codes), "--config", "GPT-mini", "--out", str(tmp_path / "z"),
                 "--max-steps", "1", "--vocab-size", "1024"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_resume_rejects_other_config(tmp_path):
    codes = make_codes(tmp_path)
    train(quick(codes, tmp_path / "run"))
    with pytest.raises(ArgenError, match="different generator config"):
        train(quick(codes, tmp_path / "run", resume=True, max_steps=6, dropout=0.0))
    with pytest.raises(ArgenError, match="different settings"):
        train(quick(codes, tmp_path / "run", resume=True, max_steps=6, batch_size=4))
    with pytest.raises(ArgenError, match="--resume"):
        train(quick(codes, tmp_path / "run", max_steps=6))


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    codes = make_codes(tmp_path)
    out = tmp_path / "run"
    train(quick(codes, out, max_steps=2))
    good = (out / "checkpoints" / "step-00000002.pt").read_bytes()

    def full_disk(state, path):
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing, "write_state", full_disk)
    with pytest.raises(ArgenError, match="no space left"):
        train(quick(codes, out, max_steps=6, resume=True))
    ckpt_dir = out / "checkpoints"
    assert (ckpt_dir / "latest").read_text().strip() == "step-00000002.pt"
    assert (ckpt_dir / "step-00000002.pt").read_bytes() == good
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "step-00000002.pt"]
    monkeypatch.undo()
    result = train(quick(codes, out, max_steps=6, resume=True))  # the finished work is still there
    assert result["steps"] == 6


def test_logged_throughput_counts_each_interval_once(tmp_path, monkeypatch):
    """tokens_per_s covers the steps since the previous record; with progress bars off it used to divide one
    interval's time into every step since the start, so the logged rate grew with the step."""
    import types

    from argen.training import generator

    clock = iter(range(10 ** 6))  # every reading of the trainer's clock is one second after the last
    monkeypatch.setattr(generator, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    codes = make_codes(tmp_path)
    train(quick(codes, tmp_path / "run", max_steps=12, log_every=3, ckpt_every=100))
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == [1, 3, 6, 9, 12]
    tokens_per_step = 8 * 16
    assert [r["tokens_per_s"] for r in records] == [tokens_per_step * (b - a) for a, b in zip([0] + steps, steps)]
