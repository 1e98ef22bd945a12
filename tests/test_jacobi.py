"""Speculative Jacobi decoding (`argen.engine.jacobi`): greedy equality with the reference, the exact
AR distribution by enumeration and a chi-square test (which rejects a wrong acceptance rule), batch
independence with per-image generators, window bookkeeping and the `argen.generate` hook."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import argen
import argen.engine.draft_tree as draft_tree
import argen.engine.jacobi as jacobi
from argen.engine import JacobiSlotDecoder, SlotRequest
from argen.engine.jacobi import jacobi_decode
from argen.models.gpt import GPT, gpt_config
from argen.sampling import SamplingParams, guidance_scale_at, guided_logits, process_logits, reference_generate
from argen.utils.errors import ArgenError
from test_engine import SLOT_SETTINGS, assert_greedy_reference, condition, run_staggered, slot_requests, tiny_gpt

GREEDY_SETTINGS = [
    dict(),
    dict(cfg_scale=3.0),
    dict(cfg_scale=3.0, cfg_interval=5),
    dict(cfg_scale=4.0, cfg_schedule="linear"),
    dict(cfg_scale=4.0, cfg_schedule="power", cfg_power=2.5, temperature=0.7),
]


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
@pytest.mark.parametrize("settings", GREEDY_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "-")
def test_greedy_jacobi_gives_the_reference_tokens(kind, settings):
    model = tiny_gpt(kind)
    cond, mask = condition(kind)
    expected = reference_generate(model, cond, mask, top_k=1, **settings)
    for window in (3, 16):  # 16 > N - 1: clamped, and the window is moved back at the end
        result = jacobi_decode(model, cond, mask, SamplingParams(top_k=1, **settings), window=window)
        assert torch.equal(result.tokens, expected), f"window {window}"
        assert result.tokens.dtype == torch.int64 and result.forwards.shape == (4,)


def test_greedy_with_max_new_tokens_and_chunks():
    model = tiny_gpt("t2i", seed=3)
    cond, mask = condition("t2i", batch=5)
    expected = reference_generate(model, cond, mask, cfg_scale=2.5, top_k=1, max_new_tokens=7)
    result = jacobi_decode(model, cond, mask, SamplingParams(cfg_scale=2.5, top_k=1), window=4, max_new_tokens=7,
                           max_batch=2)
    assert torch.equal(result.tokens, expected)


def test_generate_hook_and_bad_arguments():
    model = tiny_gpt("c2i")
    cond, _ = condition("c2i")
    want = reference_generate(model, cond, cfg_scale=2.0, top_k=1)
    assert torch.equal(argen.generate(model, cond, cfg_scale=2.0, top_k=1, decode="jacobi", window=3), want)
    assert torch.equal(argen.generate(model, cond, cfg_scale=2.0, top_k=1, decode="jacobi"), want)
    with pytest.raises(ArgenError, match="decode"):
        argen.generate(model, cond, decode="parallel")
    with pytest.raises(ArgenError, match="window"):
        argen.generate(model, cond, decode="jacobi", window=0)
    with pytest.raises(ArgenError, match="window"):
        argen.generate(model, cond, window=4)  # a window without decode="jacobi"
    with pytest.raises(ArgenError, match="max_new_tokens"):
        argen.generate(model, cond, decode="jacobi", max_new_tokens=0)


def test_context_free_model_accepts_every_draft():
    """A model whose logits ignore the context (all-zero embeddings: uniform p everywhere) makes every
    stale draft exact, so each forward after the prefill adds W tokens; the last window is moved
    back. 16 tokens, W=4: prefill (1 token), then 4, 4, 4 and the moved-back window's 3."""
    model = tiny_gpt("c2i")
    with torch.no_grad():
        model.tok_embeddings.weight.zero_()
        model.cls_embedding.embedding_table.weight.zero_()
    result = jacobi_decode(model, torch.tensor([1, 2]), None, SamplingParams(), window=4,
                           generator=torch.Generator().manual_seed(0))
    assert result.forwards.tolist() == [5, 5]
    assert result.accepted == result.drafted == 2 * (3 + 3 + 3 + 2)
    assert len(set(result.tokens.flatten().tolist())) > 20  # 32 uniform draws of 512 codes, not repeated drafts


