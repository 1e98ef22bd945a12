"""One of each small helper: the uint8 rule, PSNR, the reconstruction grid and the torchrun ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from argen.data import transforms
from argen.evaluation.recon_metrics import psnr, psnr_uint8, side_by_side
from argen.training.losses import psnr as train_psnr
from argen.utils.dist_env import process_ranks
from argen.utils.errors import ArgenError
from argen.utils.images import to_uint8


def test_one_uint8_rule_rounds_half_up_everywhere():
    assert transforms.to_uint8 is to_uint8
    x = torch.linspace(-1, 1, 200001)
    scaled = (x + 1) * 127.5  # what to_uint8 computes in float32
    ties = scaled.frac() == 0.5
    assert int(ties.sum()) >= 2 and bool((scaled.floor()[ties] % 2 == 0).any())  # some ties round down half-even
    got = torch.from_numpy(to_uint8(x.view(1, 1, 1, -1).repeat(1, 3, 1, 1))[0, 0, :, 0].astype(np.int64))
    assert torch.equal(got[ties], scaled.floor()[ties].long() + 1)


def test_psnr_is_one_function_for_uint8_and_training():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1] = 10
    got = psnr_uint8(a, b)
    assert got[0] == 100.0 and got[1] == pytest.approx(10 * math.log10(255**2 / 100))
    x = torch.zeros(1, 3, 4, 4)
    assert float(train_psnr(x, x + 0.2)) == pytest.approx(float(psnr(np.zeros((1, 3)), np.full((1, 3), 0.1), 1.0)[0]))
    assert float(train_psnr(x, x + 0.2)) == pytest.approx(20.0, rel=1e-6)  # mse 0.01 on [0, 1]


def _old_side_by_side(originals, reconstructions, per_row=8, pad=2):  # the former hand-built grid
    n, h, w, _ = originals.shape
    per_row = max(1, min(per_row, n))
    rows = math.ceil(n / per_row)
    grid = np.full((rows * 2 * (h + pad) + pad, per_row * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, per_row)
        x, y = pad + c * (w + pad), pad + 2 * r * (h + pad)
        grid[y:y + h, x:x + w] = originals[i]
        grid[y + h + pad:y + 2 * h + pad, x:x + w] = reconstructions[i]
    return grid


@pytest.mark.parametrize("n,per_row", [(16, 8), (5, 3), (3, 8), (1, 1)])
def test_side_by_side_is_built_on_make_grid_with_the_same_pixels(n, per_row):
    rng = np.random.default_rng(n)
    a, b = (rng.integers(0, 255, (n, 5, 6, 3), dtype=np.uint8) for _ in range(2))
    assert np.array_equal(side_by_side(a, b, per_row), _old_side_by_side(a, b, per_row))


def test_process_ranks(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert process_ranks() == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert process_ranks() == (3, 4, 3)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert process_ranks().local_rank == 1
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ArgenError, match="RANK=4 WORLD_SIZE=4"):
        process_ranks()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ArgenError, match="must be integers"):
        process_ranks()


def test_demo_subset_cuts_every_per_image_field():
    from argen.data.datasets import DemoDataset

    full = DemoDataset("train")
    part = full.subset([5, 2, 9])
    assert len(part) == 3 and len(full) > 3
    assert np.array_equal(part.images, full.images[[5, 2, 9]])
    assert part.labels.tolist() == full.labels[[5, 2, 9]].tolist()
    assert part.names == [full.names[i] for i in (5, 2, 9)] and part.captions(1) == full.captions(2)
    assert part.indices.tolist() == full.indices[[5, 2, 9]].tolist() and len(part.vendor) == 3
    assert len(full.subset(4)) == 4 and full.subset(4).short_names == full.short_names[:4]


def test_demo_samples_are_one_generator_in_chunks_of_64_then_decoded():
    import argen
    from argen.engine import decode_codes
    from argen.sampling.logits import SamplingParams
    from argen.training.demo import CPU_PLAN, sample_images
    from conftest import tiny_gpt, tiny_tokenizer

    gpt, tokenizer = tiny_gpt("c2i"), tiny_tokenizer()
    classes = torch.arange(70) % 10
    params = SamplingParams(cfg_scale=CPU_PLAN.cfg_scale, temperature=CPU_PLAN.temperature, top_k=CPU_PLAN.top_k)
    got = sample_images(gpt, tokenizer, classes, None, params, seed=5)
    gen = torch.Generator().manual_seed(5)  # the demo's rule: one generator for all, 64 images per call
    kw = dict(params=params, generator=gen)
    tokens = torch.cat([argen.generate(gpt, classes[:64], **kw), argen.generate(gpt, classes[64:], **kw)])
    want = decode_codes(tokenizer, tokens.view(-1, gpt.config.grid_size, gpt.config.grid_size))
    assert got.shape == (70, 64, 64, 3) and np.array_equal(got, want)
