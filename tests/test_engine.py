"""The fast engine against the reference sampler: greedy equality, reproducibility, per-row
parameters, and a chi-square test of its sampled token distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from argen.engine import Engine, decode_codes, generate
from argen.models.gpt import GPT, gpt_config
from argen.models.tokenizer import VQModel, vq_config
from argen.sampling import SamplingParams, guided_logits, process_logits, reference_generate


def tiny_gpt(kind: str, seed: int = 0, head_std: float = 0.5, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(gpt_config("GPT-tiny", kind=kind, **overrides)).eval()
    torch.nn.init.normal_(model.output.weight, std=head_std)  # the zero-initialised head gives flat logits
    return model


def condition(kind: str, batch: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if kind == "c2i":
        return torch.randint(0, 10, (batch,), generator=g), None
    features = torch.randn(batch, 8, 32, generator=g)
    mask = torch.ones(batch, 8)
    mask[0, :3] = 0  # real left padding
    mask[min(1, batch - 1), :6] = 0
    features[mask == 0] = 0
    return features, mask


GREEDY_SETTINGS = [
    dict(),
    dict(cfg_scale=3.0),
    dict(cfg_scale=3.0, cfg_interval=5),
    dict(cfg_scale=4.0, cfg_schedule="linear"),
    dict(cfg_scale=4.0, cfg_schedule="power", cfg_power=2.5),
    dict(cfg_scale=2.0, temperature=0.7),
]


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
@pytest.mark.parametrize("settings", GREEDY_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "-")
def test_greedy_matches_reference(kind, settings):
    model = tiny_gpt(kind)
    cond, mask = condition(kind)
    expected = reference_generate(model, cond, mask, top_k=1, **settings)
    got = generate(model, cond, mask, top_k=1, **settings)
    assert got.dtype == torch.int64 and got.shape == (4, model.config.num_image_tokens)
    assert torch.equal(got, expected)


def test_greedy_matches_reference_with_max_new_tokens_and_chunking():
    model = tiny_gpt("t2i", seed=3)
    cond, mask = condition("t2i", batch=5)
    expected = reference_generate(model, cond, mask, cfg_scale=2.5, top_k=1, max_new_tokens=7)
    got = Engine(model, max_batch=2).generate(cond, mask, SamplingParams(cfg_scale=2.5, top_k=1), max_new_tokens=7)
    assert torch.equal(got, expected)


def test_sampling_is_reproducible_and_seed_dependent():
    model = tiny_gpt("c2i")
    cond, _ = condition("c2i")
    kwargs = dict(cfg_scale=2.0, top_k=50, top_p=0.9, temperature=1.2)
    a = generate(model, cond, generator=torch.Generator().manual_seed(7), **kwargs)
    b = generate(model, cond, generator=torch.Generator().manual_seed(7), **kwargs)
    c = generate(model, cond, generator=torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_engine_notices_changed_weights():
    model = tiny_gpt("c2i")
    cond, _ = condition("c2i")
    before = generate(model, cond, top_k=1, cfg_scale=2.0)
    with torch.no_grad():
        torch.nn.init.normal_(model.output.weight, std=0.5)
    after = generate(model, cond, top_k=1, cfg_scale=2.0)
    assert torch.equal(after, reference_generate(model, cond, top_k=1, cfg_scale=2.0))
    assert not torch.equal(before, after)


def test_per_row_params_match_rows_run_alone():
    model = tiny_gpt("t2i", seed=5)
    cond, mask = condition("t2i", batch=3)
    params = [SamplingParams(cfg_scale=3.0, top_k=1), SamplingParams(top_k=1),
              SamplingParams(cfg_scale=2.0, cfg_interval=2, top_k=1, temperature=0.5)]
    engine = Engine(model)
    together = engine.generate(cond, mask, params)
    for i, p in enumerate(params):
        alone = reference_generate(model, cond[i:i + 1], mask[i:i + 1], cfg_scale=p.cfg_scale,
                                   cfg_interval=p.cfg_interval, temperature=p.temperature, top_k=1)
        assert torch.equal(together[i:i + 1], alone), f"row {i}"


def test_row_generators_make_rows_independent_of_the_batch():
    model = tiny_gpt("c2i")
    engine = Engine(model)
    cond = torch.tensor([3, 1, 4, 1])
    params = [SamplingParams(cfg_scale=2.0, top_k=30), SamplingParams(top_p=0.8),
              SamplingParams(cfg_scale=4.0, temperature=1.5), SamplingParams(top_k=5, top_p=0.5)]
    gens = [torch.Generator().manual_seed(100 + i) for i in range(4)]
    batch = engine.generate(cond, None, params, row_generators=gens)
    for i in range(4):
        alone = engine.generate(cond[i:i + 1], None, [params[i]],
                                row_generators=[torch.Generator().manual_seed(100 + i)])
        assert torch.equal(batch[i], alone[0]), f"row {i}"


def test_progress_counts_every_token_of_every_chunk_without_changing_tokens():
    model = tiny_gpt("c2i")
    cond, _ = condition("c2i", batch=5)
    steps = []
    engine = Engine(model, max_batch=2)  # chunks of 2, 2 and 1 images
    with_progress = engine.generate(cond, None, SamplingParams(cfg_scale=2.0, top_k=1), max_new_tokens=6,
                                    progress=steps.append)
    assert steps == [1] * 18
    assert torch.equal(with_progress, reference_generate(model, cond, cfg_scale=2.0, top_k=1, max_new_tokens=6))


def test_generate_with_row_generators_gives_each_image_its_own_stream():
    model = tiny_gpt("c2i")
    cond = torch.tensor([3, 1, 4])
    kwargs = dict(cfg_scale=2.0, top_k=30)
    batch = generate(model, cond, row_generators=[torch.Generator().manual_seed(s) for s in (5, 6, 7)], **kwargs)
    last = generate(model, cond[2:], row_generators=[torch.Generator().manual_seed(7)], **kwargs)
    assert torch.equal(batch[2:], last)
    assert not torch.equal(batch[0], batch[1])


def test_bad_arguments_raise_argen_errors():
    from argen.utils.errors import ArgenError

    model = tiny_gpt("c2i")
    with pytest.raises(ArgenError, match="top_p"):
        generate(model, torch.tensor([1]), top_p=0.0)
    with pytest.raises(ArgenError, match="class ids"):
        generate(model, torch.tensor([11]))
    with pytest.raises(ArgenError, match="max_new_tokens"):
        generate(model, torch.tensor([1]), max_new_tokens=0)


# --------------------------------------------------------------------------- distribution
def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit; bins with expected count < 5 are pooled; unexpected draws fail."""
    n = counts.sum()
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def reference_first_step_probs(model, cls: int, cfg_scale: float, **filters) -> np.ndarray:
    with torch.no_grad():
        tokens = torch.zeros(1, 1, dtype=torch.long)
        cond_logits = model.logits(tokens, torch.tensor([cls]))[:, 0]
        null = model.cls_embedding.embedding_table.weight.shape[0] - 1
        prefix = model.cls_embedding.embedding_table(torch.tensor([null]))[:, None]
        cache = model.new_cache(1)
        uncond_logits = model.forward_cached(prefix, torch.arange(1), cache, 1)[:, -1]
        logits = guided_logits(cond_logits, uncond_logits, cfg_scale)
        return process_logits(logits, **filters).softmax(-1)[0].double().numpy()


