"""FID / IS / precision-recall against independent float64 numpy/scipy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax
from scipy.stats import entropy

from argen.evaluation import feature_statistics, frechet_distance, inception_score, precision_recall
from argen.evaluation.fid import RunningCovariance, rebatch
from argen.evaluation.metrics import _sqrtm, manifold_radii
from argen.utils.errors import ArgenError


def fid_by_eigh(mu1, s1, mu2, s2) -> float:
    """tr sqrt(S1 S2) = sum sqrt(eig(R S2 R)), R = S1^(1/2) from a symmetric eigendecomposition."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root @ s2 @ root)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def stats(rng, n, d, scale=1.0, shift=0.0):
    x = rng.standard_normal((n, d)) * scale + shift
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("n,d", [(400, 32), (60, 48), (30, 64), (8, 120)])
def test_fid_matches_independent_computation(n, d):
    rng = np.random.default_rng(n * 1000 + d)
    mu1, s1 = stats(rng, n, d)
    mu2, s2 = stats(rng, n + 3, d, scale=1.4, shift=0.3)
    want = fid_by_eigh(mu1, s1, mu2, s2)
    for method in ("sqrtm", "eigh"):
        got = frechet_distance(mu1, s1, mu2, s2, method=method)
        assert isinstance(got, float)
        assert abs(got - want) / want <= 1e-6, method


def test_eigh_method_matches_nonsymmetric_eigenvalues():
    rng = np.random.default_rng(11)
    mu1, s1 = stats(rng, 300, 20)
    mu2, s2 = stats(rng, 300, 20, scale=0.7)
    trace_root = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()  # eigenvalues of S1 S2 are real, >= 0
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_root
    assert abs(frechet_distance(mu1, s1, mu2, s2, method="eigh") - want) / want <= 1e-9
    with pytest.raises(ArgenError, match="negative eigenvalue"):
        frechet_distance(mu1, -s1, mu2, s2, method="eigh")
    with pytest.raises(ArgenError, match="unknown FID method"):
        frechet_distance(mu1, s1, mu2, s2, method="svd")


def test_fid_offset_for_singular_product_matches_offset_reference(monkeypatch):
    import argen.evaluation.metrics as metrics

    mpmath = pytest.importorskip("mpmath")
    u = np.array([1.0, 0.0, -1.0, -1.0])
    s1, s2 = np.outer(u, u), np.ones((4, 4))
    # ADM adds eps * I when the square root of the singular product is not finite. Whether scipy's sqrtm
    # returns nan here depends on the CPU's LAPACK kernels (finite on an AVX2-only AMD EPYC), so the test
    # makes that first root non-finite itself and checks the offset path on every machine.
    singular = s1 @ s2
    monkeypatch.setattr(metrics, "_sqrtm", lambda m: np.full_like(m, np.nan) if np.array_equal(m, singular)
                        else _sqrtm(m))
    mu1, mu2 = np.zeros(4), np.full(4, 0.5)
    eps = 1e-6
    got = frechet_distance(mu1, s1, mu2, s2, eps=eps)
    # ADM: the offset enters the square root only; the trace terms keep the original covariances.
    with mpmath.workdps(50):  # 50-digit reference: tr sqrt(A B) = sum sqrt(eig(A B)), A, B positive definite
        a = mpmath.matrix((s1 + eps * np.eye(4)).tolist())
        b = mpmath.matrix((s2 + eps * np.eye(4)).tolist())
        trace_root = sum(mpmath.sqrt(mpmath.re(e)) for e in mpmath.eig(a * b, left=False, right=False))
        want = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_root)
    assert np.isfinite(got) and abs(got - want) / want <= 1e-6
    with_offset_traces = fid_by_eigh(mu1, s1 + eps * np.eye(4), mu2, s2 + eps * np.eye(4))
    assert abs(got + 8 * eps - with_offset_traces) / want <= 1e-6
    larger_offset = frechet_distance(mu1, s1, mu2, s2, eps=1e-3)
    assert abs(larger_offset - got) > 1e-4  # eps really enters the result


