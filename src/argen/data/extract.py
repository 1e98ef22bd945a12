"""Images -> code shards for generator training (the engine behind `argen extract-codes`).

Contract:
- `extract_codes(model, dataset, out_dir, image_size, ...)` encodes every image of `dataset` in every
  augmented copy of `argen.data.transforms.crop_variants` (center crop, or 5 crops of a
  `crop_range`-times larger center crop with `ten_crop`; times {no flip, flip} with `flip`) and writes
  them through `argen.data.codes.CodeShardWriter`: shard s holds images [s * shard_size, (s+1) * shard_size)
  minus any image that failed to load; codes (n, A, h, w), labels (n,) (class ids for c2i; for t2i the
  feature row of the image's first caption, i.e. `dataset.caption_offsets[i]`).
- Resumable and idempotent: finished shards are skipped, so a rerun after a crash completes the job and a
  rerun of a finished job rewrites nothing. `index.json` is written at the end (by rank 0).
- Multi-process: shard s is done by rank s % world_size (`RANK`/`WORLD_SIZE` from torchrun); under torchrun
  (or an initialized process group) a barrier precedes rank 0's `finalize()`, which fails clearly if any
  shard is still missing.
- Returns the finalized index (rank 0) or None (other ranks).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from argen.data.codes import CodeShardWriter
from argen.data.images import BadImage, FailureTracker
from argen.data.text_features import TextFeatureStore
from argen.data.transforms import crop_variants, to_tensor
from argen.utils.errors import ArgenError

log = logging.getLogger("argen.data")


def aug_names(ten_crop: bool, flip: bool) -> list[str]:
    from PIL import Image

    return crop_variants(Image.new("RGB", (8, 8)), 4, ten_crop, flip, 1.5)[1]


class VariantDataset(torch.utils.data.Dataset):
    """Index i -> (variants (A, 3, S, S), i, label) or (None, i, source, reason) for a bad image."""

    def __init__(self, dataset, image_size: int, ten_crop: bool, flip: bool, crop_range: float, labels):
        self.dataset, self.image_size = dataset, image_size
        self.ten_crop, self.flip, self.crop_range = ten_crop, flip, crop_range
        self.labels = labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            image = self.dataset.load(i)
        except BadImage as exc:
            return None, i, self.dataset.source(i), str(exc)
        crops, _ = crop_variants(image, self.image_size, self.ten_crop, self.flip, self.crop_range)
        return torch.stack([to_tensor(c) for c in crops]), i, int(self.labels[i]), None


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's state dict (names, shapes, dtypes, bytes): which weights made the codes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def check_caption_rows(dataset, text_features: str | Path) -> None:
    """t2i labels are caption rows of `text_features`: refuse features made from other captions
    (e.g. another --split of the same manifest), which would pair images with the wrong captions."""
    store = TextFeatureStore(text_features)
    captions = [c for i in range(len(dataset)) for c in dataset.captions(i)]
    texts = store.meta.get("texts")
    if (texts is not None and texts != captions) or len(store) != len(captions):
        raise ArgenError(f"the text features in {text_features} were made from other captions than this dataset's "
                         f"{len(captions)} (they hold {len(store)}); run `argen extract-text-features` with the same "
                         f"--data and --split as extract-codes")


def _collate(items):
    good = [it for it in items if it[0] is not None]
    failures = [(it[2], it[3]) for it in items if it[0] is None]
    if not good:
        return None, [], [], failures
    return torch.stack([it[0] for it in good]), [it[1] for it in good], [it[2] for it in good], failures


def dist_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@torch.no_grad()
def extract_codes(model, dataset, out_dir: str | Path, image_size: int, ten_crop: bool = False, flip: bool = False,
                  crop_range: float = 1.1, shard_size: int = 1024, batch_size: int = 64, num_workers: int = 0,
                  device: torch.device | str = "cpu", text_features: str | None = None,
                  max_bad_fraction: float = 0.05, rank: int | None = None, world_size: int | None = None,
                  progress: bool = True) -> dict | None:
    env_rank, env_world = dist_env()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if image_size % model.downsample:
        raise ArgenError(f"--image-size {image_size} is not a multiple of the tokenizer's downsample "
                         f"{model.downsample}")
    if ten_crop and int(image_size * crop_range) < image_size:
        raise ArgenError("--crop-range must be >= 1")
    if len(dataset) == 0:
        raise ArgenError("the dataset has no images")
    kind = dataset.kind
    if kind == "t2i":
        if not text_features:
            raise ArgenError("a JSONL (text-to-image) dataset needs --text-features DIR (from "
                             "`argen extract-text-features`) so that labels can point at caption features")
        check_caption_rows(dataset, text_features)
        labels = dataset.caption_offsets[:-1]
        text_rel = os.path.relpath(Path(text_features).resolve(), Path(out_dir).resolve())
    else:
        labels = np.asarray([dataset.label(i) for i in range(len(dataset))], dtype=np.int64)
        text_rel = None
    names = aug_names(ten_crop, flip)
    grid = image_size // model.downsample
    meta = {"kind": kind, "tokenizer": model.config.to_dict(), "codebook_size": model.config.codebook_size,
            "grid": [grid, grid], "image_size": image_size, "num_augs": len(names), "aug_names": names,
            "num_classes": len(dataset.class_names) if dataset.class_names else None,
            "class_names": dataset.class_names, "text_features": text_rel,
            "crop_range": crop_range if ten_crop else None, "source": str(getattr(dataset, "root", "")
                                                                          or getattr(dataset, "manifest", "")
                                                                          or "demo"),
            "split": getattr(dataset, "split", None), "num_images": len(dataset), "shard_size": shard_size,
            "tokenizer_sha256": weights_sha256(model)}
    writer = CodeShardWriter(out_dir, meta)
    model = model.eval().to(device)
    num_shards = math.ceil(len(dataset) / shard_size)
    mine = [s for s in range(num_shards) if s % world_size == rank and not writer.is_done(s)]
    tracker = FailureTracker(max_bad_fraction, min_count=min(100, len(dataset)))
    variants = VariantDataset(dataset, image_size, ten_crop, flip, crop_range, labels)
    total = sum(min(shard_size, len(dataset) - s * shard_size) for s in mine)
    bar = tqdm(total=total, desc=f"extract-codes[{rank}]", unit="img", disable=not progress)
    for shard in mine:
        indices = range(shard * shard_size, min((shard + 1) * shard_size, len(dataset)))
        loader = torch.utils.data.DataLoader(variants, batch_size=batch_size, sampler=indices, collate_fn=_collate,
                                             num_workers=num_workers)
        codes_parts, label_parts = [], []
        for images, _, batch_labels, failures in loader:
            bar.update(len(failures))
            if not tracker.record(images, failures):
                continue
            n, a = images.shape[:2]
            codes = model.encode(images.flatten(0, 1).to(device))  # (n*A, h, w)
            codes_parts.append(codes.view(n, a, grid, grid).cpu())
            label_parts.extend(batch_labels)
            bar.update(n)
        codes = torch.cat(codes_parts) if codes_parts else torch.zeros(0, len(names), grid, grid, dtype=torch.long)
        writer.write_shard(shard, codes, torch.tensor(label_parts, dtype=torch.long))
    bar.close()
    tracker.check(final=True)
    if world_size > 1 and torch.distributed.is_available() and (torch.distributed.is_initialized()
                                                                or "MASTER_ADDR" in os.environ):
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")
        torch.distributed.barrier()
    if rank != 0:
        return None
    missing = [s for s in range(num_shards) if not writer.is_done(s)]
    if missing:
        raise ArgenError(f"shards {missing[:5]} of {out_dir} are not finished; rerun extract-codes")
    index = writer.finalize()
    if tracker.failed:
        log.warning("skipped %d unreadable images: %s", tracker.failed, ", ".join(tracker.skipped[:10]))
    return index
