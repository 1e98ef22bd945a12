"""Forced tokens in the engine (issue 27, part 1): kept tokens are given, never sampled; a run of them
costs one forward pass; regenerated tokens follow the reference loop that forces the kept ones (greedy),
keep plain sampling's numbers, do not depend on co-tenants, and Jacobi with kept tokens stays exact."""

from __future__ import annotations

import pytest
import torch

import argen
import test_engine
from argen.engine import Batches, JacobiSlotDecoder, JacobiStep, SlotDecoder, SlotRequest
from argen.sampling import SamplingParams, guidance_scale_at, guided_logits, process_logits, reference_generate
from argen.utils.errors import ArgenError
from test_engine import condition, run_staggered, slot_requests, tiny_gpt

simulated_cuda_graphs = test_engine.simulated_cuda_graphs  # the fixture that patches torch.cuda's graph API


def edit_mask(batch: int, tokens: int, seed: int = 0, keep: float = 0.6) -> torch.Tensor:
    """(B, N) bool: True where the token is kept; runs of kept tokens of various lengths."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, tokens, generator=g) < keep


def forced_from(tokens: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    return torch.where(kept, tokens, torch.full_like(tokens, -1))


def runs_followed_by_sampled(forced: torch.Tensor) -> int:
    """Runs of kept tokens with a sampled token after them (a run that ends the image costs nothing)."""
    kept = (forced >= 0).tolist()
    return sum(1 for i in range(len(kept) - 1) if kept[i] and not kept[i + 1])


def expected_forwards(forced: torch.Tensor) -> int:
    """Prefill, one step per sampled token after token 0, one extend per run that a sampled token follows."""
    sampled = int((forced < 0).sum())
    return 1 + sampled - int(forced[0] < 0) + runs_followed_by_sampled(forced)


SETTINGS = [dict(cfg_scale=4.0, cfg_schedule="linear", temperature=0.7), dict()]


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "-")
def test_greedy_with_forced_tokens_equals_the_reference_loop_forcing_them(kind, settings):
    model = tiny_gpt(kind, seed=4)  # 16 tokens
    n = model.config.num_image_tokens
    cond, mask = condition(kind, batch=3)
    source = torch.randint(0, 512, (3, n), generator=torch.Generator().manual_seed(1))
    forced = forced_from(source, edit_mask(3, n))
    forced[0, 0] = -1  # token 0 sampled in one image, kept in another
    forced[1, 0] = 7
    expected = reference_generate(model, cond, mask, top_k=1, forced_tokens=forced, **settings)
    for decode, window in (("ar", None), ("jacobi", 4)):
        got = argen.generate(model, cond, mask, top_k=1, forced_tokens=forced, decode=decode, window=window,
                             **settings)
        assert torch.equal(got, expected), decode
    kept = forced >= 0
    assert torch.equal(expected[kept], forced[kept])
    assert not torch.equal(expected, reference_generate(model, cond, mask, top_k=1, **settings))  # it matters


def test_kept_tokens_never_change_and_all_or_nothing_forced():
    model = tiny_gpt("c2i", seed=5, head_std=0.1)
    cond = torch.tensor([3, 1, 4])
    params = SamplingParams(cfg_scale=2.0, top_k=50, temperature=1.2)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6, 7)]  # noqa: E731
    for decode, window in (("ar", None), ("jacobi", 4)):
        free = argen.generate(model, cond, params=params, row_generators=gens(), decode=decode, window=window)
        nothing = torch.full_like(free, -1)
        same = argen.generate(model, cond, params=params, row_generators=gens(), decode=decode, window=window,
                              forced_tokens=nothing)
        assert torch.equal(same, free), decode  # all sampled: exactly today's tokens
        source = torch.randint(0, 512, free.shape, generator=torch.Generator().manual_seed(2))
        everything = argen.generate(model, cond, params=params, row_generators=gens(), decode=decode,
                                    window=window, forced_tokens=source)
        assert torch.equal(everything, source), decode
        forced = forced_from(source, edit_mask(3, free.shape[1], seed=3))
        edited = argen.generate(model, cond, params=params, row_generators=gens(), decode=decode, window=window,
                                forced_tokens=forced)
        kept = forced >= 0
        assert torch.equal(edited[kept], source[kept]), decode
        assert not torch.equal(edited[~kept], source[~kept])


def test_a_regenerated_token_draws_the_uniform_plain_sampling_draws_there():
    """Keep the tokens a seed sampled at some positions: the others are the same tokens again (each
    regenerated token sees the same context and draws the same number as before)."""
    model = tiny_gpt("t2i", seed=2, head_std=0.1)
    cond, mask = condition("t2i", batch=2)
    params = SamplingParams(cfg_scale=2.5, top_k=40)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12)]  # noqa: E731
    free = argen.generate(model, cond, mask, params=params, row_generators=gens())
    forced = forced_from(free, edit_mask(2, free.shape[1], seed=4))
    assert torch.equal(argen.generate(model, cond, mask, params=params, row_generators=gens(),
                                      forced_tokens=forced), free)


def test_step_counts_are_regenerated_tokens_plus_runs():
    model = tiny_gpt("c2i", seed=4)  # 4 x 4 tokens
    n = model.config.num_image_tokens
    source = torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(0))
    row, col = torch.arange(n) // 4, torch.arange(n) % 4
    cases = {
        "bottom half": row < 2,
        "right half": col < 2,
        "centre box": ~((row >= 1) & (row < 3) & (col >= 1) & (col < 3)),
        "scattered": edit_mask(1, n, seed=5)[0],
        "nothing kept": torch.zeros(n, dtype=torch.bool),
    }
    engine = Batches(model)
    params = SamplingParams(cfg_scale=2.0, top_k=1)
    for name, kept in cases.items():
        forced = forced_from(source, kept[None])
        result = engine.run(torch.tensor([3]), None, params, forced=forced)
        assert int(result.forwards[0]) == expected_forwards(forced[0]), name
        assert result.model_calls == int(result.forwards[0])
        assert torch.equal(result.tokens, reference_generate(model, torch.tensor([3]), cfg_scale=2.0, top_k=1,
                                                             forced_tokens=forced)), name
        regenerated = int((forced < 0).sum())
        runs = sum(1 for i in range(n) if kept[i] and (i == 0 or not kept[i - 1]))
        assert int(result.forwards[0]) <= regenerated + runs + 1, name  # + 1: the prefill, when token 0 is kept


def test_a_batch_of_edits_with_one_mask_shares_its_extends():
    """Images kept in the same places feed their kept runs in one forward pass together: the batch's
    model calls are one image's forwards, and each image's tokens and count are its own alone."""
    model = tiny_gpt("c2i", seed=4)
    n = model.config.num_image_tokens
    row = torch.arange(n) // 4
    kept = (row < 1) | (row == 2)  # a leading run and a run in the middle
    source = torch.randint(0, 512, (3, n), generator=torch.Generator().manual_seed(1))
    forced = forced_from(source, kept[None].expand(3, n))
    params = SamplingParams(cfg_scale=2.0, top_k=1)
    classes = torch.tensor([3, 5, 7])
    result = Batches(model).run(classes, None, params, forced=forced)
    assert result.forwards.tolist() == [expected_forwards(forced[0])] * 3
    assert result.model_calls == expected_forwards(forced[0])
    for i in range(3):
        alone = Batches(model).run(classes[i:i + 1], None, params, forced=forced[i:i + 1])
        assert torch.equal(result.tokens[i], alone.tokens[0]), i
    mixed = forced.clone()
    mixed[1] = forced_from(source[1:2], (row >= 2)[None])[0]  # another mask: its runs come at other steps
    result = Batches(model).run(classes, None, params, forced=mixed)
    assert result.model_calls > expected_forwards(forced[0])
    assert torch.equal(result.tokens, reference_generate(model, classes, cfg_scale=2.0, top_k=1, forced_tokens=mixed))


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "fixed-slots"])
def test_an_edit_does_not_depend_on_its_co_tenants(kind, graphs):
    """Edit requests share the slots with plain ones, joining at other steps: each edit's tokens are
    those it gets alone (sampled), and greedy edits are the reference loop's."""
    model = tiny_gpt(kind, seed=5, head_std=0.1)
    settings = [dict(cfg_scale=2.0, top_p=0.9), dict(temperature=1.3), dict(cfg_scale=4.0, cfg_interval=3),
                dict(cfg_scale=3.0, cfg_schedule="linear")]
    n = model.config.num_image_tokens
    source = torch.randint(0, 512, (len(settings), n), generator=torch.Generator().manual_seed(9))
    forced = forced_from(source, edit_mask(len(settings), n, seed=6))

    def requests(top_k=50):
        out = slot_requests(kind, settings, top_k=top_k)
        for i in (0, 2):  # two edits among plain requests
            out[i].forced = forced[i]
        return out

    for policy in (lambda: None, lambda: JacobiStep(3), lambda: JacobiStep(3, "3x2")):  # plain, Jacobi, a tree
        crowd = run_staggered(SlotDecoder(model, 3, policy(), cuda_graphs=graphs, kv_bucket=8), requests(),
                              joins=[0, 1, 4, 6])
        for i in (0, 1, 2):
            alone = SlotDecoder(model, 1, policy()).run([requests()[i]])[0]
            assert torch.equal(crowd[i], alone), (policy(), i)
        for i in (0, 2):
            assert torch.equal(crowd[i][forced[i] >= 0], source[i][forced[i] >= 0])
        greedy = run_staggered(SlotDecoder(model, 3, policy(), cuda_graphs=graphs, kv_bucket=8), requests(top_k=1),
                               joins=[0, 1, 4, 6])
        for i, s in enumerate(settings):
            r = requests(top_k=1)[i]
            want = reference_generate(model, r.cond[None], None if r.cond_mask is None else r.cond_mask[None],
                                      top_k=1, forced_tokens=None if r.forced is None else r.forced[None], **s)[0]
            assert torch.equal(greedy[i], want), (policy(), i)


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_forced_tokens_through_captured_graphs(kind, simulated_cuda_graphs):
    """The plain and Jacobi steps captured (simulated CUDA graphs) with edit requests among plain ones:
    greedy tokens are the reference loop's that forces the kept tokens."""
    from test_engine import SLOT_SETTINGS

    model = tiny_gpt(kind, seed=4, image_size=128)
    settings = SLOT_SETTINGS[:3]
    source = torch.randint(0, 512, (3, 64), generator=torch.Generator().manual_seed(3))
    forced = forced_from(source, edit_mask(3, 64, seed=8))
    for policy in (None, JacobiStep(4)):
        requests = slot_requests(kind, settings)
        for i in (1, 2):
            requests[i].forced = forced[i]
        decoder = SlotDecoder(model, 2, policy, cuda_graphs=True, kv_bucket=16)
        decoder._capture_on_device = True
        results = run_staggered(decoder, requests, joins=[0, 3, 20])
        assert decoder.graphs
        for r, s in zip(requests, settings):
            want = reference_generate(model, r.cond[None], None if r.cond_mask is None else r.cond_mask[None],
                                      top_k=1, forced_tokens=None if r.forced is None else r.forced[None], **s)[0]
            assert torch.equal(results[r.tag], want), (policy, r.tag)


