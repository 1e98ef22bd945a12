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
- Tar shards (`argen.data.shards.ShardDataset`) are streamed: code shard s holds tar shard s's usable
  samples in tar order (the `shard_size` argument is not used), so the output does not depend on the
  number of ranks or DataLoader workers (`split_shards` divides the tars between them). A bad member is
  skipped and counted; a bad tar stops the job with a message naming it, or, with `skip_bad_shards`, is
  written as an empty shard and listed under `skipped_shards` in index.json (from `skipped-XXXXX.json`
  markers). The metadata records `shards_sha256`, `num_shards` and the caption/label key; for c2i,
  index.json's `num_classes` is the largest class id + 1. For t2i, labels are caption rows of the
  `--text-features` made from the same shards (checked by the shard-list hash and per-shard caption
  counts).
- `extract_text_features(encoder, dataset, out_dir, ...)` (behind `argen extract-text-features`): every
  caption in dataset order -> `save_text_features`. For tar shards it is resumable and rank-aware like
  `extract_codes`: each shard's features go to `out/parts/` (`features-XXXXX.npy`, `lengths-XXXXX.npy`,
  then `part-XXXXX.json` with its keys, texts and writing rank, which marks it done); rank 0 merges them into the
  usual files, whose meta.json lists per shard its name, samples, captions and first row (`shards`)
  and `shards_sha256`; a rerun with other shards, caption key or encoder is refused. A sample without
  a caption is counted as a bad record. Other datasets are encoded in one go, as before.
- A `--filter` on the shards (`ShardDataset.filter`) is part of both outputs' identity (a rerun with
  another filter is refused, and extract-codes refuses text features made with another filter). Each
  shard's `FilterReport` is kept with the shard (`part-XXXXX.json`; `filter-XXXXX.json` beside code
  shards), so a resumed run reports the whole data; rank 0 logs the total per criterion and records it
  as `filter_report` in meta.json (text features) and index.json (codes).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from argen.data.codes import CodeShardWriter, labels_name
from argen.data.filters import FilterReport
from argen.data.images import BadImage, FailureTracker
from argen.data.shards import ShardDataset, ShardError, split_shards
from argen.data.text_features import (
    FEATURES_FILE,
    META_FILE,
    OFFSETS_FILE,
    TextFeatureStore,
    save_text_features,
)
from argen.data.transforms import crop_variants, to_tensor
from argen.utils.dist_env import process_ranks
from argen.utils.errors import ArgenError
from argen.utils.io import atomic_path, atomic_save_npy, atomic_write_json
from argen.utils.torch_utils import weights_sha256

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
    """(rank, world_size) from the torchrun environment (`argen.utils.dist_env.process_ranks`)."""
    ranks = process_ranks()
    return ranks.rank, ranks.world_size


def _barrier(world_size: int) -> None:
    """Wait for every rank under torchrun (or an initialized process group); a no-op otherwise."""
    if world_size > 1 and torch.distributed.is_available() and (torch.distributed.is_initialized()
                                                                or "MASTER_ADDR" in os.environ):
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")
        torch.distributed.barrier()


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
    if isinstance(dataset, ShardDataset):
        return _extract_shard_codes(model, dataset, out_dir, image_size, ten_crop, flip, crop_range, batch_size,
                                    num_workers, device, text_features, max_bad_fraction, rank, world_size, progress)
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
    _barrier(world_size)
    if rank != 0:
        return None
    missing = [s for s in range(num_shards) if not writer.is_done(s)]
    if missing:
        raise ArgenError(f"shards {missing[:5]} of {out_dir} are not finished; rerun extract-codes")
    index = writer.finalize()
    if tracker.failed:
        log.warning(tracker.skipped_message())
    return index


# ---------------------------------------------------------------------------------------------- tar shards
def _as_is(item):
    return item


