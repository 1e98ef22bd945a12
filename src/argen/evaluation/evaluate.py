"""`evaluate(ref, samples, inception)`: FID, sFID, IS, precision and recall of an ADM sample batch.

Contract:
- Both files are ADM-format npz batches (`argen.evaluation.npz`); their images must share one size. The
  reference may be the word `demo` (the packaged emoji64 demo set), or a folder of images
  (`argen.evaluation.image_folder`: read with pillow and center-cropped to the samples' size), and may be cut
  to its first `reference_limit` images.
- The reference's precomputed `mu`/`sigma`/`mu_s`/`sigma_s` are used when all four are present (as the
  ADM evaluator does) unless `use_reference_stats=False`; its pool activations are always computed, for
  precision/recall.
- Activations and statistics are cached as `<name>.<sha256[:16]>.<weights id>.stats.npz` (file content
  hash + network id, plus the member and image limit when not the whole `arr_0`), as ADM keeps its
  reference npz: a batch goes through Inception once per network. A reference folder is keyed by the
  listing of its images and the crop size (`ImageFolderBatch.digest`). The cache sits next to each npz or
  folder; for
  `demo`, and for an npz in a folder argen cannot write, it goes to `argen.utils.io.cache_dir()/stats`
  (`$ARGEN_CACHE` or `~/.cache/argen`). A cache that cannot be written or read only costs the recompute.
- Returns the JSON-ready result dict; see `docs/evaluation.md` for its fields.
"""

from __future__ import annotations

import re
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from argen import __version__
from argen.evaluation.fid import Activations, compute_activations
from argen.evaluation.image_folder import ImageFolderBatch
from argen.evaluation.metrics import frechet_distance, inception_score, precision_recall
from argen.evaluation.npz import ImageBatchFile
from argen.models.inception import FIDInception
from argen.utils.errors import ArgenError
from argen.utils.io import atomic_write, cache_dir

PROTOCOL = ("ADM (guided-diffusion evaluator): FID/precision/recall on pool_3 (2048), sFID on mixed_6/conv[..., :7] "
            "(2023), IS from unbiased logits over 10 splits, k-NN manifold k=3; TF1 bilinear resize to 299")
DEMO_FILE = "emoji64.npz"  # the packaged demo set (argen/data/demo), images under the key `images`
RANDOM_WARNING = "RANDOM-WEIGHT INCEPTION: for testing the pipeline only; these numbers are NOT FIDs"



def cache_path(batch_path: Path, digest: str, weights_id: str, key: str = "arr_0", limit: int | None = None,
               folder: Path | None = None) -> Path:
    """The statistics cache of one batch for one network, in `folder` (default: beside the npz)."""
    safe_id = re.sub(r"[^A-Za-z0-9_.-]", "-", weights_id)
    subset = ("" if key == "arr_0" else f".{key}") + ("" if limit is None else f".first{limit}")
    folder = batch_path.parent if folder is None else Path(folder)
    return folder / f"{batch_path.name}{subset}.{digest[:16]}.{safe_id}.stats.npz"


def stats_cache_dir() -> Path:
    """Where statistics go that cannot sit beside their npz (the packaged demo set, read-only folders)."""
    return cache_dir() / "stats"


def demo_reference() -> tuple[Path, str]:
    """(path, key) of the packaged demo set (emoji64.npz, member `images`)."""
    return Path(str(resources.files("argen.data") / "demo" / DEMO_FILE)), "images"


def open_batch(spec: str | Path, name: str, limit: int | None = None,
               size: int | None = None) -> ImageBatchFile | ImageFolderBatch:
    """An npz path, `demo` for the packaged demo images, or (given the samples' `size`) a folder of images."""
    if size is not None and Path(spec).is_dir():
        return ImageFolderBatch(spec, size, name, limit)
    if str(spec) == "demo":
        path, key = demo_reference()
        batch = ImageBatchFile(path, name, key=key, limit=limit)
        batch.cache_folders = [stats_cache_dir()]  # never write statistics into the installed package
        return batch
    return ImageBatchFile(spec, name, limit=limit)


def _load_cache(path: Path) -> Activations | None:
    try:
        with np.load(path) as data:
            return Activations(data["pool"], data["mu"], data["sigma"], data["mu_s"], data["sigma_s"])
    except (OSError, KeyError, ValueError):
        return None


