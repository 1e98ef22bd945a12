"""Evaluation: ADM-protocol FID / sFID / IS / precision / recall, sample batches and reconstruction metrics.

Public API:
    frechet_distance(mu1, sigma1, mu2, sigma2) -> float
    inception_score(logits, splits=10) -> float
    precision_recall(ref_features, sample_features, k=3) -> (precision, recall)
    feature_statistics(features) -> (mu, sigma)
    compute_statistics(uint8 NHWC image batches, inception) -> (mu, sigma)   # rFID hook
    paired_statistics / reconstruction_fid((originals, reconstructions) batch pairs, inception)
    compute_activations(...) -> Activations
    evaluate(ref_npz, sample_npz, inception) -> result dict
    sample_batch(tokenizer, gpt, SampleBatchConfig, out_dir) -> npz path
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "frechet_distance": "argen.evaluation.metrics",
    "inception_score": "argen.evaluation.metrics",
    "precision_recall": "argen.evaluation.metrics",
    "manifold_radii": "argen.evaluation.metrics",
    "feature_statistics": "argen.evaluation.metrics",
    "compute_statistics": "argen.evaluation.fid",
    "compute_activations": "argen.evaluation.fid",
    "paired_statistics": "argen.evaluation.fid",
    "reconstruction_fid": "argen.evaluation.fid",
    "Activations": "argen.evaluation.fid",
    "evaluate": "argen.evaluation.evaluate",
    "ImageBatchFile": "argen.evaluation.npz",
    "NpzImageWriter": "argen.evaluation.npz",
    "sample_batch": "argen.evaluation.sample_batch",
    "SampleBatchConfig": "argen.evaluation.sample_batch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'argen.evaluation' has no attribute {name!r}")
