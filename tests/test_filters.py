"""The --filter expression language (parser, three-valued logic, errors with positions), its report, and
its use wherever tar shards are read: streaming, the map-style view, extract-text-features, extract-codes
and train-tokenizer, with score sidecars read as metadata."""

import json
import tarfile

import numpy as np
import pytest
import torch

from argen.checkpoint import save_tokenizer
from argen.cli.main import main
from argen.data.codes import CodeDataset
from argen.data.extract import extract_text_features
from argen.data.filters import FilterError, SampleFilter
from argen.data.shards import ShardDataset
from argen.data.sidecars import sidecar_path, write_sidecar
from argen.data.text_features import TextFeatureStore
from argen.models.tokenizer import VQModel, vq_config
from test_webdataset import HashEncoder, _add, _image

PAPER = "min(width, height) >= 256 and similarity >= 0.28 and pwatermark < 0.5"
# per shard, per sample: (width, height, similarity, pwatermark); None leaves the field out
ROWS = [[(512, 384, 0.31, 0.1), (200, 384, 0.35, 0.1), (300, 300, 0.20, 0.2), (640, 480, 0.30, None),
         (256, 256, 0.29, 0.9)],
        [(300, 400, None, 0.1), (1024, 768, 0.40, 0.05), (256, 300, 0.28, 0.49), (128, 128, None, None),
         (300, 300, 0.33, 0.3)]]


