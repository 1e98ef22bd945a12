"""ADM npz reading/writing, statistics caching and `argen evaluate` (errors, JSON contract)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import argen.evaluation.fid as fid_module
from argen.cli.main import main
from argen.evaluation.evaluate import batch_activations, cache_path, open_batch, stats_cache_dir
from argen.evaluation.fid import compute_statistics, paired_statistics, reconstruction_fid
from argen.evaluation.npz import ImageBatchFile, NpzImageWriter
from argen.models.inception import random_inception
from argen.utils.errors import ArgenError
from argen.utils.io import sha256_file


def images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def net():
    return random_inception(0)


@pytest.mark.parametrize("compressed", [False, True])
def test_streamed_reader_returns_the_stored_images(tmp_path, compressed):
    data = images(11)
    path = tmp_path / "batch.npz"
    (np.savez_compressed if compressed else np.savez)(path, data, np.arange(11))
    batch = ImageBatchFile(path)
    assert batch.count == 11 and batch.image_size == (16, 16) and batch.has("arr_1")
    chunks = list(batch.iter_batches(4))
    assert [c.shape[0] for c in chunks] == [4, 4, 3]
    assert np.array_equal(np.concatenate(chunks), data)
    assert batch.statistics() is None


def test_writer_streams_an_npz_that_numpy_reads(tmp_path):
    data = images(7)
    writer = NpzImageWriter(tmp_path / "out.npz", data.shape)
    writer.write(data[:3])
    writer.write(data[3:])
    path = writer.close({"arr_1": np.arange(7)})
    with np.load(path) as loaded:
        assert np.array_equal(loaded["arr_0"], data) and np.array_equal(loaded["arr_1"], np.arange(7))
    assert [p.name for p in tmp_path.iterdir()] == ["out.npz"]  # no temp file left behind


def test_writer_refuses_short_writes(tmp_path):
    writer = NpzImageWriter(tmp_path / "out.npz", (4, 16, 16, 3))
    writer.write(images(2))
    with pytest.raises(ValueError, match="wrote 2"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("array,message", [
    (np.zeros((4, 16, 16, 3), np.float32), "must be uint8"),
    (np.zeros((4, 3, 16, 16), np.uint8), "NCHW"),
    (np.zeros((16, 16, 3), np.uint8), "4-D"),
    (np.zeros((4, 16, 16, 4), np.uint8), "3 \\(RGB\\) channels"),
])
def test_malformed_batches_get_clear_errors(tmp_path, array, message):
    path = tmp_path / "bad.npz"
    np.savez(path, array)
    with pytest.raises(ArgenError, match=message):
        ImageBatchFile(path)


def test_missing_arr_0_and_non_npz(tmp_path):
    np.savez(tmp_path / "named.npz", images=images(4))
    with pytest.raises(ArgenError, match="no `arr_0`"):
        ImageBatchFile(tmp_path / "named.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ArgenError, match="cannot read"):
        ImageBatchFile(tmp_path / "text.npz")


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_reports_bad_inputs_with_exit_2(tmp_path, capsys):
    np.savez(tmp_path / "ref.npz", images(6, 16))
    np.savez(tmp_path / "nchw.npz", images(6, 16).transpose(0, 3, 1, 2))
    np.savez(tmp_path / "big.npz", images(6, 24))
    np.savez(tmp_path / "few.npz", images(3, 16))
    base = ["evaluate", str(tmp_path / "ref.npz")]
    for name, message in (("nchw.npz", "NCHW"), ("big.npz", "16x16 but the samples are 24x24"),
                          ("few.npz", "need at least 4")):
        code, _, err = run_cli(base + [str(tmp_path / name), "--inception", "random", "--quiet"], capsys)
        assert code == 2 and message in err and "Traceback" not in err
    code, _, err = run_cli(base + [str(tmp_path / "ref.npz"), "--inception", str(tmp_path / "none.pth")], capsys)
    assert code == 2 and "not found" in err


def test_activation_cache_is_keyed_by_content_and_network(tmp_path, net):
    path = tmp_path / "set.npz"
    np.savez(path, images(5, 16))
    batch = ImageBatchFile(path)
    first, source = batch_activations(batch, net, batch_size=8, use_cache=True, label="t", progress=False)
    assert source == "computed" and first.pool.shape == (5, 2048) and first.mu_s.shape == (2023,)
    cached = cache_path(path, sha256_file(path), net.weights_id)
    assert cached.is_file() and "random-seed0" in cached.name
    again, source = batch_activations(batch, net, batch_size=8, use_cache=True, label="t", progress=False)
    assert source == "cache" and np.array_equal(again.pool, first.pool)
    np.testing.assert_allclose(again.sigma_s, first.sigma_s)
    np.savez(path, images(5, 16, seed=1))  # new content: new key, recomputed
    changed, source = batch_activations(ImageBatchFile(path), net, 8, True, "t", progress=False)
    assert source == "computed" and not np.array_equal(changed.pool, first.pool)


def test_demo_reference_and_limit(tmp_path):
    demo = open_batch("demo", "reference", limit=5)
    assert demo.count == 5 and demo.image_size == (64, 64) and demo.key == "images"
    assert demo.cache_folders == [stats_cache_dir()]  # the user's cache, never the installed package
    chunks = list(demo.iter_batches(2))
    assert [c.shape[0] for c in chunks] == [2, 2, 1]
    with np.load(demo.path) as data:
        assert np.array_equal(np.concatenate(chunks), data["images"][:5])
    path = tmp_path / "b.npz"
    np.savez(path, images(4))
    name = cache_path(path, "0" * 64, "random-seed0", "arr_0", 3).name
    assert name == "b.npz.first3.0000000000000000.random-seed0.stats.npz"


def test_rfid_hooks_agree_with_separate_statistics(net, monkeypatch):
    originals = images(4, 16, seed=3)
    noisy = np.clip(originals.astype(int) + np.random.default_rng(4).integers(-40, 41, originals.shape), 0, 255)
    noisy = noisy.astype(np.uint8)
    pairs = [(originals[:3], noisy[:3]), (originals[3:], noisy[3:])]
    (mu_a, sigma_a), (mu_b, sigma_b) = paired_statistics(pairs, net, progress=False)
    want_a = compute_statistics([originals], net, batch_size=4, progress=False)
    np.testing.assert_allclose(mu_a, want_a[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sigma_a, want_a[1], rtol=1e-4, atol=1e-4)
    assert not np.allclose(mu_a, mu_b)
    seen = []
    monkeypatch.setattr(fid_module, "frechet_distance", lambda *args, **kw: seen.append((args, kw)) or 1.5)
    assert reconstruction_fid(pairs, net, progress=False, method="eigh") == 1.5
    (got_mu_a, _, got_mu_b, got_sigma_b), kwargs = seen[0]
    np.testing.assert_allclose(got_mu_a, mu_a, rtol=1e-6)
    np.testing.assert_allclose(got_mu_b, mu_b, rtol=1e-6)
    np.testing.assert_allclose(got_sigma_b, sigma_b, rtol=1e-6, atol=1e-9)
    assert kwargs == {"method": "eigh"}
    with pytest.raises(ArgenError, match="differ in shape"):
        paired_statistics([(originals, noisy[:2])], net, progress=False)


def test_precomputed_reference_statistics_are_used_unless_ignored(tmp_path, net, monkeypatch):
    import argen.evaluation.evaluate as evaluate_module

    ref_mu, ref_sigma = np.full(2048, 0.25), np.eye(2048) * 2.0
    ref_mu_s, ref_sigma_s = np.full(2023, -1.0), np.eye(2023) * 3.0
    np.savez(tmp_path / "ref.npz", images(4, 16, seed=5), mu=ref_mu, sigma=ref_sigma, mu_s=ref_mu_s,
             sigma_s=ref_sigma_s)
    np.savez(tmp_path / "smp.npz", images(4, 16, seed=6))
    calls = []
    monkeypatch.setattr(evaluate_module, "frechet_distance", lambda *args, **kw: calls.append(args) or 7.0)
    result = evaluate_module.evaluate(tmp_path / "ref.npz", tmp_path / "smp.npz", net, batch_size=4,
                                      use_cache=False, progress=False)
    assert result["reference_statistics"] == "precomputed in the reference npz"
    assert np.array_equal(calls[0][0], ref_mu) and np.array_equal(calls[0][1], ref_sigma)
    assert np.array_equal(calls[1][0], ref_mu_s) and np.array_equal(calls[1][1], ref_sigma_s)
    assert result["fid"] == result["sfid"] == 7.0 and result["inception_score_splits"] == 4
    assert 0 <= result["precision"] <= 1 and result["inception_score"] >= 1.0
    assert result["inception_weights"] == {"id": "random-seed0", "random": True,
                                           "matches_published_sha256_prefix": False}
    calls.clear()
    result = evaluate_module.evaluate(tmp_path / "ref.npz", tmp_path / "smp.npz", net, batch_size=4,
                                      use_cache=False, progress=False, use_reference_stats=False)
    assert result["reference_statistics"] == "computed" and not np.array_equal(calls[0][0], ref_mu)
    assert calls[0][0].shape == (2048,) and calls[1][0].shape == (2023,)


def _reference_folder(root):
    """Tiny reference images of several sizes and modes, one in a subfolder."""
    from PIL import Image

    rng = np.random.default_rng(7)
    (root / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "RGBA").save(root / "b.png")
    Image.fromarray(rng.integers(0, 256, (18, 50), dtype=np.uint8), "L").save(root / "c.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (64, 33, 3), dtype=np.uint8)).save(root / "sub" / "d.jpeg")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "sub" / "e.webp", lossless=True)
    (root / "notes.txt").write_text("not an image")
    return root


def test_a_reference_image_folder_is_read_like_the_npz_of_its_center_crops(tmp_path, capsys):
    from argen.data.images import load_image
    from argen.data.transforms import center_crop

    folder = _reference_folder(tmp_path / "coco")
    files = ["a.png", "b.png", "c.jpg", "sub/d.jpeg", "sub/e.webp"]  # sorted by relative path
    crops = np.stack([np.asarray(center_crop(load_image(folder / f), 16)) for f in files])
    np.savez(tmp_path / "ref.npz", crops)
    np.savez(tmp_path / "samples.npz", images(6, 16))
    batch = open_batch(folder, "reference", size=16)
    assert batch.count == 5 and batch.image_size == (16, 16)
    assert np.array_equal(np.concatenate(list(batch.iter_batches(2))), crops)

    results = {}
    for ref in (folder, tmp_path / "ref.npz"):
        out = tmp_path / f"{ref.name}.json"
        code, _, _ = run_cli(["evaluate", str(ref), str(tmp_path / "samples.npz"), "--inception", "random",
                              "--quiet", "--out", str(out)], capsys)
        assert code == 0
        results[ref.name] = json.loads(out.read_text())
    assert results["coco"]["fid"] == results["ref.npz"]["fid"]  # the same images: the same activations
    assert results["coco"]["num_reference"] == 5 and results["coco"]["reference_statistics"] == "computed"
    again = batch_activations(open_batch(folder, "reference", size=16), random_inception(0), 8, True, "t", False)
    assert again[1] == "cache"
    (folder / "a.png").write_bytes((folder / "sub" / "e.webp").read_bytes())  # changed content: recomputed
    assert batch_activations(open_batch(folder, "reference", size=16), random_inception(0), 8, True, "t",
                             False)[1] == "computed"
    assert open_batch(folder, "reference", limit=2, size=16).count == 2


def test_bad_reference_folders_are_one_line(tmp_path, capsys):
    np.savez(tmp_path / "samples.npz", images(6, 16))
    (tmp_path / "empty").mkdir()
    broken = _reference_folder(tmp_path / "broken")
    (broken / "zz.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for folder, message in ((tmp_path / "empty", "holds no images"), (broken, "zz.png")):
        code, _, err = run_cli(["evaluate", str(folder), str(tmp_path / "samples.npz"), "--inception", "random",
                                "--quiet", "--no-cache"], capsys)
        errors = [line for line in err.splitlines() if "error:" in line]  # after the random-weights warning
        assert code == 2 and "Traceback" not in err and len(errors) == 1 and message in errors[0]
