"""Draft trees and maximal-coupling redrafts (`benchmarks/speculate.py`): greedy equality with the
reference, tree outputs equal to plain causal outputs, the exact AR distribution by enumeration and a
chi-square test, and three inexact rules that the same test rejects (alternatives verified against p
instead of the residual the spine's rejection left, commits past a rejection, old drafts kept as
samples of the new proposal)."""

from __future__ import annotations

import pytest
import speculate
import torch
from speculate import Spec, speculative_decode, tree_layout, tree_mask, tree_slots

from argen.sampling import SamplingParams, reference_generate
from argen.utils.errors import ArgenError
from test_engine import condition, tiny_gpt
from test_jacobi import DISTRIBUTION_CASES, chi_square_pvalue, exact_joint, toy_gpt

SPECS = [Spec(3), Spec(4, 3, 2, 1, "max"), Spec(16, 4, 3, 15, "max"), Spec(6, 3, 3, 2, "gumbel")]


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_greedy_gives_the_reference_tokens(kind):
    model = tiny_gpt(kind)
    cond, mask = condition(kind)
    for settings in (dict(), dict(cfg_scale=3.0, cfg_interval=5), dict(cfg_scale=4.0, cfg_schedule="linear")):
        want = reference_generate(model, cond, mask, top_k=1, **settings)
        for spec in SPECS:  # 16 > N - 1: clamped, and the window is moved back at the end
            got = speculative_decode(model, cond, mask, SamplingParams(top_k=1, **settings), spec)
            assert torch.equal(got.tokens, want), (settings, spec)
    with pytest.raises(ArgenError, match="window"):
        speculative_decode(model, cond, mask, SamplingParams(), Spec(1))
    with pytest.raises(ArgenError, match="coupling"):
        speculative_decode(model, cond, mask, SamplingParams(), Spec(4, coupling="copy"))


@pytest.mark.repro
def test_row_generators_make_an_image_independent_of_its_batch():
    model = tiny_gpt("t2i", seed=2)
    cond, mask = condition("t2i", batch=3)
    params, spec = SamplingParams(cfg_scale=3.0, top_k=40, temperature=1.3), Spec(6, 3, 2, 5, "max")
    seeds = [11, 12, 13]
    batch = speculative_decode(model, cond, mask, params, spec,
                               row_generators=[torch.Generator().manual_seed(s) for s in seeds])
    for i in (0, 2):
        alone = speculative_decode(model, cond[i:i + 1], mask[i:i + 1], params, spec,
                                   row_generators=[torch.Generator().manual_seed(seeds[i])])
        assert torch.equal(batch.tokens[i], alone.tokens[0]) and batch.forwards[i] == alone.forwards[0], i
    assert not torch.equal(batch.tokens[0], batch.tokens[1])


def test_tree_outputs_equal_plain_causal_outputs():
    """Each branch of a tree forward (one pass, scratch slots, tree mask) gives the logits that a plain
    causal forward of the accepted prefix + that branch gives."""
    model = tiny_gpt("c2i", seed=1)
    cfg = model.config
    window, k, depth, groups, n = 4, 3, 2, 2, 5
    prefix = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    spine = torch.randint(0, cfg.vocab_size, (1, window - 1), generator=torch.Generator().manual_seed(1))
    alternatives = torch.tensor([[[7, 9], [11, 13]]])  # (1, G, K-1): for tokens n and n+1
    layout = tree_layout(window, k, depth, groups)
    inputs = torch.cat([prefix[:, -1:], speculate.tree_inputs(spine, alternatives, depth)], dim=1)
    scratch = cfg.cond_len + cfg.num_image_tokens
    cache = model.new_cache(1, scratch + groups * (k - 1) * depth)
    with torch.no_grad():
        cond = torch.tensor([2])
        model.forward_cached(model.embed_condition(cond), torch.arange(cfg.cond_len), cache, cfg.cond_len)
        model.forward_cached(model.embed_tokens(prefix[:, :-1]), cfg.cond_len + torch.arange(n - 1), cache,
                             cfg.cond_len + n - 1)
        root = torch.tensor([cfg.cond_len + n - 1])
        slots = tree_slots(root, layout, scratch, depth)
        mask = tree_mask(torch.ones(1, cache[0].shape[3], dtype=torch.bool), root, slots, layout["ancestors"],
                         cache[0].shape[3])
        got = model.forward_cached(model.embed_tokens(inputs), root[:, None] + layout["depth"], cache,
                                   cache[0].shape[3], mask, slots=slots)
        paths = [([1, 2, 3], spine[0])]  # (inputs after the root, their tokens)
        for g in range(groups):
            for b in range(k - 1):
                first = window + (g * (k - 1) + b) * depth
                paths.append((list(range(1, g + 1)) + [first, first + 1],
                              torch.cat([spine[0, :g], alternatives[0, g, b:b + 1], spine[0, g + 1:g + depth]])))
        for nodes, tokens in paths:
            seq = torch.cat([prefix[0], tokens, tokens[:1]])[None]  # + one token: its output is unused
            want = model.logits(seq, cond)[0, n:]  # predictions of token n (the root's output) onwards
            torch.testing.assert_close(got[0, [0] + nodes], want[:len(nodes) + 1], atol=1e-4, rtol=1e-4)


SAMPLES = 6000