FILTERS = [dict(temperature=1.3, top_k=40), dict(temperature=0.9, top_p=0.6), dict(top_k=60, top_p=0.85)]


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_first_step_distribution_matches_reference(filters):
    model = tiny_gpt("c2i", seed=11, head_std=0.08)
    n = 4000
    probs = reference_first_step_probs(model, 2, 3.0, **filters)
    tokens = generate(model, torch.full((n,), 2), cfg_scale=3.0, max_new_tokens=1,
                      generator=torch.Generator().manual_seed(0), **filters)[:, 0]
    counts = np.bincount(tokens.numpy(), minlength=probs.size)
    assert chi_square_pvalue(counts, probs) > 1e-3
    # the test has power: the unfiltered distribution is rejected
    wrong = reference_first_step_probs(model, 2, 3.0, temperature=filters.get("temperature", 1.0))
    assert chi_square_pvalue(counts, wrong) < 1e-6


def test_later_step_distribution_matches_reference():
    model = tiny_gpt("c2i", seed=12, head_std=0.08)
    filters = dict(temperature=1.1, top_k=30, top_p=0.9)
    n = 6000
    codes = generate(model, torch.full((n,), 4), max_new_tokens=2, generator=torch.Generator().manual_seed(1),
                     **filters)
    first = int(torch.mode(codes[:, 0]).values)
    second = codes[codes[:, 0] == first, 1].numpy()
    assert second.size > 300
    with torch.no_grad():
        logits = model.logits(torch.tensor([[first, 0]]), torch.tensor([4]))[:, 1]
    probs = process_logits(logits, **filters).softmax(-1)[0].double().numpy()
    counts = np.bincount(second, minlength=probs.size)
    assert chi_square_pvalue(counts, probs) > 1e-3
    shuffled = np.roll(probs, 1)
    assert chi_square_pvalue(counts, shuffled) < 1e-6