def test_progress_adds_up_to_the_tokens_of_each_chunk():
    model = tiny_gpt("c2i")
    cond, _ = condition("c2i", batch=5)
    steps = []
    jacobi_decode(model, cond, None, SamplingParams(cfg_scale=2.0, top_k=20), window=4, max_new_tokens=9,
                  generator=torch.Generator().manual_seed(0), progress=steps.append, max_batch=2)
    assert sum(steps) == 27 and all(s >= 1 for s in steps)


@pytest.mark.repro
def test_row_generators_make_an_image_independent_of_its_batch():
    model = tiny_gpt("t2i", seed=2)
    cond, mask = condition("t2i", batch=4)
    params = SamplingParams(cfg_scale=3.0, top_k=40, temperature=1.3)
    seeds = [11, 12, 13, 14]
    batch = jacobi_decode(model, cond, mask, params, window=4,
                          row_generators=[torch.Generator().manual_seed(s) for s in seeds])
    for i in (0, 2, 3):
        alone = jacobi_decode(model, cond[i:i + 1], mask[i:i + 1], params, window=4,
                              row_generators=[torch.Generator().manual_seed(seeds[i])])
        assert torch.equal(batch.tokens[i], alone.tokens[0]), f"image {i}"
        assert batch.forwards[i] == alone.forwards[0]
    assert not torch.equal(batch.tokens[0], batch.tokens[1])
    other = jacobi_decode(model, cond, mask, params, window=4,
                          row_generators=[torch.Generator().manual_seed(s + 100) for s in seeds])
    assert not torch.equal(other.tokens, batch.tokens)


# ---------------------------------------------------------------- the exact distribution
VOCAB, GRID = 5, 2  # 4 tokens of 5 codes: 625 sequences


def toy_gpt(kind: str, vocab: int = VOCAB, grid: int = GRID, embedding_gain: float = 5.0) -> GPT:
    torch.manual_seed(5)
    model = GPT(gpt_config("GPT-tiny", kind=kind, vocab_size=vocab, image_size=grid * 16, downsample=16)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.output.weight, std=0.2)
        model.tok_embeddings.weight.mul_(embedding_gain)  # a strong dependence on the previous tokens
    return model


def exact_joint(model: GPT, cond, mask, params: SamplingParams) -> torch.Tensor:
    """(V**N,) probabilities of every token sequence under AR sampling with `params`, from the
    model's teacher-forced conditionals (guided at each token's index, then filtered)."""
    n, vocab = model.config.num_image_tokens, model.config.vocab_size
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=n)))  # (S, N), lexicographic
    rows = seqs.shape[0]
    cond = cond.expand(rows, *cond.shape[1:])
    mask = None if mask is None else mask.expand(rows, -1)
    with torch.no_grad():
        logits = model.logits(seqs, cond, mask)  # (S, N, V)
        if params.guided:
            uncond, _ = model(seqs, cond, mask, drop_cond=torch.ones(rows, dtype=torch.bool))
            scales = torch.tensor([guidance_scale_at(params, i, n) for i in range(n)])[None, :, None]
            logits = guided_logits(logits, uncond, scales)
        probs = process_logits(logits, params.temperature, params.top_k, params.top_p).softmax(-1)
    return probs.gather(-1, seqs[..., None])[..., 0].double().prod(dim=1)


def chi_square_pvalue(tokens: torch.Tensor, joint: torch.Tensor, vocab: int = VOCAB) -> float:
    """Chi-square goodness of fit of sampled sequences to `joint`; cells with expected count < 5
    are pooled; a sample in a zero-probability cell gives p = 0."""
    weights = vocab ** torch.arange(tokens.shape[1] - 1, -1, -1)
    counts = torch.bincount((tokens * weights).sum(1), minlength=joint.numel()).double()
    if counts[joint == 0].sum() > 0:
        return 0.0
    expected = joint * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big].numpy(), counts[~big].sum().item())
    exp = np.append(expected[big].numpy(), expected[~big].sum().item())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


