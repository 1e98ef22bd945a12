"""Generate an ADM-format evaluation batch: N images, resumable shard by shard, deterministic per image.

Contract:
- Image i (0 <= i < N) has condition `i % C` (c2i, class-balanced: N/C images per class when C divides N)
  or caption row `i % B` of the feature file (t2i).
- Image i draws from its own generator seeded with `argen.sampling.image_seed(seed, i)`, the rule of
  `argen sample` and `argen serve` (config.json records it as `seed_rule`), so image i is the image
  `argen sample` makes for the same condition, seed and settings, whatever the batch size, shard size or
  number of processes (exactly so on the CPU in float32). Batches run through
  `argen.evaluation.pipeline.sample_images` (generate -> decode -> resize -> uint8).
- Images are cut into shards of `shard_size` consecutive indices; shard s belongs to rank s % world_size.
  Each finished shard is written atomically to `OUT/shards/shard_XXXXX.npz` (`images` uint8 (n, E, E, 3),
  `labels`); existing valid shards are skipped, so a killed run resumes where it stopped, and an unreadable
  shard (e.g. a truncated file) is named and made again. `OUT/config.json` pins the config (sampling
  settings, seed rule, sizes, checkpoints, caption hash): resuming with a different one is an error, and
  so is resuming a run written before the seed rule was recorded. Each process holds the run-directory
  lock (`argen.utils.io.run_lock`) while it writes.
- `eval_size` None means the generator's image size. Decoded images (float in [-1, 1]) are resized to it
  before quantisation to uint8 with `resize` = "bicubic-antialias" (default: bicubic with an antialiasing
  prefilter, torch `interpolate(..., antialias=True)`) or "bicubic" (plain bicubic, what LlamaGen's
  sampling script does).
- Rank 0 waits for all shards, then streams them into `OUT/samples.npz` (atomically; a full disk is a
  one-line error): `arr_0` uint8 (N, E, E, 3) and `arr_1` int64 labels (c2i) or `prompt_index` (t2i).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from argen.engine.jacobi import check_decode, check_tree
from argen.evaluation.npz import NpzImageWriter
from argen.evaluation.pipeline import RESIZE_MODES, resize_images, sample_images
from argen.models.gpt import GPT
from argen.models.tokenizer import VQModel
from argen.sampling.logits import SamplingParams
from argen.sampling.seeds import image_seed
from argen.utils.errors import ArgenError
from argen.utils.images import save_png
from argen.utils.io import atomic_write, atomic_write_json, disk_full_error, run_lock

SEED_RULE = "image_seed(seed, i) = (seed * 1000003 + i) mod 2**63"  # recorded in config.json
__all__ = ["RESIZE_MODES", "SampleBatchConfig", "assemble_batch", "class_labels", "resize_images", "sample_batch"]


@dataclass
class SampleBatchConfig:
    num_samples: int = 50000
    num_classes: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    batch_size: int = 32
    shard_size: int = 1000
    eval_size: int | None = None
    resize: str = "bicubic-antialias"
    png: bool = False
    decode: str = "ar"  # or "jacobi" (argen.generate's decode), with `window`
    window: int | None = None
    tree: str | None = None  # a Jacobi draft tree's spelling, "KxD[xG]" (argen.engine.draft_tree)

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ArgenError("--num-samples must be >= 1")
        if self.num_classes is not None and self.num_classes < 1:
            raise ArgenError(f"--num-classes must be >= 1 (leave it out for all classes), got {self.num_classes}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ArgenError("--batch-size and --shard-size must be >= 1")
        if not 0 <= self.seed < 1 << 63:
            raise ArgenError(f"--seed must lie in [0, 2**63), got {self.seed}")
        if self.resize not in RESIZE_MODES:
            raise ArgenError(f"unknown resize mode {self.resize!r}; use one of {', '.join(RESIZE_MODES)}")
        if self.eval_size is not None and self.eval_size < 8:
            raise ArgenError("--eval-size must be >= 8 (or 0 to keep the generated size)")
        self.window = check_decode(self.decode, self.window)
        tree = check_tree(self.decode, self.tree)
        self.tree = None if tree is None else str(tree)

    def identity(self) -> dict:
        """The fields that decide the images (png output and the batch size do not)."""
        data = asdict(self)
        data.pop("png")
        data.pop("batch_size")
        if self.decode == "ar":  # Jacobi decoding draws other images for a seed; plain runs keep their identity
            data.pop("decode")
            data.pop("window")
        if self.tree is None:  # runs without a tree keep the identity they had before trees existed
            data.pop("tree")
        return data


def class_labels(num_samples: int, num_classes: int) -> np.ndarray:
    return np.arange(num_samples, dtype=np.int64) % num_classes


def shard_path(out: Path, shard: int) -> Path:
    return out / "shards" / f"shard_{shard:05d}.npz"


def _shard_done(path: Path, count: int, size: int) -> bool:
    """Whether `path` is a finished shard; an unreadable one (e.g. truncated) is named and will be redone."""
    if not path.is_file():
        return False
    try:
        with np.load(path) as data:
            return data["images"].shape == (count, size, size, 3) and data["labels"].shape == (count,)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        tqdm.write(f"argen sample-batch: {path} is unreadable ({type(exc).__name__}: {exc}); making it again",
                   file=sys.stderr)
        return False


def _features_sha256(features: torch.Tensor, mask: torch.Tensor | None) -> str:
    digest = hashlib.sha256()
    for tensor in (features, mask if mask is not None else torch.ones(features.shape[:2])):
        array = np.ascontiguousarray(tensor.detach().cpu().float().numpy())
        digest.update(str(array.shape).encode())
        digest.update(array)
    return digest.hexdigest()


def _write_config(out: Path, record: dict, rank: int) -> None:
    path = out / "config.json"
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            existing = None
        if existing != record:
            raise ArgenError(f"{out} already holds samples of another config ({path}); pass a new --out, or the "
                             f"same flags to resume")
    elif rank == 0:
        atomic_write_json(path, record)


def sample_batch(tokenizer: VQModel, gpt: GPT, config: SampleBatchConfig, out: str | Path,
                 features: torch.Tensor | None = None, mask: torch.Tensor | None = None, rank: int = 0,
                 world_size: int = 1, checkpoint_info: dict | None = None, progress: bool = True,
                 assemble: bool = True, wait_timeout: float = 7 * 24 * 3600.0) -> Path | None:
    """Generate this rank's shards; rank 0 then assembles `OUT/samples.npz` (returned; None elsewhere)."""
    config.validate()
    out = Path(out)
    with run_lock(out, "sample-batch", rank):
        return _sample_batch(tokenizer, gpt, config, out, features, mask, rank, world_size, checkpoint_info or {},
                             progress, assemble, wait_timeout)