def test_fid_basic_properties_and_errors():
    rng = np.random.default_rng(0)
    mu, s = stats(rng, 200, 16)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8
    mu2, s2 = stats(rng, 200, 16, shift=1.0)
    assert frechet_distance(mu, s, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu, s), rel=1e-9)
    with pytest.raises(ArgenError, match="imaginary"):
        frechet_distance(np.zeros(3), -np.eye(3), np.zeros(3), np.eye(3))
    with pytest.raises(ArgenError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_running_covariance_matches_numpy_cov():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((103, 7)) * 50 + 1000  # large offset: the shift keeps it exact
    acc = RunningCovariance()
    for chunk in np.array_split(x, 5):
        acc.update(chunk)
    mu, sigma = acc.finalize()
    want_mu, want_sigma = feature_statistics(x)
    np.testing.assert_allclose(mu, want_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-9, atol=1e-9)


def inception_score_reference(logits, splits):
    probs = softmax(logits.astype(np.float64), axis=1)
    scores = []
    size = len(probs) // splits
    for i in range(splits):
        part = probs[i * size:(i + 1) * size]
        marginal = part.mean(axis=0)
        scores.append(np.exp(np.mean([entropy(p, marginal) for p in part])))
    return float(np.mean(scores))


def test_inception_score_matches_scipy_reference():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((200, 30)) * 3
    got = inception_score(logits, splits=10)
    assert abs(got - inception_score_reference(logits, 10)) / got <= 1e-9
    assert inception_score(np.zeros((20, 5)), splits=10) == pytest.approx(1.0)
    confident = np.eye(10)[np.arange(40) % 10] * 60.0  # 4 samples per split, each split sees 4 classes
    assert inception_score(confident, splits=10) == pytest.approx(4.0, rel=1e-6)
    with pytest.raises(ArgenError, match="at least 10"):
        inception_score(logits[:5], splits=10)


def pr_reference(ref, smp, k):
    def sq(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(sq(ref, ref), axis=1)[:, k]
    r_smp = np.sort(sq(smp, smp), axis=1)[:, k]
    d = sq(ref, smp)
    precision = np.mean((d <= r_ref[:, None]).any(axis=0))
    recall = np.mean((d <= r_smp[None, :]).any(axis=1))
    return precision, recall


@pytest.mark.parametrize("block", [2, 7, 10000])
def test_precision_recall_matches_brute_force(block):
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((90, 12))
    smp = rng.standard_normal((70, 12)) * 1.3 + 0.4
    want = pr_reference(ref, smp, 3)
    got64 = precision_recall(ref, smp, k=3, block_size=block, dtype=torch.float64)
    assert got64 == pytest.approx(want, abs=0)
    got32 = precision_recall(ref.astype(np.float32), smp.astype(np.float32), k=3, block_size=block)
    assert abs(got32[0] - want[0]) <= 1 / 70 and abs(got32[1] - want[1]) <= 1 / 90
    assert 0 < want[0] < 1 and 0 < want[1] < 1  # the case is not trivial


def test_precision_recall_extremes_and_errors():
    rng = np.random.default_rng(4)
    ref = rng.standard_normal((40, 6))
    assert precision_recall(ref, ref.copy(), k=3) == (1.0, 1.0)
    far = ref + 1000.0
    assert precision_recall(ref, far, k=3) == (0.0, 0.0)
    radii = manifold_radii(ref, k=3, dtype=torch.float64).numpy()
    d = ((ref[:, None] - ref[None]) ** 2).sum(-1)
    np.testing.assert_allclose(radii, np.sort(d, axis=1)[:, 3], rtol=1e-10)
    with pytest.raises(ArgenError, match="more than 3"):
        precision_recall(ref[:3], ref, k=3)
    with pytest.raises(ArgenError, match="same width"):
        precision_recall(ref, ref[:, :5], k=3)


def test_rebatch_regroups_and_validates():
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8), rng.integers(0, 256, (4, 4, 4, 3), dtype=np.uint8),
              rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)]  # the last one is a single HWC image
    batches = list(rebatch(images, 5))
    assert [b.shape[0] for b in batches] == [5, 3]
    want = np.concatenate([images[0], images[1], images[2][None]])
    assert np.array_equal(np.concatenate([np.asarray(b) for b in batches]), want)
    with pytest.raises(ArgenError, match="uint8"):
        list(rebatch([np.zeros((2, 4, 4, 3), np.float32)], 2))
    with pytest.raises(ArgenError, match="NCHW"):
        list(rebatch([np.zeros((2, 3, 4, 4), np.uint8)], 2))
    with pytest.raises(ArgenError, match="one size"):
        list(rebatch([np.zeros((2, 4, 4, 3), np.uint8), np.zeros((2, 5, 5, 3), np.uint8)], 2))