def make_laion_shards(root):
    """Two img2dataset-style shards (key.jpg, key.txt, key.json with LAION-COCO metadata)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s, rows in enumerate(ROWS):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i, (w, h, sim, wm) in enumerate(rows):
                key = f"{s:05d}{i:04d}"
                meta = {"key": key, "status": "success", "width": w, "height": h, "caption": f"photo {s} {i}"}
                if sim is not None:
                    meta["similarity"] = sim
                if wm is not None:
                    meta["pwatermark"] = wm
                _add(tar, f"{key}.jpg", _image(rng, "JPEG", (20, 16)))
                _add(tar, f"{key}.json", json.dumps(meta).encode())
    return f"{root}/{{00000..00001}}.tar"


# kept by PAPER: shard 0 sample 0; shard 1 samples 1, 2, 4
KEPT = ["000000000", "000010001", "000010002", "000010004"]


def test_parser_precedence_and_three_valued_logic():
    f = SampleFilter("not a > 1 or b == 'x' and c < 2")  # (not (a > 1)) or ((b == 'x') and (c < 2))
    assert f.test({"a": 0})[0] and f.test({"a": 5, "b": "x", "c": 1})[0] and not f.test({"a": 5, "b": "y"})[0]
    assert SampleFilter("0.2 <= x < 0.5").test({"x": 0.3})[0] and not SampleFilter("0.2 <= x < 0.5").test({"x": 0.5})[0]
    assert SampleFilter("width / height <= 2 and -x < 0").test({"width": 4, "height": 2, "x": 1})[0]
    assert SampleFilter("max(a, b, 3) == 3 and abs(c) > 1").test({"a": 1, "b": 2, "c": -2})[0]
    assert SampleFilter("`odd key` >= 1e-3 and ok == true").test({"odd key": 0.01, "ok": True})[0]
    # a missing field makes its comparison unknown; Kleene logic settles what it can
    keep, outcomes, _ = SampleFilter("a > 1 and b > 1").test({"b": 0})
    assert not keep and outcomes == [None, False]
    assert SampleFilter("a > 1 or b > 1").test({"b": 5})[0]
    assert not SampleFilter("not a > 1").test({})[0]  # not unknown is unknown: dropped
    assert SampleFilter("not has(w) or w < 0.5").test({})[0] and not SampleFilter("has(w)").test({"w": None})[0]
    # wrong types and non-finite values are invalid, never compared
    keep, outcomes, problems = SampleFilter("w >= 1").test({"w": "big"})
    assert not keep and outcomes == [None] and problems == {("w", "invalid")}
    assert not SampleFilter("w >= 1").test({"w": float("nan")})[0]
    assert SampleFilter("x / y > 1 or has(x)").test({"x": 1, "y": 0})[0]  # division by zero: unknown


@pytest.mark.parametrize("text, where", [
    ("width >= ", "position 10"), ("width >= 256 an height", "position 14 ('an')"),
    ("foo(width) > 1", "unknown function 'foo' at position 1"), ("width ? 3", "character '?' at position 7"),
    ("min(width) > 3", "at least 2 arguments"), ("(a > 1 and b < 2", "'(' is not closed at position 1"),
    ("a > 1 and 3", "position 11"), ("3 < 'x'", "compares a number with a string"),
    ("width + 1", "is a number, but a condition"),
    ("has(3)", "takes a field name"), ("", "empty filter"), ("a > 1 or 'x' + 1 > 2", "position 10"),
])
def test_syntax_errors_name_the_position(text, where):
    with pytest.raises(FilterError, match=r"^--filter: .*") as err:
        SampleFilter(text)
    assert where in str(err.value) and "\n" not in str(err.value)


def test_report_counts_per_criterion_and_field():
    f = SampleFilter(PAPER)
    report = f.new_report()
    kept = [report.add({"width": w, "height": h, "similarity": s, "pwatermark": p})
            for rows in ROWS for w, h, s, p in rows]
    assert sum(kept) == 4
    data = report.to_dict()
    assert data["seen"] == 10 and data["kept"] == 4 and data["dropped"] == 6 and data["dropped_unknown"] == 2
    assert [(c["passed"], c["failed"], c["unknown"]) for c in data["criteria"]] == [(8, 2, 0), (7, 1, 2), (7, 1, 2)]
    assert data["fields"]["similarity"] == {"missing": 2, "invalid": 0}
    assert data["fields"]["pwatermark"]["missing"] == 2
    twice = f.new_report()
    twice.merge(data)
    twice.merge(data)
    assert twice.to_dict()["kept"] == 8 and twice.to_dict()["criteria"][2]["unknown"] == 4
    assert "kept 4 of 10 samples" in report.lines()[0]


def test_streaming_and_map_view_filter_with_sidecars(tmp_path):
    pattern = make_laion_shards(tmp_path / "data")
    ds = ShardDataset(pattern, sample_filter=PAPER)
    keys = [s.key for shard in range(2) for s in ds.iter_shard(shard)]
    assert keys == KEPT and ds.filter_report.to_dict()["kept"] == 4
    assert len(ShardDataset(pattern, sample_filter=PAPER)) == 4
    assert len(ShardDataset(pattern)) == 10
    # a sidecar supplies the similarity shard 1 sample 0 lacks, and its values override the metadata's
    write_sidecar(ds.shards[1], None, {"clip": {"name": "test"}}, ["similarity"],
                  {"000010000": {"similarity": 0.5}, "000010002": {"similarity": 0.1}}, {})
    ds = ShardDataset(pattern, sample_filter=PAPER)
    assert [s.key for s in ds.iter_shard(1)] == ["000010000", "000010001", "000010004"]
    # sidecars in another folder, named by the sidecars= option
    side = tmp_path / "side"
    sidecar_path(ds.shards[1]).rename(tmp_path / "moved.json")
    side.mkdir()
    (tmp_path / "moved.json").rename(sidecar_path(ds.shards[1], side))
    assert len(ShardDataset(pattern + f"?sidecars={side}", sample_filter=PAPER)) == 4 + 1 - 1
    # a sidecar of a shard that changed since it was scored is refused
    with open(ds.shards[1], "ab") as handle:
        handle.write(b"\0" * 1024)
    with pytest.raises(Exception, match="another version"):
        len(ShardDataset(pattern + f"?sidecars={side}", sample_filter=PAPER))


def test_filter_needs_shards(tmp_path, capsys):
    assert main(["extract-text-features", "--data", "demo", "--out", str(tmp_path / "t"), "--filter", "a > 1"]) == 2
    assert "applies to .tar shards only" in capsys.readouterr().err


def test_extract_text_features_and_codes_with_a_filter(tmp_path, capsys):
    pattern = make_laion_shards(tmp_path / "data")
    torch.manual_seed(0)
    save_tokenizer(VQModel(vq_config("VQ-tiny")).eval(), tmp_path / "tok")
    text = tmp_path / "text"
    base = ["extract-text-features", "--data", pattern, "--out", str(text), "--no-progress", "--device", "cpu"]
    assert main(base + ["--filter", "min(width, height) >= 256 and simlarity >= 0.28 an"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "position 49 ('an')" in err and not text.exists()
    assert main(base + ["--filter", PAPER]) == 0
    store = TextFeatureStore(text)
    assert len(store) == 4 and store.meta["filter"] == PAPER
    assert store.meta["filter_report"]["kept"] == 4 and store.meta["filter_report"]["dropped_unknown"] == 2
    assert [s["samples"] for s in store.meta["shards"]] == [1, 3]
    assert main(base + ["--filter", "width > 1"]) == 2  # a rerun with another filter is refused
    args = ["extract-codes", "--tokenizer", str(tmp_path / "tok"), "--data", pattern, "--image-size", "16",
            "--no-progress", "--device", "cpu", "--text-features", str(text)]
    assert main(args + ["--out", str(tmp_path / "bad")]) == 2  # features made with a filter, codes without
    assert "give extract-codes and extract-text-features the same --filter" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "codes"), "--filter", PAPER]) == 0
    codes = CodeDataset(tmp_path / "codes")
    assert len(codes) == 4 and codes.labels.tolist() == [0, 1, 2, 3]
    index = json.loads((tmp_path / "codes" / "index.json").read_text())
    assert index["filter"] == PAPER and index["filter_report"] == store.meta["filter_report"]
    # the features of the same filter made in two steps (one shard each, as two ranks would) agree
    extract_text_features(HashEncoder(), ShardDataset(pattern, sample_filter=PAPER), tmp_path / "r",
                          progress=False, rank=1, world_size=2)
    extract_text_features(HashEncoder(), ShardDataset(pattern, sample_filter=PAPER), tmp_path / "r",
                          progress=False, rank=0, world_size=2)
    assert TextFeatureStore(tmp_path / "r").meta["filter_report"] == store.meta["filter_report"]


def test_train_tokenizer_with_a_filter(tmp_path):
    pattern = make_laion_shards(tmp_path / "data")
    assert main(["train-tokenizer", "--data", pattern, "--filter", PAPER, "--out", str(tmp_path / "run"),
                 "--config", "VQ-tiny", "--image-size", "16", "--batch-size", "2", "--max-steps", "1", "--no-disc",
                 "--vgg-weights", "none", "--perceptual-weight", "0", "--device", "cpu", "--no-progress"]) == 0
    config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert config["filter"] == PAPER and config["filter_report"]["kept"] == 4
    assert main(["train-tokenizer", "--data", pattern, "--filter", "max(width) > 1", "--out", str(tmp_path / "r2"),
                 "--max-steps", "1"]) == 2