def _sample_batch(tokenizer: VQModel, gpt: GPT, config: SampleBatchConfig, out: Path, features, mask, rank: int,
                  world_size: int, checkpoint_info: dict, progress: bool, assemble: bool,
                  wait_timeout: float) -> Path | None:
    kind = gpt.config.kind
    n = config.num_samples
    if kind == "c2i":
        num_classes = config.num_classes or gpt.config.num_classes
        if not 1 <= num_classes <= gpt.config.num_classes:
            raise ArgenError(f"--num-classes must lie in [1, {gpt.config.num_classes}] for this generator")
        config.num_classes = num_classes
        labels = class_labels(n, num_classes)
    else:
        if features is None:
            raise ArgenError("this is a text-conditional generator: pass --features FILE.npz")
        gpt.check_condition(features[:1], None if mask is None else mask[:1])
        labels = np.arange(n, dtype=np.int64) % features.shape[0]
    size = config.eval_size or gpt.config.image_size
    record = {"config": config.identity(), "kind": kind, "image_size": gpt.config.image_size,
              "seed_rule": SEED_RULE, "checkpoints": checkpoint_info}
    if kind == "t2i":  # the captions are part of what the samples are
        record["features_sha256"] = _features_sha256(features, mask)
    _write_config(out, record, rank)

    num_shards = -(-n // config.shard_size)
    mine = [s for s in range(num_shards) if s % world_size == rank]

    def shard_range(s: int) -> tuple[int, int]:
        return s * config.shard_size, min(n, (s + 1) * config.shard_size)

    todo = [s for s in mine if not _shard_done(shard_path(out, s), shard_range(s)[1] - shard_range(s)[0], size)]
    total = sum(shard_range(s)[1] - shard_range(s)[0] for s in mine)
    done = total - sum(shard_range(s)[1] - shard_range(s)[0] for s in todo)
    bar = tqdm(total=total, initial=done, desc=f"sample-batch rank {rank}/{world_size}", unit="img",
               disable=not progress or rank != 0, dynamic_ncols=True)
    for s in todo:
        lo, hi = shard_range(s)
        chunks = []
        for start in range(lo, hi, config.batch_size):
            stop = min(hi, start + config.batch_size)
            idx = torch.from_numpy(labels[start:stop])
            cond, cond_mask = (idx, None) if kind == "c2i" else (features[idx], None if mask is None else mask[idx])
            batch = sample_images(tokenizer, gpt, cond, cond_mask, config.sampling,
                                  [image_seed(config.seed, i) for i in range(start, stop)], size=size,
                                  resize=config.resize, decode=config.decode,
                                  window=config.window, tree=config.tree)  # images (b, E, E, 3) uint8
            if config.png:
                for offset, image in enumerate(batch.images):
                    save_png(image, out / "png" / f"{start + offset:06d}.png")
            chunks.append(batch.images)
            bar.update(stop - start)
        shard_images = np.concatenate(chunks)
        shard_labels = labels[lo:hi]

        def write(tmp: Path, images=shard_images, shard_labels=shard_labels, first=lo) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, images=images, labels=shard_labels, first_index=np.int64(first))

        atomic_write(shard_path(out, s), write)
    bar.close()
    if rank != 0 or not assemble:
        return None
    return assemble_batch(out, n, size, config.shard_size, kind, wait_timeout, progress)


