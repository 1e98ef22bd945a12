"""`argen sample` end to end on tiny checkpoints in the released format, and its error handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import argen
from argen.cli.main import main
from conftest import save_released, tiny_gpt, tiny_tokenizer


@pytest.fixture
def released(tmp_path):
    tok = save_released(tiny_tokenizer(), tmp_path / "vq.pt")
    c2i = save_released(tiny_gpt("c2i"), tmp_path / "c2i.pt")
    t2i = save_released(tiny_gpt("t2i"), tmp_path / "t2i.pt")
    return tmp_path, tok, c2i, t2i


def released_flags(tok, gpt, kind):
    return ["--tokenizer", str(tok), "--tokenizer-config", "VQ-tiny-16", "--gpt", str(gpt), "--gpt-config",
            "GPT-tiny", "--kind", kind, "--image-size", "64", "--device", "cpu"]


def test_sample_c2i_writes_pngs_grid_and_codes(released, capsys):
    tmp, tok, c2i, _ = released
    out = tmp / "out"
    rc = main(["sample", *released_flags(tok, c2i, "c2i"), "--classes", "1,2,3", "--top-k", "1", "--seed", "5",
               "--batch-size", "2", "--save-codes", "--out", str(out)])
    assert rc == 0
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == ["00000_class1.png", "00001_class2.png", "00002_class3.png"]
    assert Image.open(out / pngs[0]).size == (64, 64)
    assert (out / "grid.png").is_file()
    codes = np.load(out / "codes.npy")
    assert codes.shape == (3, 16) and codes.dtype == np.int64
    # the saved codes are what the library generates for the same settings (greedy, cfg 4.0 default)
    gpt = argen.load_gpt(c2i, config="GPT-tiny", kind="c2i", image_size=64, downsample=16)
    expected = argen.generate(gpt, torch.tensor([1, 2]), cfg_scale=4.0, top_k=1)
    assert np.array_equal(codes[:2], expected.numpy())
    assert "sampled 3 images" in capsys.readouterr().out


def test_sample_t2i_from_feature_file(released):
    tmp, tok, _, t2i = released
    cfg = tiny_gpt("t2i").config
    feats = np.random.default_rng(0).normal(size=(2, cfg.caption_len, cfg.caption_dim)).astype(np.float32)
    mask = np.zeros((2, cfg.caption_len), np.float32)
    mask[:, -3:] = 1
    np.savez(tmp / "caps.npz", features=feats * mask[..., None], mask=mask)
    out = tmp / "t2i_out"
    rc = main(["sample", *released_flags(tok, t2i, "t2i"), "--features", str(tmp / "caps.npz"), "--out", str(out),
               "--save-codes"])
    assert rc == 0
    assert np.load(out / "codes.npy").shape == (2, 16)


def test_sample_works_with_argen_checkpoints(tmp_path):
    argen.save_tokenizer(tiny_tokenizer(), tmp_path / "tok")
    argen.save_gpt(tiny_gpt("c2i"), tmp_path / "gpt")
    rc = main(["sample", "--tokenizer", str(tmp_path / "tok"), "--gpt", str(tmp_path / "gpt"), "--classes", "0",
               "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert rc == 0 and (tmp_path / "o" / "00000_class0.png").is_file()


@pytest.mark.parametrize("extra,message", [
    (["--classes", "1,99"], "class ids must lie in [0, 9]"),
    (["--classes", "1,x"], "comma-separated integers"),
    (["--classes", "1", "--cfg-scale", "-1"], "cfg_scale must be >= 0"),
    (["--classes", "1", "--top-p", "0"], "top_p must lie in (0, 1]"),
    (["--classes", "1", "--top-k", "-3"], "top_k must be an integer >= 0"),
    (["--classes", "1", "--temperature", "0"], "temperature must be > 0"),
    (["--classes", "1", "--dtype", "fp8"], "unknown dtype"),
])
def test_bad_input_is_one_line_and_exit_2(released, capsys, extra, message):
    tmp, tok, c2i, _ = released
    rc = main(["sample", *released_flags(tok, c2i, "c2i"), *extra, "--out", str(tmp / "x")])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_wrong_checkpoint_and_corrupt_file(released, capsys):
    tmp, tok, c2i, t2i = released
    assert main(["sample", *released_flags(tok, t2i, "c2i"), "--classes", "1", "--out", str(tmp / "x")]) == 2
    assert "does not match generator config 'GPT-tiny'" in capsys.readouterr().err
    broken = tmp / "broken.pt"
    broken.write_bytes(c2i.read_bytes()[:5000])
    assert main(["sample", *released_flags(tok, broken, "c2i"), "--classes", "1", "--out", str(tmp / "x")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert main(["sample", *released_flags(tok, c2i, "c2i"), "--gpt-config", "GPT-Z", "--classes", "1"]) == 2
    assert "unknown generator config 'GPT-Z'" in capsys.readouterr().err


def test_features_of_wrong_width(released, capsys):
    tmp, tok, _, t2i = released
    cfg = tiny_gpt("t2i").config
    np.savez(tmp / "bad.npz", features=np.zeros((1, cfg.caption_len, 5), np.float32),
             mask=np.ones((1, cfg.caption_len), np.float32))
    rc = main(["sample", *released_flags(tok, t2i, "t2i"), "--features", str(tmp / "bad.npz")])
    assert rc == 2 and "width 5 but the model expects 32" in capsys.readouterr().err


def test_image_size_not_multiple_of_downsample(released, capsys):
    tmp, tok, c2i, _ = released
    flags = released_flags(tok, c2i, "c2i")
    flags[flags.index("--image-size") + 1] = "70"
    assert main(["sample", *flags, "--classes", "1"]) == 2
    assert "not a multiple of the downsample factor 16" in capsys.readouterr().err