DISTRIBUTION_CASES = [
    ("c2i", dict(cfg_scale=2.5, cfg_schedule="linear", temperature=0.8, top_k=3)),
    ("c2i", dict(cfg_scale=3.0, cfg_interval=0, temperature=1.4, top_p=0.8)),
    ("t2i", dict(cfg_scale=2.0, top_k=4, temperature=1.2)),
]


@pytest.mark.parametrize("kind,settings", DISTRIBUTION_CASES,
                         ids=[f"{k}-" + ",".join(f"{a}={b}" for a, b in s.items()) for k, s in DISTRIBUTION_CASES])
def test_jacobi_samples_the_exact_ar_distribution_and_a_wrong_rule_is_caught(kind, settings, monkeypatch):
    model = toy_gpt(kind)
    if kind == "c2i":
        cond, mask = torch.tensor([3]), None
    else:
        cond = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(4))
        mask = torch.ones(1, 8)
        mask[0, :2] = 0
    params = SamplingParams(**settings)
    joint = exact_joint(model, cond, mask, params)
    assert abs(float(joint.sum()) - 1.0) < 1e-6
    assert float(joint.max()) < 0.5  # not a degenerate target

    samples = 6000

    def draw(seed: int) -> jacobi.JacobiResult:
        return jacobi_decode(model, cond.expand(samples, *cond.shape[1:]),
                             None if mask is None else mask.expand(samples, -1), params, window=3,
                             generator=torch.Generator().manual_seed(seed), max_batch=samples)

    right = draw(0)
    assert right.accepted > 0.2 * right.drafted  # drafts are used, not just rejected
    assert chi_square_pvalue(right.tokens, joint) > 1e-3
    monkeypatch.setattr(draft_tree, "accept", lambda u, q, p: torch.ones_like(u, dtype=torch.bool))
    wrong = draw(0)
    assert wrong.accepted == wrong.drafted
    assert chi_square_pvalue(wrong.tokens, joint) < 1e-6



@pytest.mark.parametrize("window", [8, 12])
def test_drafts_that_stay_in_the_window_for_many_iterations_keep_the_exact_distribution(window):
    """9 binary tokens (512 sequences): a draft is redrafted with its kept noise over several
    iterations, and the window is moved back at the end of the grid, yet the joint is exact."""
    model = toy_gpt("c2i", vocab=2, grid=3, embedding_gain=10.0)
    cond, params = torch.tensor([3]), SamplingParams(cfg_scale=2.5)
    joint = exact_joint(model, cond, None, params)
    samples = 20000
    result = jacobi_decode(model, cond.expand(samples), None, params, window=window,
                           generator=torch.Generator().manual_seed(window), max_batch=samples)
    assert result.forwards.double().mean() < 0.4 * 9  # several tokens per forward: drafts do stay
    assert chi_square_pvalue(result.tokens, joint, vocab=2) > 1e-3
    shifted = jacobi_decode(model, torch.tensor([4]).expand(samples), None, params, window=window,
                            generator=torch.Generator().manual_seed(window), max_batch=samples)
    assert chi_square_pvalue(shifted.tokens, joint, vocab=2) < 1e-6  # the test can tell classes apart


# ---------------------------------------------------------------- continuous batching (JacobiSlotDecoder)
@pytest.mark.repro
@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_jacobi_slots_greedy_equals_reference_whenever_a_request_joins(kind):
    """Mixed guidance settings per slot, requests joining at different steps, slots retiring at their
    own pace (a Jacobi step advances each by 1 to W tokens): every request gets the greedy tokens."""
    model = tiny_gpt(kind, seed=4, image_size=128)  # 64 tokens
    requests = slot_requests(kind, SLOT_SETTINGS)
    decoder = JacobiSlotDecoder(model, 3, window=6)
    results = run_staggered(decoder, requests, joins=[0, 0, 2, 3, 5, 9, 9])
    assert decoder.active == 0 and decoder.free == 3
    accepted = decoder.counters["accepted"]
    assert accepted > 0 and decoder.counters["slot_steps"] == 7 * 63 - accepted  # 1 + accepted tokens a step
    assert_greedy_reference(model, requests, SLOT_SETTINGS, results)