def assemble_batch(out: Path, num_samples: int, size: int, shard_size: int, kind: str,
                   wait_timeout: float = 0.0, progress: bool = True) -> Path:
    """Stream all shards into `OUT/samples.npz`, waiting up to `wait_timeout` s for other ranks' shards."""
    num_shards = -(-num_samples // shard_size)
    counts = [min(num_samples, (s + 1) * shard_size) - s * shard_size for s in range(num_shards)]
    deadline = time.monotonic() + wait_timeout
    while True:
        missing = [s for s in range(num_shards) if not _shard_done(shard_path(out, s), counts[s], size)]
        if not missing:
            break
        if time.monotonic() >= deadline:
            raise ArgenError(f"{len(missing)} shard(s) of {out} are missing (e.g. shard {missing[0]}); rerun the same "
                             f"command (any number of processes) to finish them")
        time.sleep(min(10.0, max(0.1, deadline - time.monotonic())))
    path = out / "samples.npz"
    needed = num_samples * (size * size * 3 + 8)  # images + labels, uncompressed
    labels = []
    writer = None
    try:
        writer = NpzImageWriter(path, (num_samples, size, size, 3))
        for s in tqdm(range(num_shards), desc="assembling samples.npz", unit="shard", disable=not progress):
            with np.load(shard_path(out, s)) as data:
                writer.write(data["images"])
                labels.append(data["labels"])
        key = "arr_1" if kind == "c2i" else "prompt_index"
        return writer.close({key: np.concatenate(labels).astype(np.int64)})
    except BaseException as exc:
        if writer is not None:
            writer.abort()
        error = disk_full_error(exc, path, needed=needed) if isinstance(exc, Exception) else None
        if error is not None:
            raise error from exc
        raise
