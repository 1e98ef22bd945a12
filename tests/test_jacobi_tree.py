"""Draft trees in Jacobi decoding (`argen.engine.draft_tree`, `JacobiStep(window, tree)`): greedy equality
with the reference, tree outputs equal to plain causal outputs, batch and co-tenant independence, kept
tokens, the exact AR distribution by enumeration and a chi-square test, and two inexact rules that the
same test rejects (alternatives verified against p instead of the residual the spine's rejection left;
a branch committing tokens past its first rejection)."""

from __future__ import annotations

import pytest
import torch

import argen
import argen.engine.jacobi as jacobi
from argen.engine import SlotDecoder
from argen.engine.draft_tree import (
    DraftTree,
    accept,
    draw,
    parse_tree,
    reject_update,
    tree_inputs,
    tree_layout,
    tree_mask,
    tree_slots,
)
from argen.engine.jacobi import JacobiStep, jacobi_decode
from argen.sampling import SamplingParams, reference_generate
from argen.utils.errors import ArgenError
from test_engine import SLOT_SETTINGS, assert_greedy_reference, condition, run_staggered, slot_requests, tiny_gpt
from test_jacobi import DISTRIBUTION_CASES, chi_square_pvalue, exact_joint, toy_gpt

# (window, tree): a tree at the first position, at two, at all (16 > N - 1 is clamped to 15 and the
# window is moved back at the end of the grid), candidates beyond the vocabulary's reach of q
TREES = [(3, "2x1x1"), (4, "3x2x1"), (6, "3x3x2"), (16, "4x3")]


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_greedy_with_trees_gives_the_reference_tokens(kind):
    model = tiny_gpt(kind)
    cond, mask = condition(kind)
    for settings in (dict(), dict(cfg_scale=3.0, cfg_interval=5), dict(cfg_scale=4.0, cfg_schedule="linear")):
        want = reference_generate(model, cond, mask, top_k=1, **settings)
        for window, tree in TREES:
            got = jacobi_decode(model, cond, mask, SamplingParams(top_k=1, **settings), window=window, tree=tree)
            assert torch.equal(got.tokens, want), (settings, window, tree)
    assert torch.equal(argen.generate(model, cond, mask, top_k=1, decode="jacobi", tree="3x2"),
                       reference_generate(model, cond, mask, top_k=1))


def test_tree_settings_and_bad_arguments():
    assert parse_tree("4x2") == DraftTree(4, 2) and str(parse_tree("4x3x1")) == "4x3x1"
    assert parse_tree(None) is None and parse_tree(DraftTree(3, 1)) == DraftTree(3, 1)
    assert DraftTree(4, 3).fit(window=3, vocab=512) == DraftTree(4, 2, 2)  # depth and groups cut to W-1
    assert DraftTree(4, 2, 9).fit(window=8, vocab=2) == DraftTree(2, 2, 7)
    assert DraftTree(4, 2).fit(window=1, vocab=512) is None  # no spine draft to branch from
    for bad in ("4", "4x", "x2", "4x2x1x1", "four", 4):
        with pytest.raises(ArgenError, match="KxD"):
            parse_tree(bad)
    for bad in ((1, 2), (4, 0), (4, 2, 0), (4.0, 2)):
        with pytest.raises(ArgenError, match="draft tree"):
            DraftTree(*bad)
    model = tiny_gpt("c2i")
    with pytest.raises(ArgenError, match="decode='jacobi'"):
        argen.generate(model, torch.tensor([1]), tree="4x2")
    with pytest.raises(ArgenError, match="KxD"):
        jacobi_decode(model, torch.tensor([1]), tree="4-2")
    r = slot_requests("c2i", [dict()])[0]  # a window of 1 has no drafts: the tree is dropped
    assert torch.equal(SlotDecoder(model, 1, JacobiStep(1, "4x2")).run([r])[0],
                       reference_generate(model, r.cond[None], top_k=1)[0])