@pytest.mark.repro
@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_jacobi_slots_sample_like_jacobi_decode_with_the_same_seed_whatever_else_runs(kind):
    """A sampled request's tokens (its own generator) are the same alone, in a crowd that joins at other
    steps, and from `jacobi_decode` with that generator as its row generator."""
    model = tiny_gpt(kind, seed=5, head_std=0.1)
    settings = [dict(cfg_scale=2.0, top_p=0.9), dict(temperature=1.3), dict(cfg_scale=4.0, cfg_interval=3),
                dict(cfg_scale=3.0, cfg_schedule="linear", top_p=0.8)]
    crowd = run_staggered(JacobiSlotDecoder(model, 3, window=4), slot_requests(kind, settings, top_k=50),
                          joins=[0, 1, 4, 6])
    for i in range(len(settings)):
        alone = JacobiSlotDecoder(model, 1, window=4).run([slot_requests(kind, settings, top_k=50)[i]])[0]
        r = slot_requests(kind, settings, top_k=50)[i]
        batch = jacobi_decode(model, r.cond[None], None if r.cond_mask is None else r.cond_mask[None], r.params,
                              window=4, row_generators=[r.generator]).tokens[0]
        assert torch.equal(crowd[i], alone) and torch.equal(alone, batch), i
    assert len({tuple(t.tolist()) for t in crowd.values()}) == len(settings)  # really sampled


def test_jacobi_slots_sample_the_exact_ar_distribution():
    """Requests of two settings share the slots; each setting's 3000 samples fit its exact joint."""
    model = toy_gpt("c2i")
    cond = torch.tensor([3])
    settings = [SamplingParams(cfg_scale=2.5, cfg_schedule="linear", temperature=0.8, top_k=3),
                SamplingParams(cfg_scale=3.0, temperature=1.4, top_p=0.8)]
    per_setting = 3000
    requests = [SlotRequest(cond[0], None, settings[i % 2], torch.Generator().manual_seed(i), tag=i % 2)
                for i in range(2 * per_setting)]
    decoder = JacobiSlotDecoder(model, 256, window=3)
    tokens = decoder.run(requests)
    assert decoder.counters["accepted"] > 0.2 * decoder.counters["drafted"]
    for which, params in enumerate(settings):
        mine = torch.stack([t for t, r in zip(tokens, requests) if r.tag == which])
        assert chi_square_pvalue(mine, exact_joint(model, cond, None, params)) > 1e-3, params
    other = torch.stack([t for t, r in zip(tokens, requests) if r.tag == 1])
    assert chi_square_pvalue(other, exact_joint(model, cond, None, settings[0])) < 1e-6  # the test can fail


