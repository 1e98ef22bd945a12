"""Image editing (`argen.editing`, `argen edit`) on the bundled demo generator and tokenizer: the mask
rounding, round trips, kept tokens, independence from batch neighbours, outpainting, the CLI and its
bad input. Until the engine has forced tokens, the plain loop of `forced_standin` stands in for it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from argen.checkpoint import load_gpt, load_tokenizer
from argen.cli.main import main
from argen.data.datasets import DemoDataset
from argen.editing import edit, encode_images, extend, mask_from_image, token_mask
from argen.engine import decode_codes
from argen.sampling.logits import SamplingParams
from argen.sampling.seeds import image_seed
from argen.utils.errors import ArgenError
from forced_standin import engine_has_forced_tokens, plain_forced_generate, use_standin

PARAMS = SamplingParams(cfg_scale=4.0, temperature=0.8, top_k=50)


@pytest.fixture(scope="module")
def models():
    return load_tokenizer("demo-vq"), load_gpt("demo-c2i")


@pytest.fixture(scope="module")
def picture():
    data = DemoDataset("val")
    return data.images[0], int(data.labels[0])


@pytest.fixture(autouse=True)
def standin(monkeypatch):
    use_standin(monkeypatch)


def gens(seed: int, count: int):
    return [torch.Generator().manual_seed(image_seed(seed, i)) for i in range(count)]


def test_a_token_is_regenerated_when_any_pixel_it_covers_is_masked():
    mask = np.zeros((64, 64), bool)
    mask[8, 15] = True  # one pixel: row 1, column 1 of the 8 px cells
    tokens = token_mask(mask, 8)
    assert tokens.sum() == 1 and tokens[1, 1]
    mask[40:48, 40:48] = True  # exactly one cell
    assert token_mask(mask, 8).sum() == 2
    big = np.zeros((100, 140), bool)  # centre-cropped to 100x100: columns 20..119
    big[:, :20] = True
    assert not token_mask(big, 8).any()
    big[0, 20] = True
    assert token_mask(big, 8)[0, 0] and token_mask(big, 8).sum() == 1


def test_mask_pictures_alpha_zero_or_white_is_edited():
    rgba = np.full((4, 4, 4), 255, np.uint8)
    rgba[0, 0, 3] = 0
    rgba[1, 1, 3] = 1  # partly transparent: kept
    assert mask_from_image(Image.fromarray(rgba)).tolist() == (rgba[..., 3] == 0).tolist()
    grey = np.zeros((4, 4), np.uint8)
    grey[2, 3] = 255
    grey[3, 3] = 127
    expected = np.zeros((4, 4), bool)
    expected[2, 3] = True
    assert (mask_from_image(Image.fromarray(grey)) == expected).all()
    assert (mask_from_image(Image.fromarray(grey).convert("RGB")) == expected).all()


def test_a_mask_of_nothing_is_the_tokenizer_round_trip_exactly(models, picture):
    tokenizer, gpt = models
    image, label = picture
    result = edit(gpt, tokenizer, image, np.zeros((64, 64), bool), torch.tensor([label]), params=PARAMS,
                  row_generators=gens(0, 1))
    codes = encode_images(tokenizer, image[None])
    assert result.kept_everything and result.regenerated == [0]
    assert torch.equal(result.codes, codes.flatten(1))
    assert np.array_equal(result.images, decode_codes(tokenizer, codes))


def test_kept_tokens_never_change_and_the_condition_may_differ(models, picture):
    tokenizer, gpt = models
    image, label = picture
    mask = np.zeros((64, 64), bool)
    mask[20:44, 20:44] = True
    other = (label + 1) % gpt.config.num_classes
    result = edit(gpt, tokenizer, image, mask, torch.tensor([label, other, other]), params=PARAMS,
                  row_generators=gens(3, 3))
    codes = encode_images(tokenizer, image[None]).flatten(1)
    kept = ~result.token_mask.flatten(1)  # (3, N)
    assert result.regenerated == [16, 16, 16]  # 24 px from 20 covers 4 cells of 8 px each way
    assert torch.equal(result.codes[kept], codes.expand(3, -1)[kept])
    assert not torch.equal(result.codes[1], result.codes[2])  # own generators
    assert result.pixel_mask.shape == (3, 64, 64) and result.pixel_mask[0, 16:48, 16:48].all()


def test_an_edit_does_not_depend_on_what_shares_the_batch(models, picture):
    tokenizer, gpt = models
    image, label = picture
    other = DemoDataset("val").images[5]
    mask_a = np.zeros((64, 64), bool)
    mask_a[32:] = True
    mask_b = np.zeros((64, 64), bool)
    mask_b[:, 40:] = True
    alone = edit(gpt, tokenizer, [image], [mask_a], torch.tensor([label]), params=PARAMS,
                 row_generators=gens(7, 1))
    shared = edit(gpt, tokenizer, [other, image], [mask_b, mask_a], torch.tensor([2, label]), params=PARAMS,
                  row_generators=[gens(9, 1)[0], gens(7, 1)[0]])
    assert torch.equal(alone.codes[0], shared.codes[1])
    assert np.array_equal(alone.images[0], shared.images[1])


@pytest.mark.skipif(not engine_has_forced_tokens(), reason="the engine has no forced tokens yet: the plain loop "
                                                           "would be compared with itself")
def test_greedy_editing_equals_a_plain_loop_that_forces_the_kept_tokens(models, picture):
    tokenizer, gpt = models
    image, label = picture
    greedy = SamplingParams(cfg_scale=4.0, top_k=1)
    mask = np.zeros((64, 64), bool)
    mask[24:, 8:40] = True  # several runs of kept tokens between regenerated ones
    result = edit(gpt, tokenizer, image, mask, torch.tensor([label, 3]), params=greedy, row_generators=gens(0, 2))
    forced = torch.where(result.token_mask.flatten(1), -1, encode_images(tokenizer, image[None]).flatten(1))
    plain = plain_forced_generate(gpt, torch.tensor([label, 3]), params=greedy, row_generators=gens(0, 2),
                                  forced_tokens=forced)
    assert torch.equal(result.codes, plain)


def test_extend_right_keeps_the_image_and_grows_a_panorama(models, picture):
    tokenizer, gpt = models
    image, label = picture
    result = extend(gpt, tokenizer, image, "right", 128, torch.tensor([label, label]), params=PARAMS,
                    row_generators=gens(0, 2))
    assert result.images.shape == (2, 64, 192, 3)
    assert result.windows == 4  # stride 4 tokens: 16 new columns
    codes = encode_images(tokenizer, image[None])[0]
    assert torch.equal(result.codes[:, :, :8], codes.expand(2, 8, 8))
    assert result.generated[:, 8:].all() and not result.generated[:, :8].any()
    down = extend(gpt, tokenizer, image, "down", 20, torch.tensor([label]), params=PARAMS, row_generators=gens(0, 1))
    assert down.images.shape == (1, 88, 64, 3)  # 20 px rounded up to 3 tokens
    assert torch.equal(down.codes[0, :8], codes)


def test_extend_left_mirrors_and_up_is_refused(models, picture):
    tokenizer, gpt = models
    image, label = picture
    left = extend(gpt, tokenizer, image, "left", 32, torch.tensor([label]), params=PARAMS, row_generators=gens(0, 1))
    assert left.images.shape == (1, 64, 96, 3)
    assert left.generated[:, :4].all() and not left.generated[:, 4:].any()
    mirrored = encode_images(tokenizer, image[None, :, ::-1].copy())[0]
    assert torch.equal(left.codes[0, :, :8], mirrored)  # the mirror image's tokens are kept
    with pytest.raises(ArgenError, match="extending up is not supported"):
        extend(gpt, tokenizer, image, "up", 32, torch.tensor([label]))
    with pytest.raises(ArgenError, match="positive"):
        extend(gpt, tokenizer, image, "right", 0, torch.tensor([label]))


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture
def image_file(tmp_path, picture):
    path = tmp_path / "in.png"
    Image.fromarray(picture[0]).save(path)
    return path


def test_cli_mask_of_everything_is_argen_samples_image(tmp_path, image_file, capsys):
    flags = ["--classes", "3,5", "--n", "2", "--seed", "11", "--device", "cpu"]
    assert main(["sample", *flags, "--out", str(tmp_path / "s")]) == 0
    assert main(["edit", "--image", str(image_file), "--box", "0,0,64,64", *flags, "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "64 of 64 tokens regenerated" in out
    for name in ("00000_class3.png", "00001_class3.png", "00002_class5.png", "00003_class5.png"):
        sampled = np.asarray(Image.open(tmp_path / "s" / name))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "e" / name)), sampled), name
    strip = Image.open(tmp_path / "e" / "side_by_side.png")
    assert strip.size == (2 + 6 * 66, 68)  # input, mask, 4 results


def test_cli_writes_edits_masks_and_says_when_nothing_is_edited(tmp_path, image_file, models, capsys):
    mask = np.full((64, 64, 4), 255, np.uint8)  # opaque: keeps everything
    Image.fromarray(mask).save(tmp_path / "keep.png")
    assert main(["edit", "--image", str(image_file), "--mask", str(tmp_path / "keep.png"), "--classes", "1",
                 "--device", "cpu", "--out", str(tmp_path / "keep")]) == 0
    assert "keeps every token" in capsys.readouterr().out
    tokenizer, _ = models
    trip = decode_codes(tokenizer, encode_images(tokenizer, np.asarray(Image.open(image_file))[None]))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "keep" / "00000_class1.png")), trip[0])
    mask[40:, :, 3] = 0  # transparent bottom: edited
    Image.fromarray(mask).save(tmp_path / "bottom.png")
    assert main(["edit", "--image", str(image_file), "--mask", str(tmp_path / "bottom.png"), "--classes", "1",
                 "--n", "2", "--device", "cpu", "--out", str(tmp_path / "bottom")]) == 0
    assert "24 of 64 tokens" in capsys.readouterr().out
    used = np.asarray(Image.open(tmp_path / "bottom" / "mask.png"))
    assert (used[40:] == 255).all() and (used[:40] == 0).all()
    assert main(["edit", "--image", str(image_file), "--extend", "right:64", "--classes", "1", "--device", "cpu",
                 "--out", str(tmp_path / "wide")]) == 0
    assert Image.open(tmp_path / "wide" / "00000_class1.png").size == (128, 64)


@pytest.mark.parametrize("flags, message", [
    (["--mask", "{small}"], "the mask is 32x32 but the image is 64x64"),
    (["--box", "10,10,80,20"], "not a non-empty box inside the 64x64 image"),
    (["--box", "10,10,5,20"], "not a non-empty box"),
    (["--box", "1,2,3"], "four integers"),
    (["--extend", "right:0"], "positive"),
    (["--extend", "right:-64"], "positive"),
    (["--extend", "up:64"], "extending up is not supported"),
    (["--extend", "sideways:64"], "one of right, down, left"),
    (["--mask", "{junk}"], "cannot read the mask"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, image_file, capsys, flags, message):
    Image.new("L", (32, 32)).save(tmp_path / "small.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    flags = [f.format(small=tmp_path / "small.png", junk=tmp_path / "junk.png") for f in flags]
    assert main(["edit", "--image", str(image_file), *flags, "--classes", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("argen edit: error:")


def test_cli_unreadable_image_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    assert main(["edit", "--image", str(tmp_path / "bad.png"), "--box", "0,0,8,8", "--classes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot read the image" in err and len(err.splitlines()) == 1
    assert main(["edit", "--image", str(tmp_path / "missing.png"), "--box", "0,0,8,8", "--classes", "1"]) == 2
    assert "cannot read the image" in capsys.readouterr().err


def test_cli_edits_under_a_prompt_with_the_bundled_t2i_generator(tmp_path, image_file, capsys):
    assert main(["edit", "--image", str(image_file), "--box", "0,32,64,64", "--prompts", "an emoji of a red heart",
                 "--n", "2", "--device", "cpu", "--out", str(tmp_path / "t2i")]) == 0
    out = capsys.readouterr().out
    assert "demo-t2i" in out and "32 of 64 tokens" in out
    names = sorted(p.name for p in (tmp_path / "t2i").glob("0*.png"))
    assert names == ["00000_an-emoji-of-a-red-heart.png", "00001_an-emoji-of-a-red-heart.png"]
    first = np.asarray(Image.open(tmp_path / "t2i" / names[0]))
    assert first.shape == (64, 64, 3) and not np.array_equal(first, np.asarray(Image.open(tmp_path / "t2i" / names[1])))