@pytest.mark.repro
def test_row_generators_make_an_image_independent_of_its_batch():
    model = tiny_gpt("t2i", seed=2)
    cond, mask = condition("t2i", batch=3)
    params = SamplingParams(cfg_scale=3.0, top_k=40, temperature=1.3)
    seeds = [11, 12, 13]
    batch = jacobi_decode(model, cond, mask, params, window=6, tree="3x2",
                          row_generators=[torch.Generator().manual_seed(s) for s in seeds])
    assert batch.rescued > 0
    for i in (0, 2):
        alone = jacobi_decode(model, cond[i:i + 1], mask[i:i + 1], params, window=6, tree="3x2",
                              row_generators=[torch.Generator().manual_seed(seeds[i])])
        assert torch.equal(batch.tokens[i], alone.tokens[0]) and batch.forwards[i] == alone.forwards[0], i
    assert not torch.equal(batch.tokens[0], batch.tokens[1])
    plain = jacobi_decode(model, cond, mask, params, window=6,
                          row_generators=[torch.Generator().manual_seed(s) for s in seeds])
    assert not torch.equal(plain.tokens, batch.tokens)  # the tree changes the random stream, not the law


def test_tree_outputs_equal_plain_causal_outputs():
    """Each branch of a tree forward (one pass, scratch slots after the window as the engine places
    them, tree mask) gives the logits that a plain causal forward of the accepted prefix + that branch
    gives."""
    model = tiny_gpt("c2i", seed=1)
    cfg = model.config
    window, k, depth, groups, n = 4, 3, 2, 2, 5
    prefix = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    spine = torch.randint(0, cfg.vocab_size, (1, window - 1), generator=torch.Generator().manual_seed(1))
    alternatives = torch.tensor([[[7, 9], [11, 13]]])  # (1, G, K-1): for tokens n and n+1
    layout = tree_layout(window, k, depth, groups)
    inputs = torch.cat([prefix[:, -1:], tree_inputs(spine, alternatives, depth)], dim=1)
    cache = model.new_cache(1, cfg.cond_len + cfg.num_image_tokens + groups * (k - 1) * depth)
    kv = cache[0].shape[3]
    with torch.no_grad():
        cond = torch.tensor([2])
        model.forward_cached(model.embed_condition(cond), torch.arange(cfg.cond_len), cache, cfg.cond_len)
        model.forward_cached(model.embed_tokens(prefix[:, :-1]), cfg.cond_len + torch.arange(n - 1), cache,
                             cfg.cond_len + n - 1)
        root = torch.tensor([cfg.cond_len + n - 1])
        slots = tree_slots(root, layout, root[:, None] + window, depth)
        mask = tree_mask(torch.ones(1, kv, dtype=torch.bool), root, slots, layout["ancestors"], kv)
        got = model.forward_cached(model.embed_tokens(inputs), root[:, None] + layout["depth"], cache, kv, mask,
                                   slots=slots)
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


# ---------------------------------------------------------------- the slot decoder
@pytest.mark.repro
@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_tree_slots_are_jacobi_decode_whatever_else_runs(kind):
    """Per-request settings in the slots of `JacobiStep(4, "3x2")`: greedy requests joining at other
    steps get the reference's tokens; a sampled request's tokens are the same alone, in a crowd and
    from `jacobi_decode` with its generator."""
    model = tiny_gpt(kind, seed=4, image_size=128)  # 64 tokens
    requests = slot_requests(kind, SLOT_SETTINGS[:5])
    decoder = SlotDecoder(model, 3, JacobiStep(6, "3x2"))
    assert_greedy_reference(model, requests, SLOT_SETTINGS, run_staggered(decoder, requests, joins=[0, 0, 2, 5, 9]))
    assert decoder.counters["slot_steps"] == 5 * 63 - decoder.counters["accepted"]  # 1 + gained tokens a step

    model = tiny_gpt(kind, seed=5, head_std=0.3)
    settings = [dict(cfg_scale=2.0, top_p=0.9), dict(temperature=1.3), dict(cfg_scale=4.0, cfg_interval=3)]
    decoder = SlotDecoder(model, 2, JacobiStep(4, "3x2"))
    crowd = run_staggered(decoder, slot_requests(kind, settings, top_k=50), joins=[0, 1, 4])
    assert decoder.counters["rescued"] > 0
    for i in range(len(settings)):
        r = slot_requests(kind, settings, top_k=50)[i]
        alone = SlotDecoder(model, 1, JacobiStep(4, "3x2")).run([slot_requests(kind, settings, top_k=50)[i]])[0]
        batch = jacobi_decode(model, r.cond[None], None if r.cond_mask is None else r.cond_mask[None], r.params,
                              window=4, tree="3x2", row_generators=[r.generator]).tokens[0]
        assert torch.equal(crowd[i], alone) and torch.equal(alone, batch), i
    assert len({tuple(t.tolist()) for t in crowd.values()}) == len(settings)  # really sampled