def shard_caption_rows(dataset: ShardDataset, text_features: str | Path) -> list[tuple[int, int]]:
    """(first caption row, caption count) of every shard, from text features made from the same shards."""
    meta = TextFeatureStore(text_features).meta
    if meta.get("shards_sha256") != dataset.sha256 or meta.get("caption_key") != dataset.caption_key:
        raise ArgenError(f"the text features in {text_features} were not made from these shards with caption key "
                         f"{dataset.caption_key!r}; run `argen extract-text-features` with the same --data as "
                         f"extract-codes")
    if meta.get("filter") != dataset.filter_text:
        raise ArgenError(f"the text features in {text_features} were made with --filter {meta.get('filter')!r}, "
                         f"not {dataset.filter_text!r}; give extract-codes and extract-text-features the same "
                         f"--filter")
    return [(int(row["start"]), int(row["captions"])) for row in meta["shards"]]


class ShardVariants(torch.utils.data.IterableDataset):
    """Streams the crop variants of some tar shards; each DataLoader worker takes its share of `shards`.

    Yields ("batch", shard, variants (n, A, 3, S, S) or None, labels, failures) for up to `batch_size`
    consecutive samples, then ("end", shard, {"samples", "captions", "filter"}, None) ("filter": the
    shard's filter report dict or None), or ("end", shard, None, message) for a bad tar."""

    def __init__(self, dataset: ShardDataset, shards: list[int], batch_size: int, image_size: int, ten_crop: bool,
                 flip: bool, crop_range: float, caption_rows: list[tuple[int, int]] | None):
        self.dataset, self.shards, self.batch_size = dataset, shards, batch_size
        self.image_size, self.ten_crop, self.flip, self.crop_range = image_size, ten_crop, flip, crop_range
        self.caption_rows = caption_rows

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in self.shards[worker::workers]:
            yield from self._shard(shard)

    def _shard(self, shard: int):
        data = self.dataset
        row = self.caption_rows[shard][0] if self.caption_rows is not None else 0
        first, samples, items = row, 0, []
        report = data.new_filter_report()
        try:
            for sample in data.iter_shard(shard, report=report):
                samples += 1
                label = sample.label if self.caption_rows is None else row
                row += len(sample.captions)
                reason = data.problem(sample)
                if reason is None:
                    try:
                        crops, _ = crop_variants(data.decode(sample), self.image_size, self.ten_crop, self.flip,
                                                 self.crop_range)
                        items.append((torch.stack([to_tensor(c) for c in crops]), label))
                    except BadImage as exc:
                        reason = str(exc)
                if reason is not None:
                    items.append((None, (data.sample_source(sample), reason)))
                if len(items) == self.batch_size:
                    yield self._batch(shard, items)
                    items = []
            if items:
                yield self._batch(shard, items)
        except ShardError as exc:
            yield "end", shard, None, str(exc)
            return
        yield "end", shard, {"samples": samples, "captions": row - first,
                             "filter": report.to_dict() if report else None}, None

    @staticmethod
    def _batch(shard: int, items):
        good = [it for it in items if it[0] is not None]
        failures = [it[1] for it in items if it[0] is None]
        images = torch.stack([it[0] for it in good]) if good else None  # (n, A, 3, S, S)
        return "batch", shard, images, [it[1] for it in good], failures


def _skip_marker(out_dir: Path, shard: int) -> Path:
    return out_dir / f"skipped-{shard:05d}.json"


def _filter_marker(out_dir: Path, shard: int) -> Path:
    return out_dir / f"filter-{shard:05d}.json"


def total_filter_report(dataset: ShardDataset, reports) -> dict | None:
    """Add up per-shard report dicts (None entries are skipped shards) and log the total per criterion."""
    if dataset.filter is None:
        return None
    total = FilterReport(dataset.filter)
    for report in reports:
        total.merge(report)
    for line in total.lines():
        log.info(line)
    return total.to_dict()


