"""FID Inception: published weight layout, preprocessing (TF1 resize, normalisation), outputs, strict loading."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from argen.models.inception import (
    INPUT_SIZE,
    FIDInception,
    load_inception,
    random_inception,
    tf1_resize_bilinear,
)
from argen.utils.errors import ArgenError, CheckpointError

LAYOUT = json.loads((Path(__file__).parent / "test_inception_layout.json").read_text())


def expected_layout() -> dict[str, tuple[int, ...]]:
    layout = {}
    for name, cin, cout, kh, kw in LAYOUT["conv_units"]:
        layout[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{name}.bn.{stat}"] = (cout,)
    layout["fc.weight"] = tuple(LAYOUT["fc"]["weight"])
    layout["fc.bias"] = tuple(LAYOUT["fc"]["bias"])
    return layout


@pytest.fixture(scope="module")
def net() -> FIDInception:
    return random_inception(0)


@pytest.fixture(scope="module")
def two_images() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 40, 48, 3), dtype=torch.uint8, generator=gen)


@pytest.fixture(scope="module")
def forward(net, two_images):
    captured = {}
    handle = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("mixed_6", o))
    with torch.no_grad():
        feats = net(two_images)
    handle.remove()
    return feats, captured["mixed_6"]


def test_state_dict_matches_published_layout(net):
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    want = expected_layout()
    assert len(want) == LAYOUT["num_tensors"] == 472
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert got == want


def test_key_names_match_torchvision_inception3_without_batch_counters(net):
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    tv_layout = {k: tuple(v.shape) for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == tv_layout


def _resize_loop(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Independent per-pixel TF1 ResizeBilinear(align_corners=False, half_pixel_centers=False)."""
    in_h, in_w = image.shape[-2:]
    out = np.zeros(image.shape[:-2] + (out_h, out_w))
    for i in range(out_h):
        y = i * in_h / out_h
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, in_h - 1), y - y0
        for j in range(out_w):
            x = j * in_w / out_w
            x0 = int(np.floor(x))
            x1, fx = min(x0 + 1, in_w - 1), x - x0
            top = image[..., y0, x0] * (1 - fx) + image[..., y0, x1] * fx
            bottom = image[..., y1, x0] * (1 - fx) + image[..., y1, x1] * fx
            out[..., i, j] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize("in_size,out_size", [(5, 7), (9, 4), (6, 6)])
def test_tf1_resize_matches_per_pixel_formula(in_size, out_size):
    rng = np.random.default_rng(in_size)
    image = rng.uniform(0, 255, (1, 2, in_size, in_size))
    got = tf1_resize_bilinear(torch.from_numpy(image), out_size).numpy()
    np.testing.assert_allclose(got, _resize_loop(image, out_size, out_size), rtol=0, atol=1e-9)


def test_tf1_resize_is_not_half_pixel_interpolate():
    image = torch.arange(16.0).view(1, 1, 4, 4)
    ours = tf1_resize_bilinear(image, 7)
    half_pixel = torch.nn.functional.interpolate(image, size=(7, 7), mode="bilinear", align_corners=False)
    assert ours[0, 0, 0, 0] == 0 and not torch.allclose(ours, half_pixel)


def test_preprocess_resizes_and_normalises_like_the_graph(net):
    image = torch.full((1, 8, 8, 3), 255, dtype=torch.uint8)
    image[0, :, :, 1] = 128
    image[0, :, :, 2] = 0
    x = net.preprocess(image)
    assert x.shape == (1, 3, INPUT_SIZE, INPUT_SIZE)
    assert torch.allclose(x[0, 0], torch.full_like(x[0, 0], 127 / 128))
    assert torch.all(x[0, 1] == 0) and torch.all(x[0, 2] == -1)