def test_kept_tokens_with_a_tree():
    """Edits among plain requests: kept tokens are kept, greedy edits are the reference loop's."""
    from test_forced import edit_mask, forced_from

    model = tiny_gpt("t2i", seed=5, head_std=0.1)
    settings = SLOT_SETTINGS[:3]
    n = model.config.num_image_tokens
    source = torch.randint(0, 512, (3, n), generator=torch.Generator().manual_seed(9))
    forced = forced_from(source, edit_mask(3, n, seed=6))
    requests = slot_requests("t2i", settings)
    for i in (0, 2):
        requests[i].forced = forced[i]
    results = run_staggered(SlotDecoder(model, 2, JacobiStep(5, "3x2")), requests, joins=[0, 1, 3])
    for r, s in zip(requests, settings):
        want = reference_generate(model, r.cond[None], r.cond_mask[None], top_k=1,
                                  forced_tokens=None if r.forced is None else r.forced[None], **s)[0]
        assert torch.equal(results[r.tag], want), r.tag


# ---------------------------------------------------------------- the exact distribution
SAMPLES = 6000


def _case(kind):
    if kind == "c2i":
        return torch.tensor([3]), None
    cond = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(1, 8)
    mask[0, :2] = 0
    return cond, mask


def _sample(model, cond, mask, params, tree, window=3, samples=SAMPLES, seed=0):
    return jacobi_decode(model, cond.expand(samples, *cond.shape[1:]),
                         None if mask is None else mask.expand(samples, -1), params, window=window, tree=tree,
                         generator=torch.Generator().manual_seed(seed), max_batch=samples)


def _past_the_rejection(p, drafts, q, checked, uniforms, draws, forced=None):
    """Inexact: after a chain's first rejection (the spine's or a branch's), keep verifying its later
    drafts against outputs that saw the rejected draft, and commit them up to the next rejection."""
    count, length = drafts.shape
    tokens = torch.cat([drafts, drafts.new_zeros(count, 1)], dim=1)
    committed = torch.zeros(count, dtype=torch.long)
    rejections = torch.zeros(count, dtype=torch.long)
    for j in range(length + 1):
        live = rejections < 2
        if j < length:
            d = drafts[:, j:j + 1]
            ok = accept(uniforms[:, j], q[:, j].gather(-1, d)[:, 0], p[:, j].gather(-1, d)[:, 0])
            test = checked[:, j] & live
            resample = test & ~ok
            tokens[:, j] = torch.where(resample, draw(reject_update(p[:, j], q[:, j]), draws[:, j]), tokens[:, j])
            committed += test.long()
            rejections += resample.long()
            stop = ~checked[:, j] & live
        else:
            stop = live
        tokens[:, j] = torch.where(stop, draw(p[:, j], draws[:, j]), tokens[:, j])
        committed += stop.long()
        rejections = torch.where(stop, 2, rejections)
    return committed.clamp(min=1), tokens, torch.zeros(count, dtype=torch.bool)