def _extract_shard_codes(model, dataset: ShardDataset, out_dir, image_size, ten_crop, flip, crop_range, batch_size,
                         num_workers, device, text_features, max_bad_fraction, rank, world_size, progress):
    out_dir = Path(out_dir)
    kind, caption_rows, text_rel = dataset.kind, None, None
    if kind == "t2i":
        if not text_features:
            raise ArgenError("text-to-image shards need --text-features DIR (from `argen extract-text-features` on "
                             "the same --data) so that labels can point at caption features")
        caption_rows = shard_caption_rows(dataset, text_features)
        text_rel = os.path.relpath(Path(text_features).resolve(), out_dir.resolve())
    names = aug_names(ten_crop, flip)
    grid = image_size // model.downsample
    meta = {"kind": kind, "tokenizer": model.config.to_dict(), "codebook_size": model.config.codebook_size,
            "grid": [grid, grid], "image_size": image_size, "num_augs": len(names), "aug_names": names,
            "num_classes": None, "class_names": None, "text_features": text_rel,
            "crop_range": crop_range if ten_crop else None, "source": dataset.location, "split": dataset.split,
            "num_images": None, "shard_size": None, "tokenizer_sha256": weights_sha256(model),
            "shards_sha256": dataset.sha256, "num_shards": len(dataset.shards),
            "caption_key": dataset.caption_key if kind == "t2i" else None,
            "label_key": dataset.label_key if kind == "c2i" else None, "filter": dataset.filter_text}
    writer = CodeShardWriter(out_dir, meta)
    model = model.eval().to(device)
    mine = [s for s in split_shards(len(dataset.shards), rank, world_size) if not writer.is_done(s)]
    tracker = FailureTracker(max_bad_fraction, min_count=100)
    stream = ShardVariants(dataset, mine, batch_size, image_size, ten_crop, flip, crop_range, caption_rows)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, collate_fn=_as_is,
                                         num_workers=min(num_workers, len(mine)))
    bar = tqdm(desc=f"extract-codes[{rank}]", unit="img", disable=not progress)
    pending: dict[int, tuple[list, list]] = {}
    for item in loader:
        if item[0] == "batch":
            _, shard, images, batch_labels, failures = item
            bar.update(len(failures))
            codes_parts, label_parts = pending.setdefault(shard, ([], []))
            if tracker.record(images, failures):
                n, a = images.shape[:2]
                codes = model.encode(images.flatten(0, 1).to(device))  # (n*A, h, w)
                codes_parts.append(codes.view(n, a, grid, grid).cpu())
                label_parts.extend(batch_labels)
                bar.update(n)
            continue
        _, shard, counts, error = item
        codes_parts, label_parts = pending.pop(shard, ([], []))
        if error is not None:
            if not dataset.skip_bad_shards:
                raise ShardError(error)
            log.warning("skipping shard %s: %s", dataset.shards[shard], error)
            atomic_write_json(_skip_marker(out_dir, shard), {"shard": dataset.names[shard], "reason": error})
            codes_parts, label_parts = [], []
        elif caption_rows is not None and counts["captions"] != caption_rows[shard][1]:
            raise ArgenError(f"shard {dataset.shards[shard]} has {counts['captions']} captions but the text "
                             f"features list {caption_rows[shard][1]}; extract the text features again")
        elif counts["filter"] is not None:
            atomic_write_json(_filter_marker(out_dir, shard), counts["filter"])
        codes = torch.cat(codes_parts) if codes_parts else torch.zeros(0, len(names), grid, grid, dtype=torch.long)
        writer.write_shard(shard, codes, torch.tensor(label_parts, dtype=torch.long))
        log.info("rank %d wrote code shard %d from %s (%d images)", rank, shard, dataset.names[shard], len(codes))
    bar.close()
    tracker.check(final=True)
    _barrier(world_size)
    if rank != 0:
        return None
    missing = [s for s in range(len(dataset.shards)) if not writer.is_done(s)]
    if missing:
        raise ArgenError(f"shards {missing[:5]} of {out_dir} are not finished; rerun extract-codes")
    index = writer.finalize()
    index["skipped_shards"] = [{"index": s, **json.loads(_skip_marker(out_dir, s).read_text())}
                               for s in range(len(dataset.shards)) if _skip_marker(out_dir, s).is_file()]
    if kind == "c2i":
        tops = [int(labels.max()) for s in range(len(dataset.shards))
                if (labels := np.load(out_dir / labels_name(s), mmap_mode="r")).size]
        index["num_classes"] = max(tops) + 1 if tops else None
    if dataset.filter is not None:
        index["filter_report"] = total_filter_report(
            dataset, [json.loads(p.read_text()) for s in range(len(dataset.shards))
                      if (p := _filter_marker(out_dir, s)).is_file()])
    atomic_write_json(out_dir / "index.json", index)
    if tracker.failed:
        log.warning(tracker.skipped_message())
    return index