def test_jacobi_slots_cancel_max_new_tokens_and_windows():
    model = tiny_gpt("t2i", seed=3)
    r = slot_requests("t2i", [dict(cfg_scale=2.5)])[0]
    r.max_new_tokens = 5
    for window in (1, 2, 16, 100):  # 100: cut to the grid
        r.generator = None
        got = JacobiSlotDecoder(model, 2, window=window).run([r])[0]
        assert torch.equal(got, reference_generate(model, r.cond[None], r.cond_mask[None], cfg_scale=2.5, top_k=1,
                                                   max_new_tokens=5)[0]), window
    requests = slot_requests("t2i", SLOT_SETTINGS[:4])
    decoder = JacobiSlotDecoder(model, 3, window=4)
    decoder.admit(requests[:3])
    decoder.step()
    assert decoder.cancel(lambda r: r.tag == 0) == 1 and decoder.free == 1
    decoder.admit([requests[3]])
    results = {}
    while decoder.slots:
        results.update((r.tag, t) for r, t in decoder.step())
    assert sorted(results) == [1, 2, 3]
    for r, settings in zip(requests[1:], SLOT_SETTINGS[1:4]):
        assert torch.equal(results[r.tag], reference_generate(model, r.cond[None], r.cond_mask[None], top_k=1,
                                                              **settings)[0])
    with pytest.raises(ArgenError, match="window"):
        JacobiSlotDecoder(model, 2, window=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_jacobi_slots_on_gpu_pick_the_argmax_whenever_requests_join(kind):
    """The Jacobi slot decoder on CUDA, float32 and bf16: every greedy token of every request is the
    float32 model's guided argmax (bf16: up to bf16 rounding), whatever joined when."""
    import copy

    from test_engine import guided_gaps

    model = tiny_gpt(kind, head_std=2.0, image_size=128).cuda()
    settings = [dict(cfg_scale=3.0), dict(cfg_scale=1.0), dict(cfg_scale=2.0, temperature=0.7), dict(cfg_scale=3.0)]
    for gpt, tolerance in ((model, 1e-3), (copy.deepcopy(model).to(torch.bfloat16), 0.08)):
        requests = slot_requests(kind, settings, device="cuda")
        decoder = JacobiSlotDecoder(gpt, 3, window=8)
        results = run_staggered(decoder, requests, joins=[0, 2, 30, 31])
        assert decoder.counters["accepted"] > 0
        for r, settings_i in zip(requests, settings):
            cond = r.cond[None].cuda()
            mask = None if r.cond_mask is None else r.cond_mask[None].cuda()
            gaps, spread = guided_gaps(model, cond, mask, results[r.tag][None], settings_i["cfg_scale"])
            assert float(gaps.max()) <= tolerance * spread, (r.tag, float(gaps.max()), spread)

# ---------------------------------------------------------------- command line
def released_c2i(tmp_path):
    """A tiny tokenizer and c2i generator saved as released files: (tokenizer path, the CLI flags that
    load them, the generator as loaded)."""
    from conftest import save_released, tiny_tokenizer
    from conftest import tiny_gpt as random_gpt

    tok = save_released(tiny_tokenizer(), tmp_path / "vq.pt")
    c2i = save_released(random_gpt("c2i"), tmp_path / "c2i.pt")
    flags = ["--tokenizer", str(tok), "--tokenizer-config", "VQ-tiny-16", "--gpt", str(c2i), "--gpt-config",
             "GPT-tiny", "--kind", "c2i", "--image-size", "64", "--device", "cpu"]
    return tok, flags, argen.load_gpt(c2i, config="GPT-tiny", kind="c2i", image_size=64, downsample=16)


def test_sample_and_sample_batch_take_decode_jacobi(tmp_path, capsys):
    from argen.cli.main import main
    from argen.evaluation.sample_batch import SampleBatchConfig, sample_batch
    from argen.sampling import image_seed

    tok, flags, gpt = released_c2i(tmp_path)
    rc = main(["sample", *flags, "--classes", "1,2,3", "--top-k", "20", "--seed", "5", "--decode", "jacobi",
               "--window", "4", "--save-codes", "--out", str(tmp_path / "j")])
    assert rc == 0
    codes = np.load(tmp_path / "j" / "codes.npy")
    gens = [torch.Generator().manual_seed(image_seed(5, i)) for i in range(3)]
    want = argen.generate(gpt, torch.tensor([1, 2, 3]), cfg_scale=4.0, top_k=20, row_generators=gens,
                          decode="jacobi", window=4)
    assert np.array_equal(codes, want.numpy())
    assert main(["sample", *flags, "--classes", "1", "--window", "4", "--out", str(tmp_path / "w")]) == 2
    assert "--window applies only to --decode jacobi" in capsys.readouterr().err

    tokenizer = argen.load_tokenizer(tok, config="VQ-tiny-16")
    params = SamplingParams(top_k=20, cfg_scale=2.0)
    run = tmp_path / "batch"
    base = dict(num_samples=3, batch_size=2, shard_size=3, sampling=params, seed=7)
    path = sample_batch(tokenizer, gpt, SampleBatchConfig(**base, decode="jacobi", window=3), run, progress=False)
    record = json.loads((run / "config.json").read_text())["config"]
    assert record["decode"] == "jacobi" and record["window"] == 3
    plain = sample_batch(tokenizer, gpt, SampleBatchConfig(**base), tmp_path / "plain", progress=False)
    assert "decode" not in json.loads((tmp_path / "plain" / "config.json").read_text())["config"]
    with np.load(path) as a, np.load(plain) as b:
        assert not np.array_equal(a["arr_0"], b["arr_0"])  # another random stream for the same seeds
    with pytest.raises(ArgenError, match="another config"):
        sample_batch(tokenizer, gpt, SampleBatchConfig(**base), run, progress=False)


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_server_wide_jacobi_decoding(scheduler):
    """Both schedulers serve a request's images as `jacobi_decode` with the images' own generators,
    whatever else shares the batch or the slots."""
    from argen.models.tokenizer import VQModel, vq_config
    from argen.sampling import image_seed
    from argen.serving import GenerationService, JobSpec, ServeConfig

    with pytest.raises(ArgenError, match="window"):
        ServeConfig(scheduler=scheduler, window=4)
    model = tiny_gpt("c2i")
    torch.manual_seed(0)
    tokenizer = VQModel(vq_config("VQ-tiny-16")).eval()
    service = GenerationService(tokenizer, model, ServeConfig(scheduler=scheduler, decode="jacobi", window=4,
                                                              max_wait_ms=50, max_batch_size=2))
    service.start()
    try:
        jobs = [service.submit(JobSpec([3, 3, 5], SamplingParams(cfg_scale=2.0, top_k=30), seed=9)),
                service.submit(JobSpec([1], SamplingParams(top_k=1), seed=2))]
        served = [job.future.result(timeout=120)["codes"] for job in jobs]
        metrics = service.metrics()
    finally:
        service.close()
    if scheduler == "continuous":
        assert metrics["jacobi_drafted_total"] > 0 and metrics["jacobi_acceptance"] is not None
    gens = [torch.Generator().manual_seed(image_seed(9, i)) for i in range(3)]
    want = jacobi_decode(model, torch.tensor([3, 3, 5]), None, SamplingParams(cfg_scale=2.0, top_k=30), window=4,
                         row_generators=gens).tokens
    assert np.array_equal(np.array(served[0]), want.numpy())
    assert np.array_equal(np.array(served[1]), reference_generate(model, torch.tensor([1]), top_k=1).numpy())


# ---------------------------------------------------------------- the verify step captured (CUDA graphs)
import test_engine  # noqa: E402
from argen.engine import Batches, engine_for  # noqa: E402
from argen.engine.jacobi import JacobiStep  # noqa: E402
from test_engine import _SimCapture, _SimGraph, guided_gaps  # noqa: E402

simulated_cuda_graphs = test_engine.simulated_cuda_graphs  # the fixture that patches torch.cuda's graph API


def captured_decoder(model: GPT, **kwargs) -> Batches:
    """Static batches whose decoders capture their step as a CUDA device does (under the simulator)."""
    decoder = Batches(model, cuda_graphs=True, kv_bucket=16, **kwargs)
    decoder._capture_on_device = True
    return decoder


def decode(batches: Batches, cond, mask, params, window: int, tree=None, **kwargs) -> jacobi.JacobiResult:
    """A static batch of Jacobi steps through `batches` (the captured-step path)."""
    return batches.run(cond, mask, params, step=JacobiStep(window, tree), **kwargs)


def verify_buckets(decoder: Batches, model: GPT, width: int) -> int:
    cfg = model.config
    full = decoder.kv_bucket * math.ceil((cfg.cond_len + cfg.num_image_tokens) / decoder.kv_bucket)
    return len({min(full, decoder.kv_bucket * math.ceil((cfg.cond_len + s + width - 1) / decoder.kv_bucket))
                for s in range(1, cfg.num_image_tokens - width + 1)})


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_captured_verify_step_replays_to_the_reference_tokens(kind, simulated_cuda_graphs):
    """The Jacobi iteration captured (simulated CUDA graphs: host reads, random draws and freed
    inputs refused, the recorded ops replayed) per kv bucket: greedy tokens are the reference's, call
    after call; the batch of 3 is padded to 4, one graph set serves settings with the same static facts."""
    model = tiny_gpt(kind, seed=4, image_size=128)  # 64 tokens: several kv buckets of 16
    cond, mask = condition(kind, batch=3)
    decoder = captured_decoder(model)
    settings = [dict(cfg_scale=4.0, cfg_schedule="linear"), dict(cfg_scale=2.0, cfg_interval=20)]
    for s in settings:
        expected = reference_generate(model, cond, mask, top_k=1, **s)
        result = decode(decoder, cond, mask, SamplingParams(top_k=1, **s), window=4)
        assert torch.equal(result.tokens, expected), s
        assert int(result.forwards.max()) < 64  # drafts were accepted inside the graph
    buckets = verify_buckets(decoder, model, 4)
    assert _SimGraph.created == buckets >= 3
    assert {c["capture_error_mode"] for c in _SimCapture.calls} == {"thread_local"}
    short = decode(decoder, cond, mask, SamplingParams(top_k=1), window=4, max_new_tokens=9)  # unguided: new graphs
    assert torch.equal(short.tokens, reference_generate(model, cond, mask, top_k=1, max_new_tokens=9))
    assert _SimGraph.created > buckets


def test_captured_verify_step_samples_like_the_eager_jacobi_loop(simulated_cuda_graphs):
    """Sampled tokens through the replayed graphs equal `jacobi_decode`'s CPU loop with the same
    generators (row generators and one shared generator), with the same counts."""
    model = tiny_gpt("t2i", seed=2, image_size=80)  # 25 tokens: kv buckets of 16 and 32
    cond, mask = condition("t2i", batch=5)  # padded to 8
    decoder = captured_decoder(model)
    for params, window in ((SamplingParams(cfg_scale=3.0, top_k=40, temperature=1.3), 4),
                           (SamplingParams(cfg_scale=2.0, top_p=0.8, cfg_schedule="linear"), 6),
                           (SamplingParams(top_k=100, temperature=0.9), 3)):
        for kwargs in (lambda: dict(row_generators=[torch.Generator().manual_seed(s) for s in range(21, 26)]),
                       lambda: dict(generator=torch.Generator().manual_seed(8))):
            got = decode(decoder, cond, mask, params, window=window, **kwargs())
            want = jacobi_decode(model, cond, mask, params, window=window, **kwargs())
            assert torch.equal(got.tokens, want.tokens), (params, window)
            assert torch.equal(got.forwards, want.forwards)
            assert (got.model_calls, got.drafted, got.accepted) == (want.model_calls, want.drafted, want.accepted)
            assert 0 < got.accepted < got.drafted


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_captured_tree_step_replays_like_the_eager_loop(kind, simulated_cuda_graphs):
    """The Jacobi iteration with a draft tree captured (simulated CUDA graphs) per kv bucket: greedy
    tokens are the reference's; sampled tokens and counts (rescues included) are the eager loop's."""
    model = tiny_gpt(kind, seed=2, image_size=80)  # 25 tokens
    cond, mask = condition(kind, batch=3)  # padded to 4
    decoder = captured_decoder(model)
    settings = dict(cfg_scale=3.0, cfg_schedule="linear")
    got = decode(decoder, cond, mask, SamplingParams(top_k=1, **settings), window=6, tree="3x2")
    assert torch.equal(got.tokens, reference_generate(model, cond, mask, top_k=1, **settings))
    assert _SimGraph.created >= 2
    rescued = 0
    for params, window, tree in ((SamplingParams(cfg_scale=3.0, top_k=40, temperature=1.3), 4, "3x2"),
                                 (SamplingParams(top_p=0.9), 6, "4x2x1")):
        gens = [torch.Generator().manual_seed(s) for s in range(21, 24)]
        got = decode(decoder, cond, mask, params, window=window, tree=tree, row_generators=gens)
        gens = [torch.Generator().manual_seed(s) for s in range(21, 24)]
        want = jacobi_decode(model, cond, mask, params, window=window, tree=tree, row_generators=gens)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.forwards, want.forwards), (params, tree)
        assert (got.drafted, got.accepted, got.rescued) == (want.drafted, want.accepted, want.rescued)
        rescued += got.rescued
    assert rescued > 0  # alternatives won inside the graph


