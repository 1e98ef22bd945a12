"""Generate an ADM-format evaluation batch: N images, resumable shard by shard, deterministic per image.

Contract:
- Image i (0 <= i < N) has condition `i % C` (c2i, class-balanced: N/C images per class when C divides N)
  or caption row `i % B` of the feature file (t2i).
- Images are cut into shards of `shard_size` consecutive indices and, inside a shard, into batches of
  `batch_size` starting at the shard's first index. Each batch samples with its own generator seeded from
  (seed, index of its first image), so the images depend on the config only, never on the number of
  processes: shard s belongs to rank s % world_size, and any rank layout produces the same files.
- Each finished shard is written atomically to `OUT/shards/shard_XXXXX.npz` (`images` uint8 (n, E, E, 3),
  `labels`); existing valid shards are skipped, so a killed run resumes where it stopped. `OUT/config.json`
  pins the config: resuming with a different one is an error.
- Decoded images (float in [-1, 1]) are resized to `eval_size` before quantisation to uint8 with
  `resize` = "bicubic-antialias" (default: bicubic with an antialiasing prefilter, torch
  `interpolate(..., antialias=True)`) or "bicubic" (plain bicubic, what LlamaGen's sampling script does).
- Rank 0 waits for all shards, then streams them into `OUT/samples.npz`: `arr_0` uint8 (N, E, E, 3) and
  `arr_1` int64 labels (c2i) or `prompt_index` (t2i).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from argen.engine import generate
from argen.evaluation.npz import NpzImageWriter
from argen.models.gpt import GPT
from argen.models.tokenizer import VQModel
from argen.utils.errors import ArgenError
from argen.utils.images import save_png, to_uint8
from argen.utils.io import atomic_write, atomic_write_json

RESIZE_MODES = ("bicubic-antialias", "bicubic")


@dataclass
class SampleBatchConfig:
    num_samples: int = 50000
    num_classes: int | None = None
    cfg_scale: float = 1.0
    cfg_interval: int = -1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32
    shard_size: int = 1000
    eval_size: int | None = 256
    resize: str = "bicubic-antialias"
    png: bool = False

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ArgenError("--num-samples must be >= 1")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ArgenError("--batch-size and --shard-size must be >= 1")
        if self.resize not in RESIZE_MODES:
            raise ArgenError(f"unknown resize mode {self.resize!r}; use one of {', '.join(RESIZE_MODES)}")
        if self.eval_size is not None and self.eval_size < 8:
            raise ArgenError("--eval-size must be >= 8 (or 0 to keep the generated size)")

    def identity(self) -> dict:
        """The fields that decide the images (png output does not)."""
        data = asdict(self)
        data.pop("png")
        return data


def batch_seed(seed: int, first_index: int) -> int:
    """A 63-bit seed for the batch starting at image `first_index`, independent of rank and world size."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, first_index]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


def class_labels(num_samples: int, num_classes: int) -> np.ndarray:
    return np.arange(num_samples, dtype=np.int64) % num_classes


def resize_images(images: torch.Tensor, size: int | None, mode: str) -> torch.Tensor:
    """(B, 3, H, W) float -> (B, 3, size, size) float."""
    if size is None or images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False,
                         antialias=mode == "bicubic-antialias")


def shard_path(out: Path, shard: int) -> Path:
    return out / "shards" / f"shard_{shard:05d}.npz"


def _shard_done(path: Path, count: int, size: int) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path) as data:
            return data["images"].shape == (count, size, size, 3)
    except (OSError, KeyError, ValueError):
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


@torch.no_grad()
def sample_batch(tokenizer: VQModel, gpt: GPT, config: SampleBatchConfig, out: str | Path,
                 features: torch.Tensor | None = None, mask: torch.Tensor | None = None, rank: int = 0,
                 world_size: int = 1, checkpoint_info: dict | None = None, progress: bool = True,
                 assemble: bool = True, wait_timeout: float = 7 * 24 * 3600.0) -> Path | None:
    """Generate this rank's shards; rank 0 then assembles `OUT/samples.npz` (returned; None elsewhere)."""
    config.validate()
    out = Path(out)
    kind = gpt.config.kind
    device = gpt.tok_embeddings.weight.device
    n = config.num_samples
    grid = gpt.config.grid_size
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
              "checkpoints": checkpoint_info or {}}
    if kind == "t2i":  # the captions are part of what the samples are
        record["features_sha256"] = _features_sha256(features, mask)
    out.mkdir(parents=True, exist_ok=True)
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
    sampling = dict(cfg_scale=config.cfg_scale, cfg_interval=config.cfg_interval, temperature=config.temperature,
                    top_k=config.top_k, top_p=config.top_p)
    for s in todo:
        lo, hi = shard_range(s)
        chunks = []
        for start in range(lo, hi, config.batch_size):
            stop = min(hi, start + config.batch_size)
            idx = torch.from_numpy(labels[start:stop])
            if kind == "c2i":
                cond, cond_mask = idx.to(device), None
            else:
                cond = features[idx].to(device)
                cond_mask = None if mask is None else mask[idx].to(device)
            generator = torch.Generator(device=device).manual_seed(batch_seed(config.seed, start))
            codes = generate(gpt, cond, cond_mask, generator=generator, **sampling)  # (b, N)
            images = tokenizer.decode(codes.view(-1, grid, grid))  # (b, 3, H, W) in [-1, 1]
            chunk = to_uint8(resize_images(images, size, config.resize))  # (b, E, E, 3)
            if config.png:
                for offset, image in enumerate(chunk):
                    save_png(image, out / "png" / f"{start + offset:06d}.png")
            chunks.append(chunk)
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
    writer = NpzImageWriter(out / "samples.npz", (num_samples, size, size, 3))
    labels = []
    for s in tqdm(range(num_shards), desc="assembling samples.npz", unit="shard", disable=not progress):
        with np.load(shard_path(out, s)) as data:
            writer.write(data["images"])
            labels.append(data["labels"])
    key = "arr_1" if kind == "c2i" else "prompt_index"
    return writer.close({key: np.concatenate(labels).astype(np.int64)})
