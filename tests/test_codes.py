"""Code-shard format: round trip, resume, dtype choice and validation errors."""

import json

import numpy as np
import pytest
import torch

from argen.data.codes import CodeDataset, CodeShardWriter
from argen.models.gpt import gpt_config
from argen.utils.errors import ArgenError


def _meta(**kw):
    meta = {"kind": "c2i", "codebook_size": 512, "grid": [4, 4], "image_size": 64, "num_augs": 2,
            "num_classes": 10, "class_names": [str(i) for i in range(10)], "tokenizer": {"name": "VQ-tiny"}}
    meta.update(kw)
    return meta


def _write(tmp_path, counts=(3, 2), **kw):
    writer = CodeShardWriter(tmp_path, _meta(**kw))
    rng = np.random.default_rng(0)
    data = []
    for i, n in enumerate(counts):
        codes = rng.integers(0, writer.meta["codebook_size"], size=(n, 2, 4, 4))
        labels = rng.integers(0, 10, size=n)
        writer.write_shard(i, codes, labels)
        data.append((codes, labels))
    writer.finalize()
    return writer, data


def test_round_trip(tmp_path):
    writer, data = _write(tmp_path)
    ds = CodeDataset(tmp_path)
    assert len(ds) == 5 and ds.kind == "c2i" and ds.grid == (4, 4) and ds.num_augs == 2
    assert np.load(tmp_path / "codes-00000.npy").dtype == np.uint16
    codes, label = ds.get(4, 1)  # second shard, row 1
    assert codes.dtype == torch.int64 and codes.shape == (16,)
    assert torch.equal(codes, torch.from_numpy(data[1][0][1, 1].reshape(-1)).long())
    assert label == int(data[1][1][1])
    batch, labels = ds.get_batch([0, 4], [0, 1])
    assert batch.shape == (2, 16) and labels.tolist() == [int(data[0][1][0]), int(data[1][1][1])]
    index = json.loads((tmp_path / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [3, 2] and index["format"] == "argen-codes"


def test_large_codebook_uses_int32(tmp_path):
    _write(tmp_path, codebook_size=70000)
    assert np.load(tmp_path / "codes-00000.npy").dtype == np.int32


def test_rerun_skips_done_and_rejects_other_settings(tmp_path):
    _write(tmp_path)
    writer = CodeShardWriter(tmp_path, _meta())
    assert writer.is_done(0) and writer.is_done(1) and not writer.is_done(2)
    with pytest.raises(ArgenError, match="different settings"):
        CodeShardWriter(tmp_path, _meta(codebook_size=1024))


def test_write_rejects_bad_shapes(tmp_path):
    writer = CodeShardWriter(tmp_path, _meta())
    with pytest.raises(ArgenError, match="codes must be"):
        writer.write_shard(0, np.zeros((2, 2, 8, 8)), np.zeros(2))
    with pytest.raises(ArgenError, match="out of range"):
        writer.write_shard(0, np.full((2, 2, 4, 4), 600), np.zeros(2))


def test_check_compatible(tmp_path):
    _write(tmp_path)
    ds = CodeDataset(tmp_path)
    ds.check_compatible(gpt_config("GPT-tiny"))  # vocab 512, grid 64/16 = 4, 10 classes
    with pytest.raises(ArgenError, match="codebook size"):
        ds.check_compatible(gpt_config("GPT-tiny", vocab_size=1024))
    with pytest.raises(ArgenError, match="grid"):
        ds.check_compatible(gpt_config("GPT-tiny", image_size=128))
    with pytest.raises(ArgenError, match="t2i"):
        ds.check_compatible(gpt_config("GPT-tiny", kind="t2i"))
    low, top = int(ds.labels.min()), int(ds.labels.max())
    ds.check_compatible(gpt_config("GPT-tiny", num_classes=top + 1))  # just enough classes
    with pytest.raises(ArgenError, match=rf"span \[{low}, {top}\] but the generator has {top} classes"):
        ds.check_compatible(gpt_config("GPT-tiny", num_classes=top))


def test_missing_and_mismatched_shards(tmp_path):
    _write(tmp_path)
    (tmp_path / "labels-00001.npy").unlink()
    with pytest.raises(ArgenError, match="missing"):
        CodeDataset(tmp_path)
    np.save(tmp_path / "labels-00001.npy", np.zeros(5, dtype=np.int64))
    with pytest.raises(ArgenError, match="expects"):
        CodeDataset(tmp_path)
    with pytest.raises(ArgenError, match="extract-codes"):
        CodeDataset(tmp_path / "nowhere")