def test_simulator_refuses_a_host_read_in_the_verify_step(simulated_cuda_graphs, monkeypatch):
    model = tiny_gpt("c2i", seed=4)
    original = jacobi.verify

    def with_host_read(p, length, drafts, q, uniforms):
        if float(uniforms[0, 0]) < 2.0:  # a Python branch on a device value
            pass
        return original(p, length, drafts, q, uniforms)

    monkeypatch.setattr(jacobi, "verify", with_host_read)
    with pytest.raises(AssertionError, match="host sync"):
        decode(captured_decoder(model), torch.tensor([1, 2]), None, SamplingParams(top_k=1), window=4)


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_captured_jacobi_slot_step_replays_like_the_eager_slots(kind, simulated_cuda_graphs):
    """The all-slots Jacobi iteration captured (simulated CUDA graphs: host reads and draws inside are
    refused) per kv bucket and static facts, mid-run: greedy tokens are the reference's, and sampled
    tokens and counts equal the eager Jacobi slot decoder's with the same generators."""
    model = tiny_gpt(kind, seed=4, image_size=128)  # 64 tokens: several kv buckets of 16
    requests = slot_requests(kind, SLOT_SETTINGS[:5])
    decoder = JacobiSlotDecoder(model, 4, window=6, cuda_graphs=True, kv_bucket=16)
    decoder._capture_on_device = True  # what a CUDA device does
    results = run_staggered(decoder, requests, joins=[0, 3, 20, 21, 40])
    assert _SimGraph.created == len(decoder.graphs) >= 3
    assert_greedy_reference(model, requests, SLOT_SETTINGS, results)

    sampled = [dict(cfg_scale=2.0, top_p=0.9), dict(temperature=1.3), dict(cfg_scale=4.0, cfg_interval=3)]
    runs = []
    for graphs in (True, False):
        decoder = JacobiSlotDecoder(model, 2, window=4, cuda_graphs=graphs, kv_bucket=16)
        decoder._capture_on_device = graphs
        runs.append((run_staggered(decoder, slot_requests(kind, sampled, top_k=50), joins=[0, 5, 9]),
                     dict(decoder.counters)))
    (captured, counts), (eager, eager_counts) = runs
    assert all(torch.equal(captured[i], eager[i]) for i in range(len(sampled)))
    assert (counts["accepted"], counts["drafted"]) == (eager_counts["accepted"], eager_counts["drafted"])
    assert len({tuple(t.tolist()) for t in captured.values()}) == len(sampled)