WRONG_RULES = {  # per distribution case: an inexact rule the chi-square test must catch
    0: ("reject_update", lambda r, q: r),  # the alternatives' target: p itself, not the residual
    2: ("chain", _past_the_rejection),  # a chain (spine or branch) commits past its first rejection
}


@pytest.mark.parametrize("case", range(len(DISTRIBUTION_CASES)),
                         ids=[f"{k}-" + ",".join(f"{a}={b}" for a, b in s.items()) for k, s in DISTRIBUTION_CASES])
def test_trees_sample_the_exact_distribution_and_wrong_rules_are_caught(case, monkeypatch):
    """4 tokens of 5 codes (625 sequences), W = 3 with 3 candidates at every position and branches of
    2 tokens; an inexact rule in the tree's verification is caught."""
    kind, settings = DISTRIBUTION_CASES[case]
    model = toy_gpt(kind)
    cond, mask = _case(kind)
    params = SamplingParams(**settings)
    joint = exact_joint(model, cond, mask, params)
    right = _sample(model, cond, mask, params, "3x2")
    assert chi_square_pvalue(right.tokens, joint) > 1e-3
    if case not in WRONG_RULES:  # top-p 0.8 of this toy leaves one code: no alternative to verify
        assert right.rescued == 0
        return
    assert right.rescued > 0.1 * SAMPLES  # alternatives do win
    monkeypatch.setattr(jacobi, *WRONG_RULES[case])
    wrong = _sample(model, cond, mask, params, "3x2")
    assert chi_square_pvalue(wrong.tokens, joint) < 1e-6


@pytest.mark.parametrize("tree", ["2x3x3", "2x2"])
def test_long_windows_with_trees_keep_the_exact_distribution(tree):
    """9 binary tokens (512 sequences), W = 8 with 2 candidates at the first 3 positions and branches of
    3 tokens, or at every position with branches of 2: drafts stay in the window over several
    iterations, branches are accepted and their keys/values moved into place, the window is moved
    back at the end of the grid."""
    model = toy_gpt("c2i", vocab=2, grid=3, embedding_gain=10.0)
    params = SamplingParams(cfg_scale=2.5)
    samples = 10000
    result = _sample(model, torch.tensor([3]), None, params, tree, 8, samples, seed=8)
    assert result.forwards.double().mean() < 0.4 * 9
    assert result.rescued > 0.05 * samples  # the alternative wins sometimes
    assert chi_square_pvalue(result.tokens, exact_joint(model, torch.tensor([3]), None, params), vocab=2) > 1e-3
    other = exact_joint(model, torch.tensor([4]), None, params)
    assert chi_square_pvalue(result.tokens, other, vocab=2) < 1e-6  # the test can tell classes apart


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_tree_step_on_gpu():
    """Real CUDA graphs of the iteration with a tree: greedy tokens are the float32 model's guided
    argmax (teacher forcing) and replays repeat them; sampled, alternatives win inside the graph."""
    from argen.engine import Batches
    from test_engine import guided_gaps

    model = tiny_gpt("c2i", head_std=2.0, image_size=128).cuda()
    cond = (torch.arange(6) % 10).cuda()
    decoder = Batches(model)
    params = SamplingParams(cfg_scale=3.0, top_k=1)
    got = decoder.run(cond, None, params, step=JacobiStep(8, "4x2"))
    assert any(d.graphs for d in decoder._decoders.values())
    assert torch.equal(decoder.run(cond, None, params, step=JacobiStep(8, "4x2")).tokens, got.tokens)
    gaps, spread = guided_gaps(model, cond, None, got.tokens, 3.0)
    assert float(gaps.max()) <= 1e-3 * spread, (float(gaps.max()), spread)
    sampled = decoder.run(cond, None, SamplingParams(cfg_scale=2.0, top_k=50, temperature=1.2),
                          row_generators=[torch.Generator("cuda").manual_seed(s) for s in range(6)],
                          step=JacobiStep(4, "3x2"))
    assert sampled.rescued > 0
