"""`argen score-shards`: CLIP similarity and the aesthetic head with tiny random local models (nothing is
downloaded), sidecars per shard (resume, ranks, refusal of other models), filters reading them, and the
one-line errors for missing or wrong weights."""

import json
import tarfile

import numpy as np
import pytest
import torch

from argen.cli.main import main
from argen.data.scoring import score_shards
from argen.data.shards import ShardDataset
from argen.data.sidecars import read_sidecar, sidecar_path
from argen.models.clip import load_aesthetic_head, load_clip
from argen.utils.errors import ArgenError
from test_filters import make_laion_shards
from test_webdataset import _add, _image


def make_tiny_clip(folder, image_size=32, projection_dim=16, seed=0):
    """A random CLIP (2-layer towers) with a byte-level BPE tokenizer, saved like a downloaded model."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(chars)})
    vocab.update({c + "</w>": i + 2 + len(chars) for i, c in enumerate(chars)})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=image_size, patch_size=8),
                        projection_dim=projection_dim)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                 crop_size={"height": image_size,
                                                                            "width": image_size}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("head") / "head.pth"
    torch.save(torch.nn.Linear(16, 1).state_dict(), path)
    return path


def test_clip_and_head_errors(tmp_path, clip_dir, head_file):
    with pytest.raises(ArgenError, match="do not exist"):
        load_clip(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArgenError, match="no config.json"):
        load_clip(tmp_path / "empty")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ArgenError, match="holds a bert model, not CLIP"):
        load_clip(tmp_path / "bert")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(ArgenError, match="cannot load CLIP"):
        load_clip(broken)
    with pytest.raises(ArgenError, match="takes 16-wide embeddings but the CLIP gives 768"):
        load_aesthetic_head(head_file, 768)
    mlp = tmp_path / "mlp.pth"
    torch.save(torch.nn.Sequential(torch.nn.Linear(16, 4), torch.nn.Linear(4, 1)).state_dict(), mlp)
    with pytest.raises(ArgenError, match="not a linear aesthetic head"):
        load_aesthetic_head(mlp, 16)
    with pytest.raises(ArgenError, match="does not exist"):
        load_aesthetic_head(tmp_path / "none.pth", 16)


@pytest.mark.parametrize("what", ["missing", "bert"])
def test_cli_bad_clip_is_one_line_exit_2(tmp_path, capsys, what):
    pattern = make_laion_shards(tmp_path / "data")
    clip = tmp_path / "nope"
    if what == "bert":
        clip.mkdir()
        (clip / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["score-shards", "--data", pattern, "--clip", str(clip), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("argen score-shards: error: ")


def test_score_shards_sidecars_match_the_model(tmp_path, clip_dir, head_file, capsys):
    pattern = make_laion_shards(tmp_path / "data")
    with tarfile.open(tmp_path / "data" / "00001.tar", "a") as tar:  # one more sample: not an image
        _add(tar, "000019999.jpg", b"not an image")
        _add(tar, "000019999.json", json.dumps({"caption": "broken"}).encode())
    args = ["score-shards", "--data", pattern, "--clip", str(clip_dir), "--aesthetic", str(head_file),
            "--batch-size", "3", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["scored"] == 2 and summary["samples"] == 11 and summary["bad"] == 1
    ds = ShardDataset(pattern)
    side = read_sidecar(sidecar_path(ds.shards[0]))
    assert side["fields"] == ["similarity", "AESTHETIC_SCORE"] and side["scorers"]["clip"]["name"] == "tiny-clip"
    assert len(side["samples"]) == 5
    clip = load_clip(clip_dir)
    head, _ = load_aesthetic_head(head_file, clip.dim)
    samples = list(ds.iter_shard(0))
    images = [ds.decode(s) for s in samples]
    similarity = clip.similarity(images, [s.captions[0] for s in samples])
    aesthetic = head.score(clip.image_embeddings(images))
    got = [side["samples"][s.key] for s in samples]
    np.testing.assert_allclose([g["similarity"] for g in got], similarity.numpy(), atol=1e-5)
    np.testing.assert_allclose([g["AESTHETIC_SCORE"] for g in got], aesthetic.numpy(), atol=1e-5)
    assert -1 <= min(similarity) and max(similarity) <= 1
    bad = read_sidecar(sidecar_path(ds.shards[1]))
    assert "000019999" in bad["bad"] and bad["samples"]["000019999"] == {}
    # the sidecar fields override the metadata's: every sample with an image now has a similarity
    filtered = ShardDataset(pattern, sample_filter="has(similarity) and AESTHETIC_SCORE > -100")
    assert len(filtered) == 10 and filtered.filter_report.to_dict()["fields"]["similarity"]["missing"] == 1
    # a rerun skips the scored shards; other models are refused
    mtime = sidecar_path(ds.shards[0]).stat().st_mtime_ns
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["scored"] == 0
    assert sidecar_path(ds.shards[0]).stat().st_mtime_ns == mtime
    assert main(args[:5] + ["--device", "cpu", "--no-progress"]) == 2  # no aesthetic head this time
    assert "other models or with other field names" in capsys.readouterr().err


def test_ranks_split_shards_and_match_one_process(tmp_path, clip_dir):
    pattern = make_laion_shards(tmp_path / "data")
    clip = load_clip(clip_dir)
    ds = ShardDataset(pattern)
    for rank in (1, 0):
        score_shards(ds, clip, out=tmp_path / "ranks", rank=rank, world_size=2, progress=False,
                     similarity_field="clip_sim")
    one = score_shards(ds, clip, out=tmp_path / "one", batch_size=1, progress=False, similarity_field="clip_sim")
    assert one["scored"] == 2 and one["fields"] == ["clip_sim"]
    for shard in ds.shards:
        a = read_sidecar(sidecar_path(shard, tmp_path / "ranks"))["samples"]
        b = read_sidecar(sidecar_path(shard, tmp_path / "one"))["samples"]
        assert a.keys() == b.keys()
        for key in a:
            assert a[key]["clip_sim"] == pytest.approx(b[key]["clip_sim"], abs=1e-5)
    kept = ShardDataset(pattern + f"?sidecars={tmp_path / 'one'}", sample_filter="clip_sim >= -1 and similarity > 0")
    assert len(kept) == 8  # clip_sim from the sidecars, similarity from the metadata (2 lack it)


def test_score_shards_refuses_other_data(tmp_path, clip_dir, capsys):
    assert main(["score-shards", "--data", "demo", "--clip", str(clip_dir)]) == 2
    assert main(["score-shards", "--data", str(tmp_path / "x.tar"), "--clip", str(clip_dir),
                 "--similarity-field", "bad name"]) == 2
    assert "not a field name" in capsys.readouterr().err
    rng = np.random.default_rng(0)
    (tmp_path / "d").mkdir()
    with tarfile.open(tmp_path / "d" / "a.tar", "w") as tar:
        _add(tar, "k.png", _image(rng))
    assert main(["score-shards", "--data", str(tmp_path / "d" / "a.tar"), "--clip", str(clip_dir),
                 "--no-progress", "--device", "cpu"]) == 0  # no caption: aesthetic-less, similarity-less
    assert read_sidecar(sidecar_path(tmp_path / "d" / "a.tar"))["samples"] == {"k": {}}
