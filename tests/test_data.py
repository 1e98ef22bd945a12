"""Datasets, robust image loading and transforms."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from argen.data.datasets import (
    ClassFolderDataset,
    DemoDataset,
    JsonlDataset,
    TransformedDataset,
    collate_skip,
    open_dataset,
)
from argen.data.images import BadImage, FailureTracker
from argen.data.transforms import EvalTransform, TrainTransform, center_crop, crop_variants, to_tensor, to_uint8
from argen.utils.errors import ArgenError


def test_demo_dataset_splits_are_disjoint_and_deterministic():
    train, val, full = DemoDataset("train"), DemoDataset("val"), DemoDataset("all")
    assert len(train) + len(val) == len(full) == 3822
    assert 250 < len(val) < 500
    assert set(train.indices).isdisjoint(val.indices)
    assert np.array_equal(DemoDataset("val").images, val.images)
    assert len(full.class_names) == 10 and full.labels.max() == 9
    assert len(DemoDataset("all", label="subcategory").class_names) == 99
    # both vendors of an emoji share a split
    names_by_vendor = [{n for n, v in zip(val.names, val.vendor) if v == k} for k in (0, 1)]
    assert names_by_vendor[0] == names_by_vendor[1]
    image = val.load(0)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert np.asarray(image)[0, 0].tolist() == [255, 255, 255]  # composited on white
    assert val.captions(0)[0].startswith("an emoji of ")


def _save(path, image, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)
    return path


@pytest.fixture()
def odd_folder(tmp_path):
    root = tmp_path / "data"
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    _save(root / "cats" / "rgb.png", rgb)
    _save(root / "cats" / "cmyk.jpg", rgb.convert("CMYK"))
    _save(root / "cats" / "palette.png", rgb.convert("P"))
    la = Image.new("LA", (30, 30), (100, 0))  # fully transparent grey -> white
    _save(root / "dogs" / "la.png", la)
    sixteen = Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16))
    _save(root / "dogs" / "deep.png", sixteen)
    (root / "dogs" / "corrupt.jpg").write_bytes(b"not an image at all")
    good = (root / "cats" / "rgb.png").read_bytes()
    (root / "dogs" / "truncated.png").write_bytes(good[: len(good) // 2])
    _save(root / "dogs" / "tiny.png", Image.new("RGB", (3, 3)))
    return root


def test_odd_modes_convert_and_bad_files_are_rejected(odd_folder):
    ds = ClassFolderDataset(odd_folder, min_size=8)
    assert ds.class_names == ["cats", "dogs"] and len(ds) == 8
    ok, bad = {}, {}
    for i in range(len(ds)):
        try:
            ok[ds.paths[i].name] = ds.load(i)
        except BadImage as exc:
            bad[ds.paths[i].name] = str(exc)
    assert set(ok) == {"rgb.png", "cmyk.jpg", "palette.png", "la.png", "deep.png"}
    assert set(bad) == {"corrupt.jpg", "truncated.png", "tiny.png"}
    assert all(im.mode == "RGB" for im in ok.values())
    assert np.asarray(ok["la.png"]).min() == 255
    assert np.asarray(ok["deep.png"]).min() == 255
    assert "too small" in bad["tiny.png"]


def test_failure_tracker_counts_and_stops(odd_folder, caplog):
    ds = ClassFolderDataset(odd_folder)
    tds = TransformedDataset(ds, EvalTransform(16))
    images, indices, labels, failures = collate_skip([tds[i] for i in range(len(ds))])
    assert images.shape == (5, 3, 16, 16) and len(failures) == 3
    tracker = FailureTracker(max_fraction=0.5, min_count=1)
    tracker.ok(len(indices))
    for source, reason in failures:
        tracker.fail(source, reason)
    assert tracker.summary()["skipped"] == 3
    assert "truncated.png" in caplog.text
    assert tracker.skipped_message().startswith("skipped 3 unreadable images: ")
    one = FailureTracker(max_fraction=1.0, min_count=100, what="captions")
    one.fail("row 7", "bad")
    assert one.skipped_message() == "skipped 1 unreadable caption: row 7"
    for i in range(11):
        one.fail(f"row {i}", "bad")
    assert one.skipped_message().endswith("row 8 and 2 more")
    strict = FailureTracker(max_fraction=0.2, min_count=1)
    strict.ok(5)
    with pytest.raises(ArgenError, match="failed to load"):
        for source, reason in failures:
            strict.fail(source, reason)
    everything_bad = FailureTracker(max_fraction=1.0, min_count=100)
    everything_bad.fail("x", "bad")
    with pytest.raises(ArgenError, match="all 1"):
        everything_bad.check(final=True)


def test_folder_errors(tmp_path):
    with pytest.raises(ArgenError, match="no such file"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArgenError, match="no class subfolders"):
        ClassFolderDataset(tmp_path / "empty")
    _save(tmp_path / "d" / "a" / "x.png", Image.new("RGB", (16, 16)))
    (tmp_path / "d" / "b").mkdir()
    with pytest.raises(ArgenError, match="holds no images"):
        ClassFolderDataset(tmp_path / "d")


def test_folder_split_subfolder(tmp_path):
    _save(tmp_path / "r" / "train" / "a" / "x.png", Image.new("RGB", (16, 16)))
    _save(tmp_path / "r" / "val" / "a" / "y.png", Image.new("RGB", (16, 16)))
    _save(tmp_path / "r" / "val" / "b" / "z.png", Image.new("RGB", (16, 16)))
    assert len(open_dataset(tmp_path / "r", split="val")) == 2
    assert open_dataset(tmp_path / "r", split="train").class_names == ["a"]


def test_jsonl_manifest(tmp_path):
    _save(tmp_path / "img" / "a.png", Image.new("RGB", (16, 16), (255, 0, 0)))
    lines = [{"image": "img/a.png", "caption": "a red square", "split": "train"},
             {"path": str(tmp_path / "img" / "a.png"), "captions": ["one", "two"], "split": "val"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = open_dataset(manifest, split="all")
    assert isinstance(ds, JsonlDataset) and len(ds) == 2 and ds.kind == "t2i"
    assert ds.captions(1) == ["one", "two"] and ds.caption_offsets.tolist() == [0, 1, 3]
    assert np.asarray(ds.load(0))[0, 0].tolist() == [255, 0, 0]
    assert len(open_dataset(manifest, split="val")) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "img/a.png"}) + "\n")
    with pytest.raises(ArgenError, match="bad.jsonl:1: missing caption"):
        JsonlDataset(bad)
    bad.write_text(json.dumps({"caption": "x"}) + "\n")
    with pytest.raises(ArgenError, match="missing image column"):
        JsonlDataset(bad)
    bad.write_text("{oops\n")
    with pytest.raises(ArgenError, match="not valid JSON"):
        JsonlDataset(bad)
    with pytest.raises(ArgenError, match="does not exist"):
        JsonlDataset(tmp_path / "none.jsonl")


def _adm_center_crop_arr(pil_image, image_size):
    """guided-diffusion's `center_crop_arr` (improved_diffusion/image_datasets.py), as published."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