# ---------------------------------------------------------------------------------------------- text features
PARTS_DIR = "parts"


def extract_text_features(encoder, dataset, out_dir: str | Path, batch_size: int = 64, progress: bool = True,
                          max_bad_fraction: float = 0.05, rank: int | None = None,
                          world_size: int | None = None) -> dict | None:
    """Encode every caption of `dataset` into `out_dir` (see the module docstring); returns a summary
    ({"captions", "images", "dim", "encoder"}) on rank 0, None on other ranks."""
    if isinstance(dataset, ShardDataset):
        return _shard_text_features(encoder, dataset, Path(out_dir), batch_size, progress, max_bad_fraction,
                                    rank, world_size)
    texts, ids = [], []
    for i in range(len(dataset)):
        for caption in dataset.captions(i):
            texts.append(caption)
            ids.append(i)
    features = []
    bar = tqdm(total=len(texts), desc="extract-text-features", unit="caption", disable=not progress)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        features.extend(encoder.encode_unpadded(chunk))
        bar.update(len(chunk))
    bar.close()
    save_text_features(out_dir, features, encoder=encoder.name, max_length=encoder.max_length, ids=ids, texts=texts)
    return {"captions": len(texts), "images": len(dataset), "dim": encoder.dim, "encoder": encoder.name}


def _part(out_dir: Path, what: str, shard: int) -> Path:
    suffix = "json" if what == "part" else "npy"
    return out_dir / PARTS_DIR / f"{what}-{shard:05d}.{suffix}"