def _save_cache(paths: list[Path], acts: Activations) -> None:
    """Write the cache to the first of `paths` that can be written."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, pool=acts.pool, mu=acts.mu, sigma=acts.sigma, mu_s=acts.mu_s, sigma_s=acts.sigma_s)

    problems = []
    for path in paths:
        try:
            atomic_write(path, write)
            return
        except (OSError, ArgenError) as exc:
            problems.append(f"{path} ({exc})")
    print(f"argen evaluate: note: could not write the statistics cache: {'; '.join(problems)}", file=sys.stderr)


def batch_activations(batch: ImageBatchFile | ImageFolderBatch, inception: FIDInception, batch_size: int,
                      use_cache: bool, label: str, progress: bool = True) -> tuple[Activations, str]:
    """Activations of one npz batch or image folder, from its cache when valid: (activations, 'cache'|'computed')."""
    paths = []
    if use_cache and batch.cacheable:
        digest = batch.digest()
        folders = getattr(batch, "cache_folders", None) or [batch.path.parent, stats_cache_dir()]
        paths = [cache_path(batch.path, digest, inception.weights_id, batch.key, batch.limit, f) for f in folders]
        for path in paths:
            acts = _load_cache(path) if path.is_file() else None
            if acts is not None and acts.count == batch.count:
                return acts, "cache"
    acts = compute_activations(batch.iter_batches(batch_size), inception, batch_size, total=batch.count,
                               desc=label, progress=progress)
    if paths:
        _save_cache(paths, acts)
    return acts, "computed"


def evaluate(ref_path: str | Path, sample_path: str | Path, inception: FIDInception, batch_size: int = 50,
             use_cache: bool = True, k: int = 3, is_splits: int = 10, pr_block_size: int = 10000,
             progress: bool = True, fid_method: str = "sqrtm", reference_limit: int | None = None,
             use_reference_stats: bool = True) -> dict:
    """All metrics of `sample_path` against `ref_path`; see the module docstring."""
    start = time.perf_counter()
    smp = open_batch(sample_path, "sample batch")
    ref = open_batch(ref_path, "reference batch", reference_limit, size=smp.image_size[0])
    if ref.image_size != smp.image_size:
        raise ArgenError(f"the reference images are {ref.image_size[0]}x{ref.image_size[1]} but the samples are "
                               f"{smp.image_size[0]}x{smp.image_size[1]}; resize the samples to the reference size "
                               f"(argen sample-batch --eval-size {ref.image_size[0]})")
    minimum = max(2, k + 1)
    for name, batch in (("reference", ref), ("sample", smp)):
        if batch.count < minimum:
            raise ArgenError(f"the {name} batch {batch.path} has {batch.count} images; FID, precision and "
                                   f"recall (k={k}) need at least {minimum} (50,000 samples for the ImageNet protocol)")
    ref_acts, ref_source = batch_activations(ref, inception, batch_size, use_cache, "reference", progress)
    smp_acts, smp_source = batch_activations(smp, inception, batch_size, use_cache, "samples", progress)
    ref_stats = ref.statistics() if ref.limit is None and use_reference_stats else None
    stats_source = "precomputed in the reference npz" if ref_stats is not None else ref_source
    if ref_stats is None:
        ref_stats = {"mu": ref_acts.mu, "sigma": ref_acts.sigma, "mu_s": ref_acts.mu_s, "sigma_s": ref_acts.sigma_s}
    fid = frechet_distance(ref_stats["mu"], ref_stats["sigma"], smp_acts.mu, smp_acts.sigma, method=fid_method)
    sfid = frechet_distance(ref_stats["mu_s"], ref_stats["sigma_s"], smp_acts.mu_s, smp_acts.sigma_s,
                            method=fid_method)
    device = inception.fc.weight.device
    splits = min(is_splits, smp_acts.count)
    logits = inception.logits_from_pool(torch.from_numpy(smp_acts.pool).to(device)).cpu().numpy()
    isc = inception_score(logits, splits)
    precision, recall = precision_recall(ref_acts.pool, smp_acts.pool, k=k, block_size=pr_block_size, device=device)
    result = {
        "fid": fid,
        "sfid": sfid,
        "inception_score": isc,
        "precision": precision,
        "recall": recall,
        "num_reference": ref.count,
        "num_samples": smp.count,
        "image_size": list(smp.image_size),
        "inception_score_splits": splits,
        "fid_method": fid_method,
        "precision_recall_k": k,
        "protocol": PROTOCOL,
        "reference": str(ref.path),
        "samples": str(smp.path),
        "reference_statistics": stats_source,
        "sample_statistics": smp_source,
        "inception_weights": {
            "id": inception.weights_id,
            "random": bool(inception.is_random),
            "matches_published_sha256_prefix": bool(inception.matches_published),
        },
        "argen_version": __version__,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if inception.is_random:
        result["warning"] = RANDOM_WARNING
    if smp.count < 50000:
        result["note"] = (f"{smp.count} samples: FID is biased upwards below the 50,000 of the ImageNet protocol; "
                          f"compare only numbers computed with the same sample count")
    return result
