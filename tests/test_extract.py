"""`argen extract-codes` (counts, crop x flip variants, decode == reconstruction, resume) and
`argen extract-text-features`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from argen.checkpoint import save_tokenizer
from argen.cli.main import main
from argen.data.codes import CodeDataset
from argen.data.datasets import DemoDataset, JsonlDataset
from argen.data.extract import extract_codes
from argen.data.text_features import TextFeatureStore
from argen.data.transforms import crop_variants, to_tensor
from argen.models.tokenizer import VQModel, vq_config
from argen.utils.errors import ArgenError


class Subset:
    """The first n demo images."""

    def __init__(self, n, split="val"):
        self.base, self.n = DemoDataset(split), n
        self.kind, self.class_names = "c2i", self.base.class_names

    def __len__(self):
        return self.n

    def __getattr__(self, name):
        return getattr(self.base, name)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VQModel(vq_config("VQ-tiny")).eval()


def test_ten_crop_flip_counts_and_decode_matches_reconstruction(tmp_path, model):
    data = Subset(7)
    index = extract_codes(model, data, tmp_path / "codes", 16, ten_crop=True, flip=True, crop_range=1.1,
                          shard_size=3, batch_size=2, progress=False)
    assert index["num_images"] == 7 and len(index["shards"]) == 3 and index["num_augs"] == 10
    ds = CodeDataset(tmp_path / "codes")
    assert len(ds) == 7 and ds.grid == (8, 8) and ds.num_classes == 10
    assert ds.labels.tolist() == [data.label(i) for i in range(7)]
    names = index["aug_names"]
    assert len(set(names)) == 10 and names[5] == "top_left_flip"
    i = 4
    crops, _ = crop_variants(data.load(i), 16, ten_crop=True, flip=True, crop_range=1.1)
    x = torch.stack([to_tensor(c) for c in crops])  # (10, 3, 16, 16)
    with torch.no_grad():
        reference = model.reconstruct(x)
    for aug in (0, 3, 7):
        codes, label = ds.get(i, aug)
        decoded = model.decode(codes.view(1, 8, 8))
        torch.testing.assert_close(decoded[0], reference[aug], atol=1e-5, rtol=1e-5)
        assert label == data.label(i)
    # the mirrored copy is a different input and gets different codes
    assert not torch.equal(x[0], x[5]) and torch.equal(x[5], x[0].flip(-1))
    assert not torch.equal(ds.get(i, 0)[0], ds.get(i, 5)[0])


def test_resume_skips_finished_shards_and_rejects_other_settings(tmp_path, model):
    data = Subset(5)
    out = tmp_path / "codes"
    extract_codes(model, data, out, 16, flip=True, shard_size=2, progress=False)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("codes-*.npy")}
    (out / "labels-00001.npy").unlink()  # as if killed while writing shard 1
    (out / "index.json").unlink()
    index = extract_codes(model, data, out, 16, flip=True, shard_size=2, progress=False)
    assert index["num_images"] == 5 and index["num_augs"] == 2
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("codes-*.npy")}
    assert after["codes-00000.npy"] == first["codes-00000.npy"] and after["codes-00002.npy"] == first["codes-00002.npy"]
    assert after["codes-00001.npy"] != first["codes-00001.npy"]
    with pytest.raises(ArgenError, match="different settings"):
        extract_codes(model, data, out, 16, ten_crop=True, shard_size=2, progress=False)


def test_ranks_split_shards(tmp_path, model, monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    data = Subset(5)
    out = tmp_path / "codes"
    assert extract_codes(model, data, out, 16, shard_size=2, rank=1, world_size=3, progress=False) is None
    assert sorted(p.name for p in out.glob("codes-*.npy")) == ["codes-00001.npy"]
    with pytest.raises(ArgenError, match="not finished"):  # rank 0 of 3 without rank 2's shard
        extract_codes(model, data, out, 16, shard_size=2, rank=0, world_size=3, progress=False)
    index = extract_codes(model, data, out, 16, shard_size=2, rank=2, world_size=3, progress=False)
    assert index is None
    index = extract_codes(model, data, out, 16, shard_size=2, rank=0, world_size=3, progress=False)
    assert index["num_images"] == 5 and len(index["shards"]) == 3


def _manifest(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        caps = ["a red apple", "the cat"] if i == 1 else [f"image {i}"]
        lines.append({"image": f"{i}.png", "captions": caps})
    (tmp_path / "bad.png").write_bytes(b"broken")
    lines.append({"image": "bad.png", "caption": "broken"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines))
    return manifest


def test_t2i_pipeline_with_minilm(tmp_path, model):
    manifest = _manifest(tmp_path)
    assert main(["extract-text-features", "--data", str(manifest), "--encoder", "minilm", "--out",
                 str(tmp_path / "text"), "--no-progress", "--device", "cpu"]) == 0
    store = TextFeatureStore(tmp_path / "text")
    assert len(store) == 6 and store.dim == 384 and store.ids == [0, 1, 1, 2, 3, 4]
    feats, mask = store.get([1, 2], 12)
    assert feats.shape == (2, 12, 384) and mask.sum(1).tolist() == [5, 4]
    save_tokenizer(model, tmp_path / "tok")
    args = ["extract-codes", "--tokenizer", str(tmp_path / "tok"), "--data", str(manifest), "--split", "all",
            "--out", str(tmp_path / "codes"), "--image-size", "16", "--no-progress", "--device", "cpu",
            "--max-bad-fraction", "0.5"]
    assert main(args) == 2  # no --text-features
    assert main(args + ["--text-features", str(tmp_path / "text")]) == 0
    ds = CodeDataset(tmp_path / "codes")
    assert ds.kind == "t2i" and len(ds) == 4  # the broken image was skipped
    assert ds.labels.tolist() == [0, 1, 3, 4]  # row of each image's first caption
    assert ds.text_features_dir == (tmp_path / "text").resolve()
    assert JsonlDataset(manifest).caption_offsets.tolist() == [0, 1, 3, 4, 5, 6]


def test_rerun_into_codes_of_another_split_size_or_tokenizer_is_refused(tmp_path, model):
    out = tmp_path / "codes"
    extract_codes(model, Subset(4, split="val"), out, 16, shard_size=2, progress=False)
    with pytest.raises(ArgenError, match="split"):
        extract_codes(model, Subset(4, split="train"), out, 16, shard_size=2, progress=False)
    with pytest.raises(ArgenError, match="num_images"):
        extract_codes(model, Subset(6, split="val"), out, 16, shard_size=2, progress=False)
    with pytest.raises(ArgenError, match="shard_size"):
        extract_codes(model, Subset(4, split="val"), out, 16, shard_size=3, progress=False)
    other = VQModel(vq_config("VQ-tiny")).eval()  # same config, other weights
    with pytest.raises(ArgenError, match="tokenizer_sha256"):
        extract_codes(other, Subset(4, split="val"), out, 16, shard_size=2, progress=False)
    # codes written before these keys were recorded can still be resumed
    meta = json.loads((out / "meta.json").read_text())
    for key in ("split", "num_images", "shard_size", "tokenizer_sha256"):
        del meta[key]
    (out / "meta.json").write_text(json.dumps(meta))
    assert extract_codes(other, Subset(4, split="val"), out, 16, shard_size=2, progress=False)["num_images"] == 4


def test_text_features_of_another_split_are_refused(tmp_path, model):
    manifest = _manifest(tmp_path)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    for i, record in enumerate(records):
        record["split"] = "val" if i == 2 else "train"
    manifest.write_text("\n".join(json.dumps(r) for r in records))
    save_tokenizer(model, tmp_path / "tok")
    for split in ("all", "train"):
        assert main(["extract-text-features", "--data", str(manifest), "--encoder", "minilm", "--split", split,
                     "--out", str(tmp_path / f"text-{split}"), "--no-progress", "--device", "cpu"]) == 0
    args = ["extract-codes", "--tokenizer", str(tmp_path / "tok"), "--data", str(manifest), "--out",
            str(tmp_path / "codes"), "--image-size", "16", "--no-progress", "--device", "cpu",
            "--max-bad-fraction", "0.5", "--text-features"]
    assert main(args + [str(tmp_path / "text-all")]) == 2  # captions of the val image shift every later row
    assert not (tmp_path / "codes" / "index.json").exists()
    assert main(args + [str(tmp_path / "text-train")]) == 0
    assert CodeDataset(tmp_path / "codes").labels.tolist() == [0, 1, 3]
