"""WebDataset tar shards: shard sources, sample parsing, bad members and bad tars, extract-codes and
extract-text-features (resume after SIGKILL, ranks under torchrun), tokenizer training and evaluation."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from argen.checkpoint import save_tokenizer
from argen.cli.main import main
from argen.data.codes import CodeDataset
from argen.data.datasets import open_dataset
from argen.data.extract import extract_codes, extract_text_features
from argen.data.shards import ShardDataset, ShardError, expand_braces, resolve_shards, split_shards
from argen.data.text_encoders import load_text_encoder
from argen.data.text_features import TextFeatureStore
from argen.data.transforms import crop_variants, to_tensor
from argen.models.tokenizer import VQModel, vq_config
from argen.utils.errors import ArgenError

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _image(rng, fmt="PNG", size=(24, 20)):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def make_shards(root, num_shards=3, per_shard=4, kind="t2i", bad=True):
    """Shards root/{00000..N-1}.tar like img2dataset's (key.jpg|png, key.txt, key.json), with bad members:
    shard 0 sample 1 is not an image, shard 1 sample 2 is a truncated JPEG, shard 2 sample 0 has no
    caption / class id."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(num_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                image = _image(rng)
                ext = "png"
                if bad and (s, i) == (0, 1):
                    image = b"this is not an image"
                if bad and (s, i) == (1, 2):
                    image, ext = _image(rng, "JPEG")[:200], "jpg"
                _add(tar, f"{key}.{ext}", image)
                missing = bad and (s, i) == (2, 0)
                meta = {"key": key, "width": 24, "height": 20}
                if kind == "t2i" and not missing:
                    if i == 3:
                        meta["caption"] = [f"first caption {key}", f"second caption {key}"]
                    else:
                        _add(tar, f"{key}.txt", f"a photo number {s} {i}".encode())
                if kind == "c2i" and not missing:
                    _add(tar, f"{key}.cls", str((s * per_shard + i) % 5).encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
    return f"{root}/{{00000..{num_shards - 1:05d}}}.tar"


class HashEncoder:
    """A deterministic stand-in text encoder: a caption's features depend only on its text."""

    name, dim, max_length = "hash", 8, 16

    def encode_unpadded(self, prompts):
        out = []
        for text in prompts:
            seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
            length = 2 + len(text.split()) % 5
            out.append(torch.randn(length, self.dim, generator=torch.Generator().manual_seed(seed)))
        return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VQModel(vq_config("VQ-tiny")).eval()


def _codes(out):
    return {p.name: np.load(p) for p in sorted(out.glob("*.npy"))}


def test_shard_sources(tmp_path):
    assert expand_braces("d/{00..02}.tar") == ["d/00.tar", "d/01.tar", "d/02.tar"]
    assert expand_braces("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
    pattern = make_shards(tmp_path / "data", num_shards=3, bad=False)
    tars = [tmp_path / "data" / f"{s:05d}.tar" for s in range(3)]
    assert resolve_shards(pattern) == tars
    assert resolve_shards(str(tmp_path / "data")) == tars  # a folder of tars
    (tmp_path / "list.txt").write_text("# shards\ndata/00002.tar\n\ndata/{00000..00001}.tar\n")
    assert resolve_shards(str(tmp_path / "list.txt")) == [tars[2], tars[0], tars[1]]
    assert resolve_shards("shards:" + str(tars[1])) == [tars[1]]
    assert split_shards(7, 1, 2) == [1, 3, 5] and split_shards(7, 1, 2, 1, 2) == [3]
    parts = [split_shards(7, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert sorted(s for p in parts for s in p) == list(range(7))  # no duplicates, no gaps
    a, b = ShardDataset(pattern), ShardDataset(f"{tmp_path}/data/{{00000..00001}}.tar")
    assert a.sha256 != b.sha256 and a.sha256 == ShardDataset(str(tmp_path / "data")).sha256
    assert isinstance(open_dataset(pattern), ShardDataset) and open_dataset(str(tmp_path / "data")).kind == "t2i"
    with pytest.raises(ShardError, match="00003.tar"):
        ShardDataset(f"{tmp_path}/data/{{00000..00003}}.tar")
    with pytest.raises(ArgenError, match="unknown shard option"):
        ShardDataset(pattern + "?caption=x")
    with pytest.raises(ArgenError, match="not an uncompressed"):
        resolve_shards(str(tmp_path / "x.tar.gz"))


def test_captions_labels_and_map_style_view(tmp_path):
    pattern = make_shards(tmp_path / "t2i", num_shards=3)
    ds = ShardDataset(pattern)
    samples = list(ds.iter_shard(0))
    assert ds.kind == "t2i" and [s.key for s in samples] == [f"00000{i:04d}" for i in range(4)]
    assert samples[0].captions == ["a photo number 0 0"]  # from key.txt
    assert samples[3].captions == ["first caption 000000003", "second caption 000000003"]  # JSON list
    assert ds.problem(samples[1]) is None  # the bad image is found when decoding
    assert ds.problem(next(ds.iter_shard(2))).startswith("no caption")
    assert ShardDataset(pattern + "?caption_key=key").captions(0) == ["000000000"]
    assert ShardDataset(pattern + "?kind=c2i").kind == "c2i"
    c2i = ShardDataset(make_shards(tmp_path / "c2i", kind="c2i"))
    assert c2i.kind == "c2i" and [c2i.label(i) for i in range(5)] == [0, 1, 2, 3, 4]
    assert c2i.problem(next(c2i.iter_shard(2))).startswith("no class id")
    (tmp_path / "json").mkdir()
    with tarfile.open(tmp_path / "json" / "a.tar", "w") as tar:
        _add(tar, "x.png", _image(np.random.default_rng(1)))
        _add(tar, "x.json", json.dumps({"label": 7, "caption": "seven"}).encode())
    assert ShardDataset(str(tmp_path / "json" / "a.tar")).label(0) == 7  # class id from the JSON
    with tarfile.open(tmp_path / "json" / "b.tar", "w") as tar:  # metadata the kind does not need is not checked
        for key, extra in (("a", {"cls": b"3", "json": b"{broken"}), ("b", {"cls": b"x", "txt": b"a cat"}),
                           ("c", {"json": b"{broken"})):
            _add(tar, f"{key}.png", _image(np.random.default_rng(2)))
            for ext, data in extra.items():
                _add(tar, f"{key}.{ext}", data)
    mixed = str(tmp_path / "json" / "b.tar")
    t2i, c2i = ShardDataset(mixed, kind="t2i"), ShardDataset(mixed)
    a, b, c = t2i.iter_shard(0)
    assert c2i.kind == "c2i" and c2i.problem(a) is None and t2i.problem(b) is None
    assert t2i.problem(a).startswith("unreadable JSON") and c2i.problem(b) == "class id b'x' is not an integer"
    assert t2i.problem(c).startswith("unreadable JSON") and c2i.problem(c).startswith("unreadable JSON")
    # the map-style view: one record per sample over all shards, in order
    assert len(ds) == 12 and ds.source(5) == f"{tmp_path}/t2i/00001.tar:000010001"
    assert np.array_equal(np.asarray(ds.load(4)), np.asarray(Image.open(io.BytesIO(next(ds.iter_shard(1)).image))))
    assert ds.captions(7) == ["first caption 000010003", "second caption 000010003"]
    with pytest.raises(Exception, match="unreadable"):
        ds.load(1)


def _corrupt(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    else:
        with tarfile.open(path) as tar:
            offset = tar.getmembers()[4].offset
        path.write_bytes(data[:offset] + b"x" * 100 + data[offset + 100:])


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_bad_tar_stops_with_its_name_unless_skipped(tmp_path, model, how, capsys):
    pattern = make_shards(tmp_path / "data", kind="c2i", bad=False)
    _corrupt(tmp_path / "data" / "00001.tar", how)
    ds = ShardDataset(pattern)
    with pytest.raises(ShardError, match=f"00001.tar is {how}"):
        extract_codes(model, ds, tmp_path / "codes", 16, progress=False)
    save_tokenizer(model, tmp_path / "tok")
    assert main(["extract-codes", "--tokenizer", str(tmp_path / "tok"), "--data", pattern, "--image-size", "16",
                 "--out", str(tmp_path / "cli"), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "00001.tar is" in err[-1] and "Traceback" not in "".join(err)
    with pytest.raises(ShardError, match="00001.tar"):
        len(ShardDataset(pattern))
    index = extract_codes(model, ShardDataset(pattern + "?skip_bad_shards=1"), tmp_path / "codes", 16,
                          progress=False)
    assert [s["count"] for s in index["shards"]] == [4, 0, 4] and index["num_images"] == 8
    assert [(s["index"], s["shard"]) for s in index["skipped_shards"]] == [(1, "00001.tar")]
    assert len(ShardDataset(pattern + "?skip_bad_shards=1")) == 8


def test_extract_codes_c2i_matches_the_images_and_skips_bad_members(tmp_path, model):
    pattern = make_shards(tmp_path / "data", kind="c2i")
    ds = ShardDataset(pattern)
    with pytest.raises(ArgenError, match="failed to load"):  # 3 bad of 12 is more than 5%
        extract_codes(model, ds, tmp_path / "strict", 16, progress=False)
    index = extract_codes(model, ds, tmp_path / "codes", 16, flip=True, batch_size=3, max_bad_fraction=0.3,
                          progress=False)
    assert [s["count"] for s in index["shards"]] == [3, 3, 3] and index["num_classes"] == 5
    assert index["shards_sha256"] == ds.sha256 and index["num_images"] == 9
    codes = CodeDataset(tmp_path / "codes")
    good = [i for i in range(12) if i not in (1, 6, 8)]  # not an image, truncated JPEG, no class id
    assert codes.labels.tolist() == [i % 5 for i in good]
    for row, i in enumerate(good):
        crops, _ = crop_variants(ds.load(i), 16, flip=True)
        with torch.no_grad():
            expected = model.encode(torch.stack([to_tensor(c) for c in crops]))  # (2, h, w)
        assert torch.equal(codes.get(row, 1)[0], expected[1].reshape(-1))
    # two DataLoader workers split the shards and give the same files
    extract_codes(model, ds, tmp_path / "workers", 16, flip=True, batch_size=3, max_bad_fraction=0.3,
                  num_workers=2, progress=False)
    a, b = _codes(tmp_path / "codes"), _codes(tmp_path / "workers")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # a rerun with other shards is refused, as for folders
    other = ShardDataset(f"{tmp_path}/data/{{00000..00001}}.tar")
    with pytest.raises(ArgenError, match="shards_sha256"):
        extract_codes(model, other, tmp_path / "codes", 16, flip=True, batch_size=3, progress=False)


def test_t2i_pipeline_with_minilm(tmp_path, model):
    pattern = make_shards(tmp_path / "data", kind="t2i")
    save_tokenizer(model, tmp_path / "tok")
    text = tmp_path / "text"
    base = ["extract-text-features", "--data", pattern, "--out", str(text), "--no-progress", "--device", "cpu"]
    assert main(base) == 2  # 1 of the 12 samples has no caption: more than 5%
    assert main(base + ["--max-bad-fraction", "0.2", "--batch-size", "5"]) == 0
    store = TextFeatureStore(text)
    ds = ShardDataset(pattern)
    captions = [c for s in range(3) for sample in ds.iter_shard(s) for c in sample.captions]
    assert len(store) == len(captions) == 14 and store.dim == 384 and store.meta["encoder"] == "minilm"
    assert [s["start"] for s in store.meta["shards"]] == [0, 5, 10]
    expected = load_text_encoder("minilm").encode_unpadded(captions[9:12])
    for row, features in zip(range(9, 12), expected):
        torch.testing.assert_close(store.unpadded(row), features, atol=2e-2, rtol=1e-2)
    args = ["extract-codes", "--tokenizer", str(tmp_path / "tok"), "--data", pattern, "--image-size", "16",
            "--no-progress", "--device", "cpu", "--max-bad-fraction", "0.3"]
    assert main(args + ["--out", str(tmp_path / "codes")]) == 2  # no --text-features
    assert main(args + ["--out", str(tmp_path / "codes"), "--text-features", str(text)]) == 0
    codes = CodeDataset(tmp_path / "codes")
    assert codes.kind == "t2i" and len(codes) == 9 and codes.text_features_dir == text.resolve()
    # the row of each usable image's first caption: shard 0 rows 0, [1: not an image], 2, 3-4;
    # shard 1 rows 5, 6, [7: truncated], 8-9; shard 2 [no caption], 10, 11, 12-13
    assert codes.labels.tolist() == [0, 2, 3, 5, 6, 8, 10, 11, 12]
    # caption features made from other shards are refused
    extract_text_features(HashEncoder(), ShardDataset(f"{tmp_path}/data/{{00000..00001}}.tar"), tmp_path / "two",
                          progress=False, max_bad_fraction=0.2)
    assert main(args + ["--out", str(tmp_path / "codes2"), "--text-features", str(tmp_path / "two")]) == 2
    assert not (tmp_path / "codes2" / "index.json").exists()


def test_text_features_ranks_and_rerun(tmp_path):
    pattern = make_shards(tmp_path / "data", num_shards=5)
    ds = ShardDataset(pattern)
    one = extract_text_features(HashEncoder(), ds, tmp_path / "one", progress=False, max_bad_fraction=0.2)
    assert extract_text_features(HashEncoder(), ds, tmp_path / "two", progress=False, max_bad_fraction=0.2,
                                 rank=1, world_size=2) is None
    assert sorted(p.name for p in (tmp_path / "two" / "parts").glob("part-*")) == ["part-00001.json",
                                                                                  "part-00003.json"]
    with pytest.raises(ArgenError, match="not finished"):
        extract_text_features(HashEncoder(), ShardDataset(pattern), tmp_path / "two", progress=False,
                              max_bad_fraction=0.2, rank=0, world_size=3)
    two = extract_text_features(HashEncoder(), ds, tmp_path / "two", progress=False, max_bad_fraction=0.2,
                                rank=0, world_size=2)
    assert one == two
    for name in ("features.npy", "offsets.npy"):
        assert np.array_equal(np.load(tmp_path / "one" / name), np.load(tmp_path / "two" / name))
    meta = (tmp_path / "one" / "meta.json").read_text()
    assert meta == (tmp_path / "two" / "meta.json").read_text()
    before = (tmp_path / "one" / "features.npy").stat().st_mtime_ns
    assert extract_text_features(HashEncoder(), ds, tmp_path / "one", progress=False) == one  # nothing rewritten
    assert (tmp_path / "one" / "features.npy").stat().st_mtime_ns == before
    with pytest.raises(ArgenError, match="caption_key"):
        extract_text_features(HashEncoder(), ShardDataset(pattern + "?caption_key=key"), tmp_path / "one",
                              progress=False)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from argen.data import codes, extract
    from argen.data.shards import ShardDataset
    from argen.checkpoint import load_tokenizer

    what, pattern, tok, out, kill_after = sys.argv[1:6]
    calls = []

    def killing(write):
        def wrapped(*args, **kwargs):
            result = write(*args, **kwargs)
            calls.append(1)
            if len(calls) == int(kill_after):
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return wrapped

    ds = ShardDataset(pattern)
    if what == "codes":  # killed after shard 2's codes file, before its labels file
        codes.atomic_save_npy = killing(codes.atomic_save_npy)
        extract.extract_codes(load_tokenizer(tok), ds, out, 16, flip=True, batch_size=2, max_bad_fraction=0.3,
                              progress=False)
    else:  # killed after shard 1's features, before its lengths and part-00001.json
        sys.path.insert(0, tok)
        from test_webdataset import HashEncoder
        extract.atomic_save_npy = killing(extract.atomic_save_npy)
        extract.extract_text_features(HashEncoder(), ds, out, batch_size=3, max_bad_fraction=0.2, progress=False)
""")


@pytest.mark.parametrize("what", ["codes", "text"])
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, model, what):
    pattern = make_shards(tmp_path / "data", num_shards=4, kind="c2i" if what == "codes" else "t2i")
    save_tokenizer(model, tmp_path / "tok")
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    tok = str(tmp_path / "tok") if what == "codes" else os.path.dirname(os.path.abspath(__file__))

    def run(out, kill_after):
        args = [sys.executable, str(script), what, pattern, tok, str(out), str(kill_after)]
        return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=120)

    full = run(tmp_path / "full", -1)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = run(tmp_path / "cut", 5 if what == "codes" else 3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    final = "index.json" if what == "codes" else "meta.json"
    assert not (tmp_path / "cut" / final).exists()
    first = tmp_path / "cut" / ("codes-00000.npy" if what == "codes" else "parts/part-00000.json")
    before = first.stat().st_mtime_ns
    again = run(tmp_path / "cut", -1)
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = _codes(tmp_path / "full"), _codes(tmp_path / "cut")
    assert a.keys() == b.keys() and len(a) >= 2 and all(np.array_equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / final).read_text() == (tmp_path / "cut" / final).read_text()
    assert first.stat().st_mtime_ns == before  # the shard done before the kill was not redone


def test_ranks_take_every_world_size_th_shard(tmp_path, model, monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    ds = ShardDataset(make_shards(tmp_path / "data", num_shards=5, kind="c2i", bad=False))
    out = tmp_path / "codes"
    assert extract_codes(model, ds, out, 16, rank=1, world_size=2, progress=False) is None
    assert sorted(p.name for p in out.glob("codes-*")) == ["codes-00001.npy", "codes-00003.npy"]
    with pytest.raises(ArgenError, match="not finished"):
        extract_codes(model, ds, out, 16, rank=0, world_size=3, progress=False)
    index = extract_codes(model, ds, out, 16, rank=0, world_size=2, progress=False)
    assert [s["count"] for s in index["shards"]] == [4] * 5


def test_torchrun_two_ranks_split_shards_and_match_one(tmp_path, model):
    pattern = make_shards(tmp_path / "data", num_shards=3, kind="c2i")
    save_tokenizer(model, tmp_path / "tok")
    args = ["extract-codes", "--tokenizer", str(tmp_path / "tok"), "--data", pattern, "--image-size", "16",
            "--flip", "--no-progress", "--device", "cpu", "--max-bad-fraction", "0.3"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "argen.cli.main", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = sorted(line.split("rank ")[1][:len("0 wrote code shard 0")] for line in proc.stderr.splitlines()
                  if " wrote code shard " in line)
    assert done == ["0 wrote code shard 0", "0 wrote code shard 2", "1 wrote code shard 1"]
    a, b = _codes(tmp_path / "one"), _codes(tmp_path / "two")
    assert len(a) == 6 and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert (tmp_path / "one" / "index.json").read_text() == (tmp_path / "two" / "index.json").read_text()


def test_torchrun_text_features_match_one_process(tmp_path):
    pattern = make_shards(tmp_path / "data", num_shards=3, bad=False)
    args = ["extract-text-features", "--data", pattern, "--no-progress", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "argen.cli.main", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("features.npy", "offsets.npy"):
        assert np.array_equal(np.load(tmp_path / "one" / name), np.load(tmp_path / "two" / name))
    assert (tmp_path / "one" / "meta.json").read_text() == (tmp_path / "two" / "meta.json").read_text()
    assert len(TextFeatureStore(tmp_path / "two")) == 15
    ranks = [json.loads((tmp_path / "two" / "parts" / f"part-{s:05d}.json").read_text())["rank"] for s in range(3)]
    assert ranks == [0, 1, 0]


def test_train_and_eval_tokenizer_on_shards(tmp_path, model):
    from argen.training.tokenizer import TokenizerTrainConfig, train_tokenizer

    pattern = make_shards(tmp_path / "data", num_shards=2, per_shard=6, kind="t2i", bad=False)
    cfg = TokenizerTrainConfig(out=str(tmp_path / "run"), data=pattern, config="VQ-tiny", image_size=16,
                               batch_size=4, max_steps=3, use_disc=False, vgg_weights="none", perceptual_weight=0,
                               device="cpu", progress=False, log_every=1)
    summary = train_tokenizer(cfg)
    assert summary["steps"] == 3 and (tmp_path / "run" / "tokenizer.safetensors").is_file()
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 3
    assert main(["eval-tokenizer", "--tokenizer", str(tmp_path / "run"), "--data", pattern, "--out",
                 str(tmp_path / "eval"), "--image-size", "16", "--vgg-weights", "none", "--no-progress",
                 "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["psnr"] > 0 and metrics["num_images"] == 12 and metrics["skipped_images"] == 0