@pytest.mark.parametrize("tree", [None, "3x2"])
def test_jacobi_with_forced_tokens_samples_the_exact_conditional(tree):
    """4 tokens of 5 codes, token 1 kept: Jacobi's samples of the other three fit the exact AR
    conditional given the kept token (and not the unconditioned joint), with or without a draft tree."""
    from test_jacobi import chi_square_pvalue, exact_joint, toy_gpt

    model = toy_gpt("c2i")
    cond, params = torch.tensor([3]), SamplingParams(cfg_scale=2.5, temperature=1.2)
    n, vocab = model.config.num_image_tokens, model.config.vocab_size
    kept_at, kept = 1, 2
    joint = exact_joint(model, cond, None, params)  # (V**N,), lexicographic
    seqs = torch.tensor([[(s // vocab ** (n - 1 - i)) % vocab for i in range(n)] for s in range(vocab ** n)])
    # the target: the AR conditionals of the free tokens, the kept one given
    with torch.no_grad():
        logits = model.logits(seqs, cond.expand(seqs.shape[0]))
        uncond, _ = model(seqs, cond.expand(seqs.shape[0]), None, drop_cond=torch.ones(seqs.shape[0], dtype=torch.bool))
        scales = torch.tensor([guidance_scale_at(params, i, n) for i in range(n)])[None, :, None]
        probs = process_logits(guided_logits(logits, uncond, scales), params.temperature).softmax(-1)
    factors = probs.gather(-1, seqs[..., None])[..., 0].double()
    factors[:, kept_at] = (seqs[:, kept_at] == kept).double()
    target = factors.prod(dim=1)
    samples = 6000
    forced = torch.full((samples, n), -1)
    forced[:, kept_at] = kept
    result = argen.engine.jacobi.jacobi_decode(model, cond.expand(samples), None, params, window=3,
                                               generator=torch.Generator().manual_seed(0), max_batch=samples,
                                               forced_tokens=forced, tree=tree)
    assert bool((result.tokens[:, kept_at] == kept).all())
    assert (result.rescued > 0) == (tree is not None)
    assert result.accepted > 0.2 * result.drafted
    assert chi_square_pvalue(result.tokens, target) > 1e-3
    assert chi_square_pvalue(result.tokens, joint) < 1e-6  # the test can fail: the unedited joint is rejected


def test_bad_forced_tokens():
    model = tiny_gpt("c2i")
    with pytest.raises(ArgenError, match="forced tokens"):
        argen.generate(model, torch.tensor([1, 2]), forced_tokens=torch.full((2, 5), -1))
    with pytest.raises(ArgenError, match="forced tokens"):
        argen.generate(model, torch.tensor([1]), forced_tokens=torch.full((1, 16), 512))
    with pytest.raises(ArgenError, match="forced tokens"):
        SlotDecoder(model, 1).admit([SlotRequest(torch.tensor(1), forced=torch.zeros(3, dtype=torch.long))])
    assert JacobiSlotDecoder  # the earlier name still builds the Jacobi decoder