def _draw(model, cond, mask, params, spec, seed=0):
    return speculative_decode(model, cond.expand(SAMPLES, *cond.shape[1:]),
                              None if mask is None else mask.expand(SAMPLES, -1), params, spec,
                              generator=torch.Generator().manual_seed(seed))


def _case(kind):
    if kind == "c2i":
        return torch.tensor([3]), None
    cond = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(1, 8)
    mask[0, :2] = 0
    return cond, mask


def _naive_continuation(p, drafts, q, checked, uniforms, draws):
    """Inexact: after the first rejection, keep verifying the later drafts against outputs that saw
    the rejected draft, and commit them up to the next rejection."""
    count, length = drafts.shape
    tokens = torch.cat([drafts, drafts.new_zeros(count, 1)], dim=1)
    committed = torch.zeros(count, dtype=torch.long)
    rejections = torch.zeros(count, dtype=torch.long)
    for j in range(length + 1):
        live = rejections < 2
        if j < length:
            d = drafts[:, j:j + 1]
            ok = speculate._accept(uniforms[:, j], q[:, j].gather(-1, d)[:, 0], p[:, j].gather(-1, d)[:, 0])
            test = checked[:, j] & live
            resample = test & ~ok
            weights = speculate._reject_update(p[:, j], q[:, j])
            tokens[:, j] = torch.where(resample, speculate._draw(weights, draws[:, j]), tokens[:, j])
            committed += test.long()
            rejections += resample.long()
            stop = ~checked[:, j] & live
        else:
            stop = live
        tokens[:, j] = torch.where(stop, speculate._draw(p[:, j], draws[:, j]), tokens[:, j])
        committed += stop.long()
        rejections = torch.where(stop, 2, rejections)
    return committed.clamp(min=1), tokens, torch.zeros(count, dtype=torch.bool), p[:, 0]


def _alternatives_against_p(p, drafts, q, checked, uniforms, draws):
    """Inexact: the alternatives after a spine rejection are tested against p itself, not against the
    residual max(0, p - q) that the rejection left."""
    count, tokens, rejected, _ = CHAIN(p, drafts, q, checked, uniforms, draws)
    return count, tokens, rejected, p[torch.arange(p.shape[0]), count - 1]


CHAIN = speculate.chain


@pytest.mark.parametrize("kind,settings", DISTRIBUTION_CASES,
                         ids=[f"{k}-" + ",".join(f"{a}={b}" for a, b in s.items()) for k, s in DISTRIBUTION_CASES])
def test_trees_and_couplings_sample_the_exact_distribution_and_wrong_rules_are_caught(kind, settings, monkeypatch):
    model = toy_gpt(kind)
    cond, mask = _case(kind)
    params = SamplingParams(**settings)
    joint = exact_joint(model, cond, mask, params)
    rescued = 0
    for spec in (Spec(3, 3, 2, 1, "max"), Spec(3, 3, 2, 2, "gumbel")):
        right = _draw(model, cond, mask, params, spec)
        rescued += int(right.rescues[2:].sum())  # alternatives that won (none where top-p leaves one code)
        assert chi_square_pvalue(right.tokens, joint) > 1e-3, spec
    if "top_k" in settings:  # top-p 0.8 of this toy leaves one code: no alternative to verify
        assert rescued > 0.05 * SAMPLES
        with monkeypatch.context() as m:
            m.setattr(speculate, "chain", _alternatives_against_p)
            wrong = _draw(model, cond, mask, params, Spec(3, 3, 2, 2, "max"))
            assert chi_square_pvalue(wrong.tokens, joint) < 1e-6
    with monkeypatch.context() as m:
        m.setattr(speculate, "chain", _naive_continuation)
        assert chi_square_pvalue(_draw(model, cond, mask, params, Spec(3, coupling="max")).tokens, joint) < 1e-6
    with monkeypatch.context() as m:
        m.setattr(speculate, "couple", lambda old, q_old, p_new, u, d: old)  # keeps drafts, records p as q
        assert chi_square_pvalue(_draw(model, cond, mask, params, Spec(3, coupling="max")).tokens, joint) < 1e-6


@pytest.mark.parametrize("spec", [Spec(8, 2, 3, 3, "max"), Spec(12, 2, 4, 1, "gumbel")], ids=str)
def test_long_windows_with_trees_keep_the_exact_distribution(spec):
    """9 binary tokens (512 sequences): drafts stay in the window over several iterations, branches
    are accepted and their keys moved into place, the window is moved back at the end of the grid."""
    model = toy_gpt("c2i", vocab=2, grid=3, embedding_gain=10.0)
    cond, params = torch.tensor([3]), SamplingParams(cfg_scale=2.5)
    joint = exact_joint(model, cond, None, params)
    samples = 20000
    result = speculative_decode(model, cond.expand(samples), None, params, spec,
                                generator=torch.Generator().manual_seed(spec.window))
    assert result.forwards.double().mean() < 0.4 * 9
    assert result.rescues[2] > 0.02 * samples  # the alternative wins sometimes
    assert chi_square_pvalue(result.tokens, joint, vocab=2) > 1e-3
    shifted = speculative_decode(model, torch.tensor([4]).expand(samples), None, params, spec,
                                 generator=torch.Generator().manual_seed(spec.window))
    assert chi_square_pvalue(shifted.tokens, joint, vocab=2) < 1e-6
