"""`argen sample` end to end on tiny checkpoints (released and argen formats): conditions (class ids,
prompts through MiniLM, feature files and folders), per-image seeds, progress bars and error handling."""

from __future__ import annotations

import io
import json

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
               "--save-codes", "--top-k", "1"])
    assert rc == 0
    codes = np.load(out / "codes.npy")
    assert codes.shape == (2, 16)
    # the codes are the greedy samples of these captions (cfg 7.5, the t2i default), not of other ones
    gpt = argen.load_gpt(t2i, config="GPT-tiny", kind="t2i", image_size=64, downsample=16)
    cond, cond_mask = torch.from_numpy(feats * mask[..., None]), torch.from_numpy(mask)
    assert np.array_equal(codes, argen.generate(gpt, cond, cond_mask, cfg_scale=7.5, top_k=1).numpy())
    assert not np.array_equal(codes, argen.generate(gpt, cond.flip(0), cond_mask, cfg_scale=7.5, top_k=1).numpy())


def test_sample_works_with_argen_checkpoints(tmp_path):
    argen.save_tokenizer(tiny_tokenizer(), tmp_path / "tok")
    argen.save_gpt(tiny_gpt("c2i"), tmp_path / "gpt")
    rc = main(["sample", "--tokenizer", str(tmp_path / "tok"), "--gpt", str(tmp_path / "gpt"), "--classes", "0",
               "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert rc == 0 and (tmp_path / "o" / "00000_class0.png").is_file()


def exit_code(argv) -> int:
    """main()'s status, also for argparse's own errors (SystemExit(2) after its usage line)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("extra,message", [
    (["--classes", "1,99"], "class ids must lie in [0, 9]"),
    (["--classes", "1,x"], "comma-separated integers"),
    (["--classes", "1,,2"], "--classes has an empty item in '1,,2'"),
    (["--classes", "1,2,"], "--classes has an empty item"),
    (["--classes", " , "], "--classes is empty"),
    (["--classes", "1", "--cfg-scale", "-1"], "cfg_scale must lie in [0, 10000], got -1.0"),
    (["--classes", "1", "--cfg-scale", "1e308"], "cfg_scale must lie in [0, 10000], got 1e+308"),
    (["--classes", "1", "--dtype", "fp8"], "unknown dtype"),
    (["--classes", "1", "--rows", "0:2"], "--rows applies only to --features"),
])
def test_bad_input_is_one_line_and_exit_2(released, capsys, extra, message):
    tmp, tok, c2i, _ = released
    rc = main(["sample", *released_flags(tok, c2i, "c2i"), *extra, "--out", str(tmp / "x")])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp / "x").exists()  # refused before anything is sampled


NUMERIC_FLAGS = {"--n": ["0", "-1", "nan", "1.5"], "--batch-size": ["0", "-1", "inf"], "--seed": ["-1", "nan",
                 str(2**63)], "--cfg-scale": ["nan", "inf", "-inf"], "--cfg-interval": ["-2", "nan"],
                 "--cfg-power": ["0", "-1", "nan", "inf"], "--top-k": ["-1", "nan", "inf"],
                 "--top-p": ["0", "-0.5", "1.5", "nan", "inf"], "--temperature": ["0", "-1", "nan", "inf"]}


@pytest.mark.parametrize("flag,value", [(f, v) for f, values in NUMERIC_FLAGS.items() for v in values])
def test_numeric_flags_refuse_values_that_make_no_sense(released, capsys, flag, value):
    tmp, tok, c2i, _ = released
    rc = exit_code(["sample", *released_flags(tok, c2i, "c2i"), "--classes", "1", f"{flag}={value}",
                    "--out", str(tmp / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and f"argument {flag}" in err and "Traceback" not in err
    assert not (tmp / "x").exists()


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
    assert rc == 2 and "5-wide but the generator (GPT-tiny, t2i) takes 32-wide" in capsys.readouterr().err


def test_image_size_not_multiple_of_downsample(released, capsys):
    tmp, tok, c2i, _ = released
    flags = released_flags(tok, c2i, "c2i")
    flags[flags.index("--image-size") + 1] = "70"
    assert main(["sample", *flags, "--classes", "1"]) == 2
    assert "not a multiple of the downsample factor 16" in capsys.readouterr().err


def test_npz_with_another_caption_length_is_refused_naming_both(released, capsys):
    tmp, tok, _, t2i = released
    np.savez(tmp / "long.npz", features=np.zeros((1, 12, 32), np.float32), mask=np.ones((1, 12), np.float32))
    rc = main(["sample", *released_flags(tok, t2i, "t2i"), "--features", str(tmp / "long.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and "12 token slots but the generator (GPT-tiny, t2i) takes 8" in err


# ------------------------------------------------------------------------- seeds, --n, progress, failures
def sample_codes(tok, gpt, tmp, name, *extra):
    out = tmp / name
    assert main(["sample", *released_flags(tok, gpt, "c2i"), "--top-k", "0", "--save-codes", "--out", str(out),
                 *extra]) == 0
    return np.load(out / "codes.npy")


@pytest.mark.repro
def test_image_i_is_the_same_for_any_batch_size(released):
    tmp, tok, c2i, _ = released
    one = sample_codes(tok, c2i, tmp, "b1", "--classes", "1,2,3", "--seed", "7", "--batch-size", "1")
    three = sample_codes(tok, c2i, tmp, "b3", "--classes", "1,2,3", "--seed", "7", "--batch-size", "3")
    assert np.array_equal(one, three)
    for name in ("00000_class1.png", "00001_class2.png", "00002_class3.png"):  # the PNG bytes, not just the codes
        assert (tmp / "b1" / name).read_bytes() == (tmp / "b3" / name).read_bytes()
    prefix = sample_codes(tok, c2i, tmp, "b2", "--classes", "1,2", "--seed", "7", "--batch-size", "2")
    assert np.array_equal(prefix, one[:2])  # image i depends on (seed, i), not on the images after it
    other = sample_codes(tok, c2i, tmp, "s8", "--classes", "1,2,3", "--seed", "8", "--batch-size", "3")
    assert not np.array_equal(other, one)


def test_n_images_per_class_are_seeded_like_an_argen_serve_request(released):
    from argen.sampling.logits import SamplingParams
    from argen.serving import GenerationService, JobSpec, ServeConfig

    tmp, tok, c2i, _ = released
    codes = sample_codes(tok, c2i, tmp, "n2", "--classes", "4,7", "--n", "2", "--seed", "3", "--batch-size", "3")
    names = sorted(p.name for p in (tmp / "n2").glob("0*.png"))
    assert names == ["00000_class4.png", "00001_class4.png", "00002_class7.png", "00003_class7.png"]
    assert not np.array_equal(codes[0], codes[1])  # the repeats of a class get their own seeds
    tokenizer = argen.load_tokenizer(tok, config="VQ-tiny-16")
    gpt = argen.load_gpt(c2i, config="GPT-tiny", kind="c2i", image_size=64, downsample=16)
    service = GenerationService(tokenizer, gpt, ServeConfig(max_wait_ms=1))
    service.start()
    try:
        job = service.submit(JobSpec([4, 4, 7, 7], SamplingParams(cfg_scale=4.0, top_k=0), seed=3))
        served = job.future.result(timeout=60)["codes"]
    finally:
        service.close()
    assert np.array_equal(codes, np.array(served))


def test_progress_bars_count_token_steps_and_decoded_images(released, capsys):
    tmp, tok, c2i, _ = released
    flags = ["sample", *released_flags(tok, c2i, "c2i"), "--classes", "1,2,3", "--batch-size", "2",
             "--out", str(tmp / "p")]
    assert main(flags) == 0
    assert capsys.readouterr().err == ""  # stderr is not a terminal: no bars by default
    assert main([*flags, "--progress"]) == 0
    err = capsys.readouterr().err
    assert "sample" in err and "32/32" in err  # 2 batches x 16 tokens
    assert "decode" in err and "3/3" in err
    assert main([*flags, "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_png_write_failure_says_how_many_images_were_written(released, capsys, monkeypatch):
    import argen.evaluation.pipeline as sample

    tmp, tok, c2i, _ = released
    real, calls = sample.save_png, []

    def failing(image, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(image, path)

    monkeypatch.setattr(sample, "save_png", failing)
    out = tmp / "full"
    rc = main(["sample", *released_flags(tok, c2i, "c2i"), "--classes", "1,2,3,4", "--batch-size", "2",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "00002_class3.png: No space left on device" in err
    assert f"2 of 4 images were written to {out}/" in err
    assert sorted(p.name for p in out.glob("*.png")) == ["00000_class1.png", "00001_class2.png"]


@pytest.mark.parametrize("extra,message", [
    (["--prompts", "a red flag"], "class-conditional generator (GPT-tiny, c2i): pass --classes"),
    (["--classes", "1", "--text-encoder", "minilm"], "--text-encoder applies only to --prompts"),
    (["--classes", "1", "--cfg-schedule", "cosine"], "cfg_schedule must be one of"),
    (["--prompts", "a flag", " "], "prompt 2 is empty"),
    (["--prompts-file", "no/such/file.txt"], "cannot read --prompts-file no/such/file.txt"),
])
def test_bad_condition_flags(released, capsys, extra, message):
    tmp, tok, c2i, _ = released
    rc = main(["sample", *released_flags(tok, c2i, "c2i"), *extra, "--out", str(tmp / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_text_model_refuses_classes_and_empty_prompt_files(released, capsys):
    tmp, tok, _, t2i = released
    flags = ["sample", *released_flags(tok, t2i, "t2i"), "--out", str(tmp / "x")]
    assert main([*flags, "--classes", "1"]) == 2
    assert "text-conditional generator (GPT-tiny, t2i): pass --prompts, --prompts-file or --features" in \
        capsys.readouterr().err
    (tmp / "blank.txt").write_text("\n  \n")
    assert main([*flags, "--prompts-file", str(tmp / "blank.txt")]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: only one condition source
        main([*flags, "--classes", "1", "--prompts", "a"])


# ------------------------------------------------------------------------- prompts through MiniLM
@pytest.fixture
def minilm_pair(tmp_path):
    """A tiny t2i generator taking MiniLM's 384-wide features (8 caption tokens), in the argen format."""
    argen.save_tokenizer(tiny_tokenizer(), tmp_path / "tok")
    argen.save_gpt(tiny_gpt("t2i", caption_dim=384), tmp_path / "gpt")
    return tmp_path, ["sample", "--tokenizer", str(tmp_path / "tok"), "--gpt", str(tmp_path / "gpt"),
                      "--device", "cpu", "--save-codes"]


@pytest.mark.slow
def test_prompts_and_prompts_file_are_encoded_like_argen_serve(minilm_pair, capsys, monkeypatch):
    from argen.serving.text import prompt_encoder

    tmp, flags = minilm_pair
    prompts = ["a red flag", "A Smiley!", "a smiley face with big round eyes and a tall hat"]
    assert main([*flags, "--prompts", *prompts, "--top-k", "1", "--out", str(tmp / "a")]) == 0
    err = capsys.readouterr().err
    assert "prompt 3 fills all 8 caption tokens" in err and "prompt 1 " not in err
    names = sorted(p.name for p in (tmp / "a").glob("0*.png"))
    assert names == ["00000_a-red-flag.png", "00001_a-smiley.png",
                     "00002_a-smiley-face-with-big-round-eyes-and-a.png"]
    gpt = argen.load_gpt(tmp / "gpt")
    features, mask = prompt_encoder(gpt, "minilm", "cpu")(prompts)
    expected = argen.generate(gpt, features, mask, cfg_scale=7.5, top_k=1)
    assert np.array_equal(np.load(tmp / "a" / "codes.npy"), expected.numpy())

    (tmp / "prompts.txt").write_text("a red flag\n\n  A Smiley!  \n")
    assert main([*flags, "--prompts-file", str(tmp / "prompts.txt"), "--out", str(tmp / "b")]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("a red flag\nA Smiley!\n"))
    assert main([*flags, "--prompts", "a red flag", "A Smiley!", "--out", str(tmp / "c")]) == 0
    assert main([*flags, "--prompts-file", "-", "--out", str(tmp / "d")]) == 0
    from_file, from_flags, from_stdin = (np.load(tmp / d / "codes.npy") for d in "bcd")
    assert np.array_equal(from_file, from_flags) and np.array_equal(from_stdin, from_flags)


@pytest.mark.slow
def test_text_encoder_of_the_wrong_width_is_refused_naming_both(released, capsys):
    tmp, tok, _, t2i = released  # GPT-tiny t2i takes 32-wide captions; MiniLM gives 384
    rc = main(["sample", *released_flags(tok, t2i, "t2i"), "--prompts", "a red flag", "--out", str(tmp / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "text encoder 'minilm' gives 384-wide features but the generator takes 32" in err


@pytest.mark.slow
def test_extract_text_features_folder_feeds_sample(minilm_pair, capsys):
    tmp, flags = minilm_pair
    manifest = tmp / "captions.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": f"{i}.png", "caption": c})
                                  for i, c in enumerate(["a red flag", "a smiley with a very long and winding hat"])))
    assert main(["extract-text-features", "--data", str(manifest), "--out", str(tmp / "text"), "--no-progress",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main([*flags, "--features", str(tmp / "text"), "--top-k", "1", "--out", str(tmp / "f")]) == 0
    assert "have up to 11 tokens; the generator reads the first 8" in capsys.readouterr().err
    names = sorted(p.name for p in (tmp / "f").glob("0*.png"))
    assert names == ["00000_a-red-flag.png", "00001_a-smiley-with-a-very-long-and-winding.png"]
    assert np.load(tmp / "f" / "codes.npy").shape == (2, 16)


# ------------------------------------------------------------------------- issue 10: interrupts and --rows
def test_ctrl_c_part_way_says_how_many_pngs_were_written(released, capsys, monkeypatch):
    import argen.evaluation.pipeline as pipeline

    tmp, tok, c2i, _ = released
    real, calls = pipeline.generate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "generate", interrupted)
    out = tmp / "ctrl-c"
    rc = main(["sample", *released_flags(tok, c2i, "c2i"), "--classes", "1,2,3,4", "--batch-size", "2",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 130 and len(err.strip().splitlines()) == 1
    assert f"argen sample: interrupted; 2 of 4 images were written to {out}/" in err
    assert len(list(out.glob("0*.png"))) == 2


def test_rows_pick_caption_rows_of_a_feature_file(released):
    tmp, tok, _, t2i = released
    cfg = tiny_gpt("t2i").config
    feats = np.random.default_rng(1).normal(size=(5, cfg.caption_len, cfg.caption_dim)).astype(np.float32)
    mask = np.ones((5, cfg.caption_len), np.float32)
    np.savez(tmp / "caps.npz", features=feats, mask=mask)
    flags = ["sample", *released_flags(tok, t2i, "t2i"), "--features", str(tmp / "caps.npz"), "--save-codes",
             "--top-k", "1"]
    assert main([*flags, "--out", str(tmp / "all")]) == 0
    assert main([*flags, "--rows", "1:3", "--out", str(tmp / "rows")]) == 0
    assert sorted(p.name for p in (tmp / "rows").glob("0*.png")) == ["00000_caption1.png", "00001_caption2.png"]
    everything = np.load(tmp / "all" / "codes.npy")
    picked = np.load(tmp / "rows" / "codes.npy")
    assert picked.shape == (2, 16) and np.array_equal(picked[:, :4], everything[1:3, :4])  # greedy: same start
    assert main([*flags, "--rows", "7:9", "--out", str(tmp / "none")]) == 2


@pytest.mark.parametrize("text,count,rows", [("0:3", 10, [0, 1, 2]), (":2", 10, [0, 1]), ("8:", 10, [8, 9]),
                                             ("4", 10, [4]), ("2:50", 4, [2, 3])])
def test_parse_rows(text, count, rows):
    from argen.data.caption_files import parse_rows

    assert parse_rows(text, count) == rows


@pytest.mark.parametrize("text", ["a:b", "1:2:3", "-1:3", "5:5", "12"])
def test_parse_rows_refuses(text):
    from argen.data.caption_files import parse_rows
    from argen.utils.errors import ArgenError

    with pytest.raises(ArgenError, match="--rows"):
        parse_rows(text, 10)


def test_an_unexpected_error_keeps_its_traceback_with_the_count_as_a_note(released, monkeypatch):
    import argen.evaluation.pipeline as pipeline

    tmp, tok, c2i, _ = released
    real, calls = pipeline.generate, []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: device-side assert")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "generate", broken)
    out = tmp / "broken"
    with pytest.raises(RuntimeError, match="device-side assert") as info:
        main(["sample", *released_flags(tok, c2i, "c2i"), "--classes", "1,2,3", "--batch-size", "2", "--out", str(out)])
    assert f"2 of 3 images were written to {out}/" in info.value.__notes__