# --------------------------------------------------------------------------- decoding
def test_decode_codes_in_chunks_equals_one_batch():
    torch.manual_seed(0)
    tokenizer = VQModel(vq_config("VQ-tiny")).eval()
    codes = torch.randint(0, 512, (5, 16))
    chunked = decode_codes(tokenizer, codes, chunk=2)
    whole = decode_codes(tokenizer, codes, chunk=16)
    assert chunked.shape == (5, 4 * tokenizer.downsample, 4 * tokenizer.downsample, 3)
    assert chunked.dtype == np.uint8
    assert np.abs(chunked.astype(int) - whole.astype(int)).max() <= 1


def test_bf16_engine_on_cpu_tracks_the_float32_reference():
    model = tiny_gpt("c2i", head_std=2.0)
    cond = torch.arange(8) % 10
    expected = reference_generate(model, cond, cfg_scale=3.0, top_k=1)
    got = Engine(model, dtype=torch.bfloat16).generate(cond, None, SamplingParams(cfg_scale=3.0, top_k=1))
    assert (got[:, 0] == expected[:, 0]).float().mean() >= 0.75
    assert (got == expected).float().mean() >= 0.5


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_graphs_agree_with_float32_reference_on_gpu():
    model = tiny_gpt("c2i", head_std=2.0, image_size=128).cuda()
    cond = torch.arange(8, device="cuda") % 10
    expected = reference_generate(model, cond, cfg_scale=3.0, top_k=1)
    fp32_graphs = Engine(model).generate(cond, None, SamplingParams(cfg_scale=3.0, top_k=1))
    assert torch.equal(fp32_graphs, expected)
    bf16 = Engine(model, dtype=torch.bfloat16)
    assert bf16.use_graphs
    got = bf16.generate(cond, None, SamplingParams(cfg_scale=3.0, top_k=1))
    assert (got[:, 0] == expected[:, 0]).float().mean() >= 0.85
    assert (got == expected).float().mean() >= 0.5
    again = bf16.generate(cond, None, SamplingParams(cfg_scale=3.0, top_k=1))
    assert torch.equal(got, again)


# --------------------------------------------------------------------------- graph path on the CPU
@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_static_graph_step_matches_reference_on_cpu(kind):
    """cuda_graphs=True on a CPU runs the step that CUDA captures (bucketed kv, in-step masks,
    device-side step counter, batch padding) without capture."""
    model = tiny_gpt(kind, seed=4, image_size=128)  # 64 tokens: several kv buckets of 16
    cond, mask = condition(kind, batch=3)
    engine = Engine(model, cuda_graphs=True, kv_bucket=16)
    for settings in (dict(cfg_scale=3.0, top_k=1), dict(top_k=1, cfg_scale=2.0, cfg_interval=20)):
        expected = reference_generate(model, cond, mask, **settings)
        assert torch.equal(engine.generate(cond, mask, SamplingParams(**settings)), expected)
    short = engine.generate(cond, mask, SamplingParams(cfg_scale=3.0, top_k=1), max_new_tokens=20)
    assert torch.equal(short, reference_generate(model, cond, mask, cfg_scale=3.0, top_k=1, max_new_tokens=20))
    params = [SamplingParams(cfg_scale=3.0, top_k=1), SamplingParams(top_k=1), SamplingParams(top_k=1, cfg_scale=5.0)]
    mixed = engine.generate(cond, mask, params)
    for i, p in enumerate(params):
        alone = reference_generate(model, cond[i:i + 1], None if mask is None else mask[i:i + 1],
                                   cfg_scale=p.cfg_scale, top_k=1)
        assert torch.equal(mixed[i:i + 1], alone)
