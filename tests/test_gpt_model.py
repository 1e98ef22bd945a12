"""Generator model behaviour: t2i masks, cached decode == teacher forcing, condition dropout, validation."""

from __future__ import annotations

import pytest
import torch

import argen
from argen.models.gpt import prefix_attention_mask
from argen.sampling.reference import _step_mask, prepare_condition
from argen.utils.errors import ArgenError
from conftest import tiny_gpt


def captions(gpt, batch=2, real=(3, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = gpt.config
    feats = torch.randn(batch, cfg.caption_len, cfg.caption_dim, generator=g)
    mask = torch.zeros(batch, cfg.caption_len)
    for i, n in enumerate(real):
        mask[i, cfg.caption_len - n:] = 1
    return feats * mask[..., None], mask


def test_prefix_mask_padded_slots_attend_only_to_themselves():
    mask = prefix_attention_mask(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), 6)[0, 0]
    # nobody attends to padded slots 0 and 1, except each to itself
    assert mask[:, 0].tolist() == [True, False, False, False, False, False]
    assert mask[:, 1].tolist() == [False, True, False, False, False, False]
    # real slots and image tokens are causal
    assert mask[5].tolist() == [False, False, True, True, True, True]
    assert mask[2].tolist() == [False, False, True, False, False, False]


def test_padded_caption_content_does_not_change_image_logits(t2i_gpt):
    feats, mask = captions(t2i_gpt)
    tokens = torch.randint(0, t2i_gpt.config.vocab_size, (2, t2i_gpt.config.num_image_tokens))
    noisy = feats + (1 - mask)[..., None] * 5 * torch.randn_like(feats)
    with torch.no_grad():
        a = t2i_gpt.logits(tokens, feats, mask)
        b = t2i_gpt.logits(tokens, noisy, mask)
        c = t2i_gpt.logits(tokens, feats, torch.ones_like(mask))
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_cached_decode_matches_teacher_forcing(kind):
    gpt = tiny_gpt(kind, seed=2)
    cfg = gpt.config
    if kind == "c2i":
        cond, mask = torch.tensor([1, 7]), None
    else:
        cond, mask = captions(gpt)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.num_image_tokens))
    with torch.no_grad():
        full = gpt.logits(tokens, cond, mask)
        rows, key_mask = prepare_condition(gpt, cond, mask, guided=False)
        cache = gpt.new_cache(2)
        positions = torch.arange(cfg.cond_len)
        step_logits = [gpt.forward_cached(gpt.embed_condition(rows), positions, cache, cfg.cond_len,
                                          _step_mask(key_mask, positions, cfg.cond_len))[:, -1]]
        for i in range(cfg.num_image_tokens - 1):
            pos = torch.tensor([cfg.cond_len + i])
            kv_len = cfg.cond_len + i + 1
            out = gpt.forward_cached(gpt.embed_tokens(tokens[:, i:i + 1]), pos, cache, kv_len,
                                     _step_mask(key_mask, pos, kv_len))
            step_logits.append(out[:, -1])
    assert torch.allclose(torch.stack(step_logits, 1), full, atol=1e-4)


def test_condition_dropout_uses_null_class_and_uncond_caption():
    gpt = tiny_gpt("c2i")
    tokens = torch.randint(0, gpt.config.vocab_size, (2, gpt.config.num_image_tokens))
    with torch.no_grad():
        dropped, _ = gpt(tokens, torch.tensor([1, 2]), drop_cond=torch.tensor([True, True]))
        assert torch.allclose(dropped, gpt._teacher_forcing(tokens, torch.tensor([3, 4]), None,
                                                            torch.tensor([True, True])))
        assert not torch.allclose(dropped, gpt.logits(tokens, torch.tensor([1, 2])))
    t2i = tiny_gpt("t2i")
    feats, mask = captions(t2i)
    with torch.no_grad():
        a, _ = t2i(tokens, feats, mask, drop_cond=torch.tensor([True, False]))
        uncond = t2i.null_condition(2, "cpu")
        b = t2i.logits(tokens, torch.stack([uncond[0], feats[1]]), mask)
    assert torch.allclose(a, b, atol=1e-5)


def test_train_mode_drops_conditions_at_the_configured_rate():
    gpt = tiny_gpt("c2i").train()
    seen = []
    original = gpt.cls_embedding.forward

    def spy(labels, drop=None):
        seen.append(drop.float().mean().item())
        return original(labels, drop)

    gpt.cls_embedding.forward = spy
    torch.manual_seed(0)
    tokens = torch.randint(0, gpt.config.vocab_size, (4000, 2))
    gpt(tokens, torch.zeros(4000, dtype=torch.long))
    assert abs(seen[0] - gpt.config.class_dropout_prob) < 0.02


def test_grouped_query_attention_runs_and_differs_in_size():
    gqa = tiny_gpt("c2i", n_kv_head=2)
    full = tiny_gpt("c2i")
    assert gqa.layers[0].attention.wqkv.weight.shape[0] < full.layers[0].attention.wqkv.weight.shape[0]
    codes = argen.generate(gqa, torch.tensor([0, 1]), top_k=1)
    assert codes.shape == (2, gqa.config.num_image_tokens)


@pytest.mark.parametrize("cond,match", [
    (torch.tensor([10]), "class ids must lie in"),
    (torch.tensor([-1]), "class ids must lie in"),
    (torch.tensor([[1.0]]), "integer tensor"),
])
def test_bad_c2i_conditions(c2i_gpt, cond, match):
    with pytest.raises(ArgenError, match=match):
        argen.generate(c2i_gpt, cond)


def test_caption_features_of_wrong_width_are_rejected(t2i_gpt):
    cfg = t2i_gpt.config
    with pytest.raises(ArgenError, match="width 7 but the model expects 32"):
        argen.generate(t2i_gpt, torch.zeros(1, cfg.caption_len, 7), torch.ones(1, cfg.caption_len))
    with pytest.raises(ArgenError, match="tokens but the model expects"):
        argen.generate(t2i_gpt, torch.zeros(1, 3, cfg.caption_dim))


@pytest.mark.parametrize("bad", [dict(cfg_scale=-1.0), dict(top_p=0.0), dict(top_k=-5), dict(temperature=0.0)])
def test_generate_rejects_bad_sampling_parameters(c2i_gpt, bad):
    with pytest.raises(ArgenError):
        argen.generate(c2i_gpt, torch.tensor([0]), **bad)
