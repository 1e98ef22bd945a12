"""CLIP score in `argen evaluate` (torchmetrics' CLIPScore with a tiny random local CLIP), caption files,
and the two-command COCO-style run: `sample-batch --captions` then `evaluate --clip`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import argen
from argen.cli.main import main
from argen.data.caption_files import read_captions
from argen.evaluation.clip_score import clip_score
from argen.evaluation.npz import ImageBatchFile
from argen.models.clip import load_clip
from argen.models.gpt import GPT, gpt_config
from argen.models.tokenizer import VQModel, vq_config
from argen.utils.errors import ArgenError
from test_scoring import make_tiny_clip

PROMPTS = ["a red flag", "a smiling face", "a cat on a mat", "two dogs", "a blue car", "x"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=3)


def _images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def by_hand(clip_dir, images, prompts):
    """Both definitions, computed without torchmetrics: max(mean 100 cos, 0) (torchmetrics) and the mean of
    max(100 cos, 0) (Hessel et al.), and the number of negative cosines."""
    clip = load_clip(clip_dir)
    cos = clip.similarity([Image.fromarray(im) for im in images], prompts)
    return max(float(100 * cos.mean()), 0.0), float((100 * cos).clamp(min=0).mean()), int((cos < 0).sum())


def test_read_captions(tmp_path):
    (tmp_path / "a.txt").write_text("first\n\n  second  \n")
    assert read_captions(tmp_path / "a.txt") == ["first", "second"]
    coco = {"images": [{"id": 1}], "annotations": [{"image_id": 1, "id": 5, "caption": "A man\nriding. "},
                                                   {"image_id": 1, "id": 6, "caption": "Another"}]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    assert read_captions(tmp_path / "captions_val2014.json") == ["A man riding.", "Another"]
    (tmp_path / "p.json").write_text(json.dumps({"prompts": ["x", "y"]}))
    assert read_captions(tmp_path / "p.json") == ["x", "y"]
    (tmp_path / "bad.json").write_text(json.dumps({"annotations": [{"id": 1}]}))
    with pytest.raises(ArgenError, match="COCO captions JSON"):
        read_captions(tmp_path / "bad.json")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ArgenError, match="holds no captions"):
        read_captions(tmp_path / "empty.txt")


def test_clip_score_is_torchmetrics_with_the_local_model(tmp_path, clip_dir):
    images = _images(6)
    np.savez(tmp_path / "samples.npz", images)
    batch = ImageBatchFile(tmp_path / "samples.npz")
    clip = load_clip(clip_dir)
    result = clip_score(batch, PROMPTS, clip, batch_size=4)
    mean_floor, image_floor, negative = by_hand(clip_dir, images, PROMPTS)
    assert negative > 0  # the random model gives negative cosines: the two floors differ and both are checked
    assert result["clip_score"] == pytest.approx(mean_floor, abs=1e-3)
    assert result["clip_score_per_image_floor"] == pytest.approx(image_floor, abs=1e-3)
    assert result["clip_negative_pairs"] == negative and result["clip_num_samples"] == 6
    assert result["clip_model"]["name"] == "tiny-clip" and len(result["clip_model"]["sha256"]) == 64
    # the batch size does not matter; the score pairs image i with prompt i: another order gives another score
    assert clip_score(batch, PROMPTS, clip, batch_size=5)["clip_score"] == pytest.approx(result["clip_score"], abs=1e-4)
    assert clip_score(batch, PROMPTS[::-1], clip)["clip_score"] != pytest.approx(result["clip_score"], abs=1e-2)


@pytest.mark.parametrize("case, message", [
    ("few prompts", "holds 6 images but 2 prompts"), ("no clip", "do not exist"),
    ("prompts only", "--prompts applies only to --clip"), ("no prompts", "pass --prompts FILE"),
])
def test_evaluate_clip_bad_input_is_one_line_exit_2(tmp_path, clip_dir, capsys, case, message):
    np.savez(tmp_path / "ref.npz", _images(8, seed=1))
    np.savez(tmp_path / "samples.npz", _images(6))
    (tmp_path / "two.txt").write_text("a\nb\n")
    (tmp_path / "six.txt").write_text("\n".join(PROMPTS))
    args = ["evaluate", str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), "--inception", "random",
            "--device", "cpu", "--no-progress"]
    args += {"few prompts": ["--clip", str(clip_dir), "--prompts", str(tmp_path / "two.txt")],
             "no clip": ["--clip", str(tmp_path / "nope"), "--prompts", str(tmp_path / "six.txt")],
             "prompts only": ["--prompts", str(tmp_path / "two.txt")],
             "no prompts": ["--clip", str(clip_dir)]}[case]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_sample_batch_from_captions_then_evaluate_with_clip(tmp_path, clip_dir, capsys):
    """The COCO-style run in two commands, on a tiny t2i generator that takes MiniLM features."""
    torch.manual_seed(2)
    gpt = GPT(gpt_config("GPT-tiny", kind="t2i", image_size=8, downsample=2, caption_dim=384, caption_len=16)).eval()
    argen.save_tokenizer(VQModel(vq_config("VQ-tiny")).eval(), tmp_path / "ckpt")
    argen.save_gpt(gpt, tmp_path / "ckpt")
    coco = {"annotations": [{"image_id": i, "id": i, "caption": p} for i, p in enumerate(PROMPTS)]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    assert main(["sample-batch", "--tokenizer", str(tmp_path / "ckpt"), "--gpt", str(tmp_path / "ckpt"), "--device",
                 "cpu", "--num-samples", "5", "--batch-size", "4", "--eval-size", "16", "--seed", "3", "--out",
                 str(out), "--quiet", "--captions", str(tmp_path / "captions.json"), "--rows", "1:4"]) == 0
    assert json.loads((out / "prompts.json").read_text())["prompts"] == PROMPTS[1:4]
    with np.load(out / "samples.npz") as data:
        images, index = data["arr_0"], data["prompt_index"]
    assert images.shape == (5, 16, 16, 3) and index.tolist() == [0, 1, 2, 0, 1]
    np.savez(tmp_path / "ref.npz", _images(8, seed=1))
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "ref.npz"), str(out / "samples.npz"), "--inception", "random",
                 "--device", "cpu", "--no-progress", "--clip", str(clip_dir), "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    expected = by_hand(clip_dir, images, [PROMPTS[1:4][i] for i in index])
    assert result["clip_score"] == pytest.approx(expected[0], abs=1e-3) and result["fid"] > 0
    assert result["clip_model"]["name"] == "tiny-clip" and len(result["clip_model"]["sha256"]) == 64
    assert json.loads(capsys.readouterr().out)["clip_score"] == pytest.approx(result["clip_score"])
    # a c2i generator takes no captions
    assert main(["sample-batch", "--tokenizer", str(tmp_path / "ckpt"), "--gpt", str(tmp_path / "ckpt"),
                 "--out", str(tmp_path / "o2"), "--text-encoder", "minilm", "--num-classes", "2"]) == 2
