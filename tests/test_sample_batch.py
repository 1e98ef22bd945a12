"""`argen sample-batch`: per-image determinism across world sizes and batch sizes (the seed rule of
`argen sample`), resumable shards (corrupt ones redone), labels, resizing, the ADM npz contract, flag
checks, the run lock, and the end-to-end sample-batch -> evaluate run with a random-weight Inception."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import argen
import argen.evaluation.pipeline as pipeline
from argen.cli.main import main
from argen.evaluation.sample_batch import SampleBatchConfig, class_labels, resize_images, sample_batch
from argen.models.gpt import GPT, gpt_config
from argen.models.tokenizer import VQModel, vq_config
from argen.sampling import SamplingParams, image_seed
from argen.utils.errors import ArgenError
from argen.utils.images import to_uint8
from conftest import randomize


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    tokenizer = VQModel(vq_config("VQ-tiny")).eval()
    # 4x4 = 16 tokens, 8x8 images; random weights everywhere (a fresh GPT's zero output head would make the
    # samples ignore the class and the guidance scale)
    gpt = randomize(GPT(gpt_config("GPT-tiny", image_size=8, downsample=2)), seed=0)
    return tokenizer, gpt


SAMPLING = SamplingParams(top_k=50, cfg_scale=1.5)


def config(**overrides):
    base = dict(num_samples=10, batch_size=3, shard_size=4, eval_size=12, sampling=SAMPLING, seed=7)
    return SampleBatchConfig(**{**base, **overrides})


def seeded(first, count, seed=7):
    return [torch.Generator().manual_seed(image_seed(seed, i)) for i in range(first, first + count)]


def load(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.mark.repro
def test_same_images_whatever_the_world_size(tmp_path, models):
    single = load(sample_batch(*models, config(), tmp_path / "one", progress=False))
    for rank in (2, 1):
        assert sample_batch(*models, config(), tmp_path / "three", rank=rank, world_size=3, progress=False) is None
    three = load(sample_batch(*models, config(), tmp_path / "three", rank=0, world_size=3, progress=False))
    assert single["arr_0"].shape == (10, 12, 12, 3) and single["arr_0"].dtype == np.uint8
    assert np.array_equal(single["arr_0"], three["arr_0"]) and np.array_equal(single["arr_1"], three["arr_1"])
    assert np.array_equal(single["arr_1"], np.arange(10) % 10)
    assert len({single["arr_0"][i].tobytes() for i in range(10)}) == 10


def test_first_batch_is_generate_then_decode_then_resize_then_uint8(tmp_path, models):
    tokenizer, gpt = models
    out = load(sample_batch(tokenizer, gpt, config(num_samples=3), tmp_path, progress=False))

    def by_hand(classes, cfg_scale=1.5):  # image i has its own generator, seeded with image_seed(7, i)
        codes = argen.generate(gpt, classes, cfg_scale=cfg_scale, top_k=50, row_generators=seeded(0, 3))
        decoded = tokenizer.decode(codes.view(3, 4, 4))
        return F.interpolate(decoded, size=(12, 12), mode="bicubic", antialias=True)

    resized = by_hand(torch.arange(3))
    want = ((resized.clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(out["arr_0"].astype(int) - want.astype(int)).max() <= 1  # round-half-even vs half-up only
    assert np.array_equal(out["arr_0"], to_uint8(resized))
    # the comparison is sensitive to the classes and to the guidance scale
    assert not np.array_equal(out["arr_0"], to_uint8(by_hand(torch.arange(3) + 3)))
    assert not np.array_equal(out["arr_0"], to_uint8(by_hand(torch.arange(3), cfg_scale=1.0)))


def test_resume_generates_only_missing_shards(tmp_path, models, monkeypatch):
    first = load(sample_batch(*models, config(), tmp_path, progress=False))
    (tmp_path / "shards" / "shard_00001.npz").unlink()
    (tmp_path / "samples.npz").unlink()
    calls = []
    real = pipeline.generate

    def counting(gpt, cond, *args, **kwargs):
        calls.append(cond.shape[0])
        return real(gpt, cond, *args, **kwargs)

    monkeypatch.setattr(pipeline, "generate", counting)
    again = load(sample_batch(*models, config(), tmp_path, progress=False))
    assert calls == [3, 1]  # shard 1 = images 4..7, in batches of 3 from its first index
    assert np.array_equal(first["arr_0"], again["arr_0"])


def test_resuming_with_another_config_is_refused(tmp_path, models):
    sample_batch(*models, config(num_samples=4), tmp_path, progress=False)
    with pytest.raises(ArgenError, match="another config"):
        sample_batch(*models, config(num_samples=4, sampling=SamplingParams(top_k=50, cfg_scale=2.0)), tmp_path,
                     progress=False)


def test_class_balanced_labels_and_class_range(tmp_path, models):
    counts = np.bincount(class_labels(50000, 1000))
    assert counts.min() == counts.max() == 50
    with pytest.raises(ArgenError, match="num-classes"):
        sample_batch(*models, config(num_classes=11), tmp_path, progress=False)


@pytest.mark.repro
def test_images_do_not_depend_on_the_batch_size_and_the_seed_rule_is_recorded(tmp_path, models):
    three = load(sample_batch(*models, config(), tmp_path / "b3", progress=False))
    five = load(sample_batch(*models, config(batch_size=5), tmp_path / "b5", progress=False))
    assert np.array_equal(three["arr_0"], five["arr_0"])
    record = json.loads((tmp_path / "b3" / "config.json").read_text())
    assert record["seed_rule"].startswith("image_seed") and "batch_size" not in record["config"]
    assert record["config"]["sampling"] == SAMPLING.to_dict()
    # a run written before the seed rule was recorded (per-batch seeds) is refused, not mixed in
    del record["seed_rule"]
    (tmp_path / "b3" / "config.json").write_text(json.dumps(record))
    with pytest.raises(ArgenError, match="another config"):
        sample_batch(*models, config(), tmp_path / "b3", progress=False)


def test_resize_modes():
    x = torch.rand(2, 3, 24, 24) * 2 - 1
    plain = resize_images(x, 16, "bicubic")
    assert torch.equal(plain, F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False))
    smooth = resize_images(x, 16, "bicubic-antialias")
    assert smooth.shape == (2, 3, 16, 16) and not torch.allclose(plain, smooth)
    assert resize_images(x, 24, "bicubic") is x and resize_images(x, None, "bicubic") is x


def test_text_conditional_batches_cycle_over_caption_rows(tmp_path):
    torch.manual_seed(1)
    tokenizer = VQModel(vq_config("VQ-tiny")).eval()
    gpt = randomize(GPT(gpt_config("GPT-tiny", kind="t2i", image_size=8, downsample=2)), seed=1)
    features = torch.randn(3, gpt.config.caption_len, gpt.config.caption_dim)
    mask = torch.ones(3, gpt.config.caption_len)
    mask[0, :5] = 0
    features = features * mask[..., None]
    out = load(sample_batch(tokenizer, gpt, config(num_samples=5, eval_size=None), tmp_path, features, mask,
                            progress=False))
    assert out["arr_0"].shape == (5, 8, 8, 3) and np.array_equal(out["prompt_index"], [0, 1, 2, 0, 1])

    def by_hand(rows, first):  # one batch of config(): cfg 1.5, top-k 50, image i seeded with image_seed(7, i)
        codes = argen.generate(gpt, features[rows], mask[rows], cfg_scale=1.5, top_k=50,
                               row_generators=seeded(first, len(rows)))
        return to_uint8(tokenizer.decode(codes.view(len(rows), 4, 4)))

    assert np.array_equal(out["arr_0"][:3], by_hand([0, 1, 2], 0))  # batch 0: images 0-2, captions 0-2
    assert np.array_equal(out["arr_0"][4:], by_hand([1], 4))  # shard 1 starts at image 4, caption 4 % 3
    assert not np.array_equal(out["arr_0"][:3], by_hand([1, 2, 0], 0))  # the captions matter
    with pytest.raises(ArgenError, match="features"):
        sample_batch(tokenizer, gpt, config(num_samples=5), tmp_path / "x", progress=False)


@pytest.fixture()
def checkpoint_dir(tmp_path, models):
    argen.save_tokenizer(models[0], tmp_path / "ckpt")
    argen.save_gpt(models[1], tmp_path / "ckpt")
    return tmp_path / "ckpt"


def cli_args(ckpt, out, *extra):
    return ["sample-batch", "--tokenizer", str(ckpt), "--gpt", str(ckpt), "--device", "cpu", "--num-samples", "6",
            "--batch-size", "4", "--shard-size", "4", "--eval-size", "16", "--top-k", "100", "--seed", "3",
            "--out", str(out), "--quiet", *extra]


def test_cli_ranks_from_torchrun_environment(tmp_path, checkpoint_dir, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(cli_args(checkpoint_dir, tmp_path / "out", "--png")) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir()) == ["shard_00001.npz"]
    assert sorted(p.name for p in (tmp_path / "out" / "png").iterdir()) == ["000004.png", "000005.png"]
    assert not (tmp_path / "out" / "samples.npz").exists()
    monkeypatch.setenv("RANK", "0")
    assert main(cli_args(checkpoint_dir, tmp_path / "out")) == 0
    assert load(tmp_path / "out" / "samples.npz")["arr_0"].shape == (6, 16, 16, 3)
    monkeypatch.setenv("RANK", "5")
    assert main(cli_args(checkpoint_dir, tmp_path / "out")) == 2
    assert "RANK" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_on_the_demo_set_with_random_inception(tmp_path, checkpoint_dir, capsys):
    args = cli_args(checkpoint_dir, tmp_path / "samples")
    args[args.index("--eval-size") + 1] = "64"  # the demo images are 64x64
    assert main(args) == 0
    results = tmp_path / "results.json"
    code = main(["evaluate", "demo", str(tmp_path / "samples" / "samples.npz"), "--reference-limit", "6",
                 "--inception", "random", "--out", str(results), "--quiet", "--device", "cpu", "--fid-method", "eigh"])
    err = capsys.readouterr().err
    assert code == 0 and "RANDOM-WEIGHT" in err
    data = json.loads(results.read_text())
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert isinstance(data[key], float) and np.isfinite(data[key])
    assert data["fid"] > 0 and data["sfid"] > 0 and data["inception_score"] >= 1.0
    assert 0 <= data["precision"] <= 1 and 0 <= data["recall"] <= 1
    assert data["num_samples"] == data["num_reference"] == 6 and data["image_size"] == [64, 64]
    assert data["inception_weights"]["random"] is True and "NOT FIDs" in data["warning"]
    assert data["fid_method"] == "eigh" and data["sample_statistics"] == "computed"


def test_rank_0_reports_missing_shards_of_dead_ranks(tmp_path, models):
    from argen.evaluation.sample_batch import assemble_batch

    sample_batch(*models, config(), tmp_path, rank=0, world_size=2, progress=False, assemble=False)
    with pytest.raises(ArgenError, match="1 shard\\(s\\) .* missing \\(e.g. shard 1\\)"):
        assemble_batch(tmp_path, 10, 12, 4, "c2i", wait_timeout=0.2, progress=False)
    assert not (tmp_path / "samples.npz").exists()
    out = load(sample_batch(*models, config(), tmp_path, progress=False))  # rerun with one process finishes it
    assert out["arr_0"].shape == (10, 12, 12, 3)


def test_cli_takes_a_text_feature_folder_padded_to_the_generators_caption_length(tmp_path):
    from argen.data.text_features import save_text_features

    torch.manual_seed(2)
    gpt = GPT(gpt_config("GPT-tiny", kind="t2i", image_size=8, downsample=2)).eval()
    argen.save_tokenizer(VQModel(vq_config("VQ-tiny")).eval(), tmp_path / "ckpt")
    argen.save_gpt(gpt, tmp_path / "ckpt")
    dim, length = gpt.config.caption_dim, gpt.config.caption_len
    save_text_features(tmp_path / "text", [torch.randn(2, dim), torch.randn(3, dim)])  # longest caption 3 < 8
    assert main(cli_args(tmp_path / "ckpt", tmp_path / "out", "--features", str(tmp_path / "text"))) == 0
    out = load(tmp_path / "out" / "samples.npz")
    assert out["arr_0"].shape == (6, 16, 16, 3) and np.array_equal(out["prompt_index"], [0, 1, 0, 1, 0, 1])
    assert length > 3


def test_resuming_with_other_caption_features_is_refused(tmp_path):
    torch.manual_seed(3)
    tokenizer = VQModel(vq_config("VQ-tiny")).eval()
    gpt = GPT(gpt_config("GPT-tiny", kind="t2i", image_size=8, downsample=2)).eval()
    features = torch.randn(2, gpt.config.caption_len, gpt.config.caption_dim)
    mask = torch.ones(2, gpt.config.caption_len)
    sample_batch(tokenizer, gpt, config(num_samples=4, eval_size=None), tmp_path, features, mask, progress=False)
    again = sample_batch(tokenizer, gpt, config(num_samples=4, eval_size=None), tmp_path, features.clone(),
                         mask.clone(), progress=False)
    assert load(again)["arr_0"].shape == (4, 8, 8, 3)
    with pytest.raises(ArgenError, match="another config"):
        sample_batch(tokenizer, gpt, config(num_samples=4, eval_size=None), tmp_path, features + 1, mask,
                     progress=False)


# ------------------------------------------------------------------------- issue 10: faults and defaults
def test_a_truncated_shard_is_named_and_made_again(tmp_path, models, capsys):
    first = load(sample_batch(*models, config(), tmp_path, progress=False))
    shard = tmp_path / "shards" / "shard_00001.npz"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated: np.load raises zipfile.BadZipFile
    (tmp_path / "samples.npz").unlink()
    again = load(sample_batch(*models, config(), tmp_path, progress=False))
    assert np.array_equal(first["arr_0"], again["arr_0"])
    err = capsys.readouterr().err
    assert "shard_00001.npz is unreadable (BadZipFile" in err and "making it again" in err


def test_a_full_disk_while_assembling_is_one_line_and_leaves_no_partial_file(tmp_path, models, monkeypatch):
    import errno

    from argen.evaluation.npz import NpzImageWriter

    sample_batch(*models, config(), tmp_path, progress=False, assemble=False)

    def full(self, images):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(NpzImageWriter, "write", full)
    from argen.evaluation.sample_batch import assemble_batch

    with pytest.raises(ArgenError, match="no space left on device while writing .*samples.npz") as info:
        assemble_batch(tmp_path, 10, 12, 4, "c2i", progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "samples.npz").exists() and not list(tmp_path.glob(".samples.npz*"))


def test_num_classes_must_be_positive_and_eval_size_defaults_to_the_image_size(tmp_path, models):
    with pytest.raises(ArgenError, match="--num-classes must be >= 1"):
        sample_batch(*models, config(num_classes=0), tmp_path / "zero", progress=False)
    out = load(sample_batch(*models, config(num_samples=2, eval_size=None), tmp_path / "native", progress=False))
    assert out["arr_0"].shape == (2, 8, 8, 3)  # GPT-tiny here makes 8x8 images
    assert SampleBatchConfig().eval_size is None


def test_schedules_reach_sample_batch(tmp_path, models):
    plain = load(sample_batch(*models, config(num_samples=3), tmp_path / "c", progress=False))
    linear = SamplingParams(top_k=50, cfg_scale=1.5, cfg_schedule="linear")
    ramped = load(sample_batch(*models, config(num_samples=3, sampling=linear), tmp_path / "l", progress=False))
    assert not np.array_equal(plain["arr_0"], ramped["arr_0"])
    assert json.loads((tmp_path / "l" / "config.json").read_text())["config"]["sampling"]["cfg_schedule"] == "linear"


@pytest.mark.repro
def test_sample_batch_images_are_argen_sample_images(tmp_path, models):
    from argen.evaluation.pipeline import class_conditions, sample_to_folder

    tokenizer, gpt = models
    batch = load(sample_batch(tokenizer, gpt, config(num_samples=4, num_classes=4, eval_size=None), tmp_path / "b",
                              progress=False))
    sample_to_folder(tokenizer, gpt, class_conditions(torch.arange(4), gpt), SAMPLING, tmp_path / "s", seed=7,
                     batch_size=2)
    from PIL import Image

    pngs = sorted((tmp_path / "s").glob("0*.png"))
    assert np.array_equal(np.stack([np.asarray(Image.open(p)) for p in pngs]), batch["arr_0"])


def test_a_second_writer_is_refused_while_the_first_holds_the_run_lock(tmp_path, models):
    import subprocess
    import sys

    from argen.utils.io import lock_path

    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock_path(tmp_path / 'run'))!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ArgenError, match="in use by"):
            sample_batch(*models, config(), tmp_path / "run", progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "run" / "shards").exists()


@pytest.mark.parametrize("flag,value", [("--num-classes", "0"), ("--num-samples", "0"), ("--batch-size", "-1"),
                                        ("--shard-size", "nan"), ("--eval-size", "-1"), ("--cfg-scale", "inf"),
                                        ("--top-p", "0"), ("--temperature", "nan"), ("--seed", "-1")])
def test_cli_numeric_flags_exit_2(tmp_path, checkpoint_dir, capsys, flag, value):
    try:
        code = main(cli_args(checkpoint_dir, tmp_path / "out", f"{flag}={value}"))
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and f"argument {flag}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_progress_flags(tmp_path, checkpoint_dir, capsys):
    assert main(cli_args(checkpoint_dir, tmp_path / "a", "--progress")) == 0
    assert "sample-batch rank 0/1" in capsys.readouterr().err
    args = [a for a in cli_args(checkpoint_dir, tmp_path / "b") if a != "--quiet"]
    assert main([*args, "--no-progress"]) == 0
    assert "sample-batch rank" not in capsys.readouterr().err