def test_jacobi_decode_uses_the_cached_graph_decoder_when_asked():
    model = tiny_gpt("c2i", seed=4)
    cond = torch.tensor([1, 2, 3])
    expected = reference_generate(model, cond, cfg_scale=2.0, top_k=1)
    got = jacobi_decode(model, cond, None, SamplingParams(cfg_scale=2.0, top_k=1), window=4, cuda_graphs=True)
    assert torch.equal(got.tokens, expected)
    assert engine_for(model, cuda_graphs=True)._decoders  # the fixed-shape step ran (uncaptured on a CPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_captured_verify_step_on_gpu(kind):
    """Real CUDA graphs of the Jacobi iteration: greedy tokens are the float32 model's guided argmax
    (teacher forcing), replays repeat them, and sampling equals the uncaptured CUDA loop's tokens for
    the same generators on all but near ties."""
    model = tiny_gpt(kind, head_std=2.0, image_size=128).cuda()
    cond, mask = condition(kind, batch=6) if kind == "t2i" else (torch.arange(6) % 10, None)
    cond, mask = cond.cuda(), None if mask is None else mask.cuda()
    decoder = Batches(model)
    assert decoder.use_graphs and decoder._capture_on_device
    params = SamplingParams(cfg_scale=3.0, top_k=1)
    got = decode(decoder, cond, mask, params, window=8)
    assert any(d.graphs for d in decoder._decoders.values())
    assert torch.equal(decode(decoder, cond, mask, params, window=8).tokens, got.tokens)
    gaps, spread = guided_gaps(model, cond, mask, got.tokens, 3.0)
    assert float(gaps.max()) <= 1e-3 * spread, (float(gaps.max()), spread)
    sampled = SamplingParams(cfg_scale=2.0, top_k=50, temperature=1.2)

    def gens():
        return [torch.Generator("cuda").manual_seed(s) for s in range(6)]

    a = decode(decoder, cond, mask, sampled, window=4, row_generators=gens())
    b = jacobi_decode(model, cond, mask, sampled, window=4, row_generators=gens(), cuda_graphs=False)
    assert (a.tokens == b.tokens).float().mean() >= 0.5