def _shard_text_features(encoder, dataset: ShardDataset, out_dir: Path, batch_size, progress, max_bad_fraction,
                         rank, world_size):
    env_rank, env_world = dist_env()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    identity = {"source": dataset.location, "shards_sha256": dataset.sha256, "num_shards": len(dataset.shards),
                "caption_key": dataset.caption_key, "encoder": encoder.name, "max_length": encoder.max_length,
                "dim": encoder.dim, "filter": dataset.filter_text}
    identity_file = out_dir / PARTS_DIR / "identity.json"
    if identity_file.is_file():
        old = json.loads(identity_file.read_text())
        diff = [k for k in identity if old.get(k) != identity[k] and (k in old or identity[k] is not None)]
        if diff:
            raise ArgenError(f"{out_dir} already holds text features made with different settings ({', '.join(diff)}); "
                             f"choose another output directory or delete it")
    elif (out_dir / META_FILE).is_file():
        raise ArgenError(f"{out_dir} already holds text features of other data; choose another output directory "
                         f"or delete it")
    else:
        atomic_write_json(identity_file, identity)
    n = len(dataset.shards)
    mine = [s for s in split_shards(n, rank, world_size) if not _part(out_dir, "part", s).is_file()]
    tracker = FailureTracker(max_bad_fraction, min_count=100, what="captions")
    bar = tqdm(desc=f"extract-text-features[{rank}]", unit="caption", disable=not progress)
    for shard in mine:
        texts, keys, samples, error = [], [], 0, None
        report = dataset.new_filter_report()
        try:
            for sample in dataset.iter_shard(shard, images=False, report=report):
                samples += 1
                if sample.captions:
                    texts.extend(sample.captions)
                    keys.extend([sample.key] * len(sample.captions))
                    tracker.ok()
                else:
                    tracker.fail(dataset.sample_source(sample), dataset.caption_problem(sample))
        except ShardError as exc:
            if not dataset.skip_bad_shards:
                raise
            log.warning("skipping shard %s: %s", dataset.shards[shard], exc)
            texts, keys, samples, error, report = [], [], 0, str(exc), None
        features = []
        for start in range(0, len(texts), batch_size):
            features.extend(encoder.encode_unpadded(texts[start:start + batch_size]))
            bar.update(len(texts[start:start + batch_size]))
        lengths = np.array([f.shape[0] for f in features], dtype=np.int64)
        flat = (torch.cat(features).numpy().astype(np.float16) if features
                else np.zeros((0, encoder.dim), np.float16))  # (tokens, D)
        atomic_save_npy(_part(out_dir, "features", shard), flat)
        atomic_save_npy(_part(out_dir, "lengths", shard), lengths)
        atomic_write_json(_part(out_dir, "part", shard), {"shard": dataset.names[shard], "samples": samples,
                                                          "captions": len(texts), "keys": keys, "texts": texts,
                                                          "skipped": error, "rank": rank,
                                                          "filter": report.to_dict() if report else None})
        log.info("rank %d wrote text-feature part %d from %s (%d captions)", rank, shard, dataset.names[shard],
                 len(texts))
    bar.close()
    tracker.check(final=True)
    _barrier(world_size)
    if rank != 0:
        return None
    missing = [s for s in range(n) if not _part(out_dir, "part", s).is_file()]
    if missing:
        raise ArgenError(f"shards {missing[:5]} of {out_dir} are not finished; rerun extract-text-features")
    parts = [json.loads(_part(out_dir, "part", s).read_text()) for s in range(n)]
    filter_report = total_filter_report(dataset, [p.get("filter") for p in parts])
    meta_file = out_dir / META_FILE
    if not meta_file.is_file() or "shards_sha256" not in json.loads(meta_file.read_text()):
        _merge_parts(out_dir, parts, identity, filter_report)
    for s in range(n):
        _part(out_dir, "features", s).unlink(missing_ok=True)
        _part(out_dir, "lengths", s).unlink(missing_ok=True)
    return {"captions": sum(p["captions"] for p in parts), "images": sum(p["samples"] for p in parts),
            "dim": encoder.dim, "encoder": encoder.name, "shards": n,
            "skipped_shards": sum(1 for p in parts if p["skipped"]),
            **({"filter": {k: filter_report[k] for k in ("filter", "seen", "kept", "dropped")}} if filter_report
               else {})}


def _merge_parts(out_dir: Path, parts: list[dict], identity: dict, filter_report: dict | None) -> None:
    """Concatenate the per-shard parts into features.npy / offsets.npy / meta.json (meta last)."""
    (out_dir / META_FILE).unlink(missing_ok=True)
    lengths = [np.load(_part(out_dir, "lengths", s)) for s in range(len(parts))]
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
    total, dim = int(offsets[-1]), identity["dim"]
    if len(offsets) == 1:
        raise ArgenError(f"the shards of {identity['source']} hold no captions")
    with atomic_path(out_dir / FEATURES_FILE, size=total * dim * 2 + 128) as tmp:
        flat = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(total, dim))  # (tokens, D)
        row = 0
        for s in range(len(parts)):
            block = np.load(_part(out_dir, "features", s), mmap_mode="r")
            flat[row:row + len(block)] = block
            row += len(block)
        flat.flush()
        del flat
    atomic_save_npy(out_dir / OFFSETS_FILE, offsets)
    starts = np.concatenate([[0], np.cumsum([p["captions"] for p in parts])]).tolist()
    meta = {"count": len(offsets) - 1, "dim": dim, "dtype": "float16", "encoder": identity["encoder"],
            "max_length": identity["max_length"], "total_tokens": total, "source": identity["source"],
            "shards_sha256": identity["shards_sha256"], "caption_key": identity["caption_key"],
            "filter": identity["filter"], "filter_report": filter_report,
            "shards": [{"name": p["shard"], "samples": p["samples"], "captions": p["captions"], "start": int(start),
                        "skipped": p["skipped"]} for p, start in zip(parts, starts)]}
    atomic_write_json(out_dir / META_FILE, meta)