@pytest.mark.parametrize("height,width,size", [(200, 300, 64), (200, 300, 48), (90, 70, 64), (33, 65, 16)])
def test_center_crop_follows_adm_recipe(height, width, size):
    rng = np.random.default_rng(height * width)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    out = center_crop(image, size)
    assert out.size == (size, size)
    assert np.array_equal(np.asarray(out), _adm_center_crop_arr(image, size))


def test_center_crop_keeps_the_center():
    wide = Image.new("RGB", (100, 50))
    wide.paste((255, 0, 0), (0, 0, 25, 50))  # left quarter red: cropped away by a center crop
    assert np.asarray(center_crop(wide, 50))[:, :, 0].max() == 0


def test_train_transform_is_seeded_and_random():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    t = TrainTransform(48)
    a = t(image, torch.Generator().manual_seed(3))
    b = t(image, torch.Generator().manual_seed(3))
    c = [t(image, torch.Generator().manual_seed(s)) for s in range(6)]
    assert a.shape == (3, 48, 48) and torch.equal(a, b)
    assert any(not torch.equal(c[0], x) for x in c[1:])
    assert -1.0 <= a.min() and a.max() <= 1.0


def test_crop_variants_counts_and_flip():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (80, 96, 3), dtype=np.uint8))
    crops, names = crop_variants(image, 32, ten_crop=True, flip=True, crop_range=1.1)
    assert len(crops) == 10 and len(set(names)) == 10 and all(c.size == (32, 32) for c in crops)
    assert np.array_equal(np.asarray(crops[5]), np.asarray(crops[0])[:, ::-1])
    big = center_crop(image, 35)
    assert np.array_equal(np.asarray(crops[0]), np.asarray(big)[:32, :32])
    assert np.array_equal(np.asarray(crops[3]), np.asarray(big)[3:, 3:])
    assert len(crop_variants(image, 32, flip=True)[0]) == 2
    assert len(crop_variants(image, 32)[0]) == 1
    x = to_tensor(crops[0])[None]
    assert np.array_equal(to_uint8(x)[0], np.asarray(crops[0]))
