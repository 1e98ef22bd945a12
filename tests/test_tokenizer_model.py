"""Tokenizer model contract: shapes, dtypes, training outputs, input validation."""

from __future__ import annotations

import pytest
import torch

from argen.models.tokenizer import VQ_CONFIGS, VQModel, vq_config
from argen.utils.errors import ArgenError
from conftest import tiny_tokenizer


def test_named_configs_have_the_released_defaults():
    vq16, vq8 = VQ_CONFIGS["VQ-16"], VQ_CONFIGS["VQ-8"]
    assert (vq16.codebook_size, vq16.codebook_embed_dim, vq16.z_channels, vq16.base_channels) == (16384, 8, 256, 128)
    assert vq16.downsample == 16 and vq8.downsample == 8
    assert vq16.codebook_l2_norm and vq16.commit_loss_beta == 0.25


def test_encode_decode_reconstruct_shapes():
    tok = tiny_tokenizer()
    images = torch.rand(2, 3, 64, 32) * 2 - 1
    codes = tok.encode(images)
    assert codes.shape == (2, 4, 2) and codes.dtype == torch.long
    assert int(codes.max()) < tok.config.codebook_size
    assert tok.decode(codes).shape == (2, 3, 64, 32)
    assert torch.allclose(tok.reconstruct(images), tok.decode(codes), atol=1e-5)


def test_training_forward_returns_losses_and_usage():
    tok = VQModel(vq_config("VQ-tiny-16", entropy_loss_ratio=0.1)).train()
    out = tok(torch.rand(4, 3, 32, 32) * 2 - 1)
    assert out.reconstruction.shape == (4, 3, 32, 32)
    assert out.codebook_loss > 0 and out.commitment_loss > 0
    assert torch.isclose(out.commitment_loss, 0.25 * out.codebook_loss)
    assert out.entropy_loss.requires_grad and 0 < out.codebook_usage <= 16 / 512
    total = out.reconstruction.square().mean() + out.codebook_loss + out.commitment_loss + out.entropy_loss
    total.backward()
    assert tok.encoder.conv_in.weight.grad is not None and tok.quantize.embedding.weight.grad is not None


@pytest.mark.parametrize("shape,match", [((1, 3, 70, 64), "not a multiple"), ((1, 1, 64, 64), r"\(B, 3, H, W\)")])
def test_bad_images_are_rejected(shape, match):
    with pytest.raises(ArgenError, match=match):
        tiny_tokenizer().encode(torch.zeros(shape))


def test_out_of_range_codes_are_rejected():
    with pytest.raises(ArgenError, match=r"codes must lie in \[0, 512\)"):
        tiny_tokenizer().decode(torch.full((1, 2, 2), 512))