def test_outputs_shapes_and_definitions(net, forward):
    feats, mixed_6 = forward
    assert feats.pool.shape == (2, 2048) and feats.logits.shape == (2, 1008) and feats.spatial.shape == (2, 17 * 17 * 7)
    assert mixed_6.shape == (2, 192, 17, 17)
    want_spatial = mixed_6[:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # NHWC flatten, as TF stores it
    assert torch.equal(feats.spatial, want_spatial)
    want_logits = feats.pool.double() @ net.fc.weight.double().T  # no bias
    torch.testing.assert_close(feats.logits.double(), want_logits, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(feats.logits, net.fc(feats.pool))


def test_float_nchw_on_255_scale_equals_uint8_nhwc(net, two_images, forward):
    feats, _ = forward
    with torch.no_grad():
        again = net(two_images.permute(0, 3, 1, 2).float())
    torch.testing.assert_close(again.pool, feats.pool)


def test_bad_input_layouts_raise(net):
    with pytest.raises(ArgenError, match="NHWC"):
        net.preprocess(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ArgenError, match="0..255"):
        net.preprocess(torch.zeros(1, 8, 8, 3))


def test_random_weights_are_fixed_and_marked():
    a, b = random_inception(0), random_inception(0)
    assert a.is_random and a.weights_id == "random-seed0"
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(random_inception(1).fc.weight, a.fc.weight)


def test_load_roundtrip_and_strictness(tmp_path, net):
    path = tmp_path / "weights.pth"
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(state, path)
    loaded = load_inception(path)
    assert not loaded.is_random and loaded.weights_id.startswith("sha256:") and not loaded.matches_published
    assert torch.equal(loaded.Mixed_7c.branch_pool.conv.weight, net.Mixed_7c.branch_pool.conv.weight)

    with_counter = dict(state, **{"Conv2d_1a_3x3.bn.num_batches_tracked": torch.tensor(0)})
    torch.save(with_counter, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="1 unexpected"):
        load_inception(tmp_path / "extra.pth")
    missing = dict(state)
    del missing["fc.bias"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="1 missing"):
        load_inception(tmp_path / "missing.pth")
    wrong = dict(state, **{"fc.weight": torch.zeros(1000, 2048)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="1 mis-shaped"):
        load_inception(tmp_path / "wrong.pth")


def test_load_refuses_pickled_code_and_missing_files(tmp_path):
    torch.save({"x": argparse.Namespace(code="not a tensor")}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"not allowed \(argparse.Namespace\)"):
        load_inception(tmp_path / "evil.pth")
    with pytest.raises(ArgenError, match="not found"):
        load_inception(tmp_path / "absent.pth")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_features_match_cpu_with_tf32_off(net, two_images, forward):
    from argen.evaluation.fid import compute_activations

    feats, _ = forward
    gpu_net = random_inception(0).cuda()
    acts = compute_activations([two_images.numpy()], gpu_net, batch_size=2, progress=False)
    np.testing.assert_allclose(acts.pool, feats.pool.numpy(), rtol=1e-4, atol=1e-4)


def test_download_checks_sha256_and_keeps_nothing_on_mismatch(tmp_path, monkeypatch):
    import email.message
    import io

    import torch.hub

    from argen.models import inception as inception_module

    class Response(io.BytesIO):
        def info(self):
            return email.message.Message()

    monkeypatch.setattr(torch.hub, "urlopen", lambda request: Response(b"not the weights"))
    dest = tmp_path / "w.pth"
    with pytest.raises(ArgenError, match="sha256"):
        inception_module.download_inception(dest)
    assert list(tmp_path.iterdir()) == []

    fetched = []

    def fake_download(path):
        fetched.append(path)
        torch.save(random_inception(2).state_dict(), path)
        return path

    monkeypatch.setenv("ARGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inception_module, "download_inception", fake_download)
    (tmp_path / "cache").mkdir()
    net = inception_module.build_inception("download")
    assert fetched == [tmp_path / "cache" / "pt_inception-2015-12-05-6726825d.pth"] and not net.is_random
    inception_module.build_inception("download")
    assert len(fetched) == 1  # fetched once, then read from the cache
