"""Pure logit functions: top-k / top-p edge cases, guidance math and schedules, parameter validation."""

from __future__ import annotations

import math

import pytest
import torch

from argen.sampling import SamplingParams, guidance_scale_at, guided_logits, process_logits, top_k_filter, top_p_filter
from argen.utils.errors import ArgenError

NEG = float("-inf")


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(torch.isfinite(row)).flatten().tolist() for row in logits]


def test_top_k_keeps_k_largest_and_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [1.0, 2.0, 2.0, 0.0, 2.0]])
    assert kept(top_k_filter(logits, 2)) == [[1, 3], [1, 2, 4]]
    assert kept(top_k_filter(logits, 1)) == [[1], [1, 2, 4]]


def test_top_k_zero_or_larger_than_vocab_is_a_no_op():
    logits = torch.randn(3, 7)
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, 7), logits)
    assert torch.equal(top_k_filter(logits, 100), logits)


def test_top_p_keeps_the_token_that_crosses_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert kept(top_p_filter(logits, 0.45)) == [[0]]
    assert kept(top_p_filter(logits, 0.6)) == [[0, 1]]
    assert kept(top_p_filter(logits, 0.96)) == [[0, 1, 2, 3]]
    assert kept(top_p_filter(logits, 0.81)) == [[0, 1, 2]]


def test_top_p_always_keeps_the_top_token_and_one_is_a_no_op():
    logits = torch.tensor([[0.0, 10.0, 1.0], [3.0, 2.0, 1.0]])
    assert kept(top_p_filter(logits, 1e-6)) == [[1], [0]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_top_p_works_on_unsorted_rows_independently():
    logits = torch.tensor([[0.1, 0.2, 5.0, 0.0], [5.0, 4.9, -3.0, -3.0]])
    assert kept(top_p_filter(logits, 0.9)) == [[2], [0, 1]]


def test_process_logits_applies_temperature_before_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    out = process_logits(logits, temperature=0.5, top_k=2)
    assert torch.allclose(out[0, :2], torch.tensor([4.0, 2.0]))
    assert out[0, 2] == NEG
    # a low temperature sharpens the distribution so that top-p keeps fewer tokens
    assert kept(process_logits(logits, temperature=2.0, top_p=0.7)) == [[0, 1]]
    assert kept(process_logits(logits, temperature=0.25, top_p=0.7)) == [[0]]


def test_guidance_math():
    cond, uncond = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(guided_logits(cond, uncond, 1.0), cond)
    assert torch.equal(guided_logits(cond, uncond, 0.0), uncond)
    assert torch.allclose(guided_logits(cond, uncond, 4.0), torch.tensor([5.0, -7.0]))


def test_guidance_interval_follows_llamagen():
    params = SamplingParams(cfg_scale=4.0, cfg_interval=2)
    assert [guidance_scale_at(params, t, 10) for t in range(6)] == [4.0, 4.0, 4.0, 4.0, 1.0, 1.0]
    always = SamplingParams(cfg_scale=4.0)
    assert all(guidance_scale_at(always, t, 10) == 4.0 for t in range(10))


@pytest.mark.parametrize("schedule,power,mid", [("linear", 1.0, 2.5), ("power", 2.0, 1.75)])
def test_guidance_schedules_ramp_from_one_to_scale(schedule, power, mid):
    params = SamplingParams(cfg_scale=4.0, cfg_schedule=schedule, cfg_power=power)
    assert guidance_scale_at(params, 0, 11) == 1.0
    assert math.isclose(guidance_scale_at(params, 5, 11), mid)
    assert math.isclose(guidance_scale_at(params, 10, 11), 4.0)
    assert params.guided and not SamplingParams(cfg_scale=1.0).guided


@pytest.mark.parametrize("bad", [dict(cfg_scale=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(temperature=0.0), dict(temperature=-1.0), dict(cfg_interval=-2),
                                 dict(cfg_schedule="cubic"), dict(cfg_scale=float("nan")),
                                 dict(cfg_power=0.0), dict(cfg_power=float("inf")), dict(top_p=float("nan"))])
def test_invalid_sampling_parameters_are_rejected(bad):
    SamplingParams(**{k: SamplingParams.__dataclass_fields__[k].default for k in bad})  # the defaults are fine
    with pytest.raises(ArgenError):
        SamplingParams(**bad)


def test_image_seed_depends_on_seed_and_index_only_and_stays_in_range():
    from argen.sampling import image_seed

    seeds = {image_seed(s, i) for s in range(50) for i in range(50)}
    assert len(seeds) == 2500
    assert image_seed(3, 7) == 3 * 1_000_003 + 7  # the rule argen serve documents
    assert 0 <= image_seed((1 << 63) - 1, 10**6) < 1 << 63


def test_for_kind_fills_only_unset_settings_from_the_one_defaults_table():
    from argen.sampling.logits import KIND_DEFAULTS

    assert SamplingParams.for_kind("c2i") == SamplingParams(cfg_scale=4.0, top_k=2000)
    assert SamplingParams.for_kind("t2i", top_k=None, temperature=0.9) == SamplingParams(cfg_scale=7.5, top_k=1000,
                                                                                          temperature=0.9)
    assert SamplingParams.for_kind("c2i", cfg_scale=1.0, top_k=0) == SamplingParams()
    assert SamplingParams.for_kind(None, top_p=0.5) == SamplingParams(top_p=0.5)  # neutral defaults
    assert set(KIND_DEFAULTS) == {"c2i", "t2i"}
    with pytest.raises(ArgenError, match="kind"):
        SamplingParams.for_kind("x2i")


@pytest.mark.parametrize("scale", [1e308, 1e5, -1.0, float("nan"), float("inf")])
def test_scales_that_overflow_the_guided_logits_are_refused(scale):
    with pytest.raises(ArgenError, match="cfg_scale must lie in"):
        SamplingParams(cfg_scale=scale)
    assert SamplingParams(cfg_scale=1e4).cfg_scale == 1e4


def test_generate_takes_params_or_keywords_with_the_same_tokens():
    import argen
    from conftest import tiny_gpt

    gpt = tiny_gpt("c2i")
    cond = torch.tensor([1, 2])
    params = SamplingParams(cfg_scale=3.0, top_k=5, cfg_schedule="linear")
    def gen():
        return torch.Generator().manual_seed(0)

    a = argen.generate(gpt, cond, params=params, generator=gen())
    b = argen.generate(gpt, cond, cfg_scale=3.0, top_k=5, cfg_schedule="linear", generator=gen())
    c = argen.generate(gpt, cond, cfg_scale=3.0, top_k=5, generator=gen())
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ArgenError, match="not both"):
        argen.generate(gpt, cond, params=params, top_k=3)
