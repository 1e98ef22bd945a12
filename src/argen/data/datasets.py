"""Image datasets: the bundled emoji demo set, ImageNet-style class folders and JSONL manifests.

Contract:
- Every dataset has `len()`, `load(i)` -> 8-bit RGB PIL image (raises `BadImage` for a bad record),
  `source(i)` (a path or name for logs), `label(i)` -> int (class id; for manifests the image index),
  `captions(i)` -> list[str], `class_names` (list or None), `kind` ("c2i" or "t2i").
- `open_dataset(spec, split)`: `spec` is "demo", a class-folder path, a `.jsonl` manifest or WebDataset
  tar shards (a brace pattern, a `.tar`, a folder of `.tar` files, a list file or `shards:...`; see
  `argen.data.shards.ShardDataset`, which ignores `split`: point `--data` at the split's shards).
  `sample_filter` (a `--filter` expression, `argen.data.filters`) is for tar shards only; with other
  data it raises `ArgenError`.
  - demo: the emoji npz in `argen/data/demo/`; split "train"/"val"/"all"; classes are the 10 categories
    (`label="category"`) or 99 subcategories; captions from names and short names. `subset(rows)` gives
    a copy with only those rows (or the first `rows`).
  - class folder: `root/<class>/<images>` (classes sorted by name, any depth below a class folder). When
    `root/<split>` is itself a class folder it is used (ImageNet's train/ and val/ layouts); split "all"
    or a root without such a folder uses the root.
  - JSONL: one object per line with an image path (key `image`, `path` or `file`; relative paths are
    relative to the manifest's folder) and `caption` (string) or `captions` (list); optional `split`
    filters records.
- User errors (empty folder, class folder with no images, missing manifest column, bad JSON) raise
  `ArgenError` naming the place to fix.
- `TransformedDataset(dataset, transform, seed)` is a torch map-style dataset over keys (epoch, index):
  the augmentation's generator is seeded with `derive_seed("augment", seed, epoch, index)`
  (`argen.utils.seeds`), so results do not depend on worker
  count or order. A bad record yields `(None, index, source, reason)` instead of crashing; `collate_skip`
  drops those and reports them for a `FailureTracker` in the main process.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from argen.data.images import IMAGE_EXTENSIONS, BadImage, load_image
from argen.data.shards import ShardDataset, is_shard_spec
from argen.utils.errors import ArgenError
from argen.utils.seeds import derive_seed

DEMO_NPZ = "emoji64.npz"
SPLITS = ("train", "val", "all")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ArgenError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


class DemoDataset:
    """The bundled emoji set (64x64 RGB on white, two vendors)."""

    kind = "c2i"

    def __init__(self, split: str = "train", label: str = "category", path: str | Path | None = None):
        _check_split(split)
        if label not in ("category", "subcategory"):
            raise ArgenError(f"demo labels are 'category' or 'subcategory', not {label!r}")
        file = Path(path) if path else self.default_path()
        if not file.is_file():
            raise ArgenError(f"the demo dataset {file} is missing; rebuild it with scripts/build_demo_dataset.py")
        with np.load(file, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        keep = np.ones(len(arrays["images"]), bool) if split == "all" else arrays["split"] == SPLITS.index(split)
        self.split = split
        self.indices = np.nonzero(keep)[0]
        self.images = arrays["images"][keep]  # (N, 64, 64, 3) uint8
        self.labels = arrays[label][keep].astype(np.int64)
        self.class_names = [str(s) for s in arrays[f"{label}_names"]]
        self.vendor = arrays["vendor"][keep]
        self.vendor_names = [str(s) for s in arrays["vendor_names"]]
        self.names = [str(s) for s in arrays["names"][keep]]
        self.short_names = [str(s).split("|") for s in arrays["short_names"][keep]]

    @staticmethod
    def default_path() -> Path:
        """The bundled `emoji64.npz`."""
        return Path(str(resources.files("argen.data") / "demo" / DEMO_NPZ))

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, rows: int | Sequence[int]) -> DemoDataset:
        """A copy holding only `rows` of this split (a count keeps the first rows), every per-image field cut."""
        picked = np.arange(min(rows, len(self))) if isinstance(rows, int) else np.asarray(rows, dtype=np.int64)
        part = copy.copy(self)
        for name in ("indices", "images", "labels", "vendor"):
            setattr(part, name, getattr(self, name)[picked])
        part.names = [self.names[i] for i in picked]
        part.short_names = [self.short_names[i] for i in picked]
        return part

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])

    def source(self, i: int) -> str:
        return f"demo[{self.split}][{i}]"

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def captions(self, i: int) -> list[str]:
        name = self.names[i].lower()
        extra = [s.replace("_", " ").replace("-", " ") for s in self.short_names[i]]
        return [f"an emoji of {name}"] + [f"an emoji of {s}" for s in extra if s != name]


class _ImageFileDataset:
    """Shared part of the datasets whose images are files on disk (`self.paths`)."""

    paths: list[Path]
    min_size: int

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Image.Image:
        return load_image(self.paths[i], self.min_size)

    def source(self, i: int) -> str:
        return str(self.paths[i])


class ClassFolderDataset(_ImageFileDataset):
    """ImageNet-style `root/<class>/.../<image>` folders."""

    kind = "c2i"

    def __init__(self, root: str | Path, split: str = "all", min_size: int = 8):
        _check_split(split)
        self.split = split
        root = Path(root)
        if not root.is_dir():
            raise ArgenError(f"data folder {root} does not exist")
        if split != "all" and (root / split).is_dir():
            root = root / split
        self.root = root
        self.min_size = min_size
        classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
            hint = " (it holds loose images: put them in one subfolder per class)" if loose else ""
            raise ArgenError(f"data folder {root} has no class subfolders{hint}")
        self.class_names = [c.name for c in classes]
        self.paths: list[Path] = []
        labels = []
        for label, folder in enumerate(classes):
            files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not files:
                raise ArgenError(f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                                 f"add images or remove the folder")
            self.paths.extend(files)
            labels.extend([label] * len(files))
        self.labels = np.array(labels, dtype=np.int64)

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def captions(self, i: int) -> list[str]:
        return [self.class_names[self.label(i)].replace("_", " ")]


class JsonlDataset(_ImageFileDataset):
    """Image-text pairs listed in a JSONL manifest."""

    kind = "t2i"
    class_names = None
    IMAGE_KEYS = ("image", "path", "file")

    def __init__(self, manifest: str | Path, split: str = "all", min_size: int = 8):
        _check_split(split)
        self.split = split
        manifest = Path(manifest)
        if not manifest.is_file():
            raise ArgenError(f"manifest {manifest} does not exist")
        self.manifest = manifest
        self.min_size = min_size
        self.paths: list[Path] = []
        self._captions: list[list[str]] = []
        with open(manifest, encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ArgenError(f"{manifest}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise ArgenError(f"{manifest}:{lineno}: each line must be a JSON object")
                if split != "all" and "split" in record and record["split"] != split:
                    continue
                key = next((k for k in self.IMAGE_KEYS if k in record), None)
                if key is None:
                    raise ArgenError(f"{manifest}:{lineno}: missing image column (one of {', '.join(self.IMAGE_KEYS)})")
                if "captions" in record:
                    caps = record["captions"]
                    caps = [caps] if isinstance(caps, str) else caps
                elif "caption" in record:
                    caps = [record["caption"]]
                else:
                    raise ArgenError(f"{manifest}:{lineno}: missing caption column ('caption' or 'captions')")
                if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
                    raise ArgenError(f"{manifest}:{lineno}: captions must be a non-empty string or list of strings")
                path = Path(record[key])
                self.paths.append(path if path.is_absolute() else manifest.parent / path)
                self._captions.append(caps)
        if not self.paths:
            raise ArgenError(f"manifest {manifest} lists no images" + (f" for split {split!r}" if split != "all"
                                                                       else ""))
        self.labels = np.arange(len(self.paths), dtype=np.int64)

    def label(self, i: int) -> int:
        return i

    def captions(self, i: int) -> list[str]:
        return list(self._captions[i])

    @cached_property
    def caption_offsets(self) -> np.ndarray:
        """Row of image i's first caption when all captions are listed in order; (N + 1,) int64."""
        return np.concatenate([[0], np.cumsum([len(c) for c in self._captions])]).astype(np.int64)


def open_dataset(spec: str | Path, split: str = "train", label: str = "category", min_size: int = 8,
                 sample_filter: str | None = None):
    """"demo", a class-folder path, a .jsonl manifest or tar shards -> dataset (`sample_filter`: a
    `--filter` expression, for tar shards only)."""
    text = str(spec)
    if sample_filter is not None and not is_shard_spec(text):
        raise ArgenError(f"--filter selects samples by their JSON metadata and applies to .tar shards only, not "
                         f"to --data {text!r}")
    if text == "demo":
        return DemoDataset(split, label=label)
    if is_shard_spec(text):
        _check_split(split)
        return ShardDataset(text, split, min_size, sample_filter=sample_filter)
    path = Path(text)
    if path.suffix == ".jsonl":
        return JsonlDataset(path, split, min_size)
    if path.is_dir():
        return ClassFolderDataset(path, split, min_size)
    if not path.exists():
        raise ArgenError(f"--data {text!r}: no such file or folder (use 'demo', a class folder, a .jsonl manifest "
                         f"or .tar shards)")
    raise ArgenError(f"--data {text!r}: expected 'demo', a class folder, a .jsonl manifest or .tar shards")


class TransformedDataset(torch.utils.data.Dataset):
    def __init__(self, dataset, transform, seed: int = 0):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        generator = torch.Generator().manual_seed(derive_seed("augment", self.seed, epoch, index))
        try:
            image = self.dataset.load(index)
        except BadImage as exc:
            return None, index, self.dataset.source(index), str(exc)
        return self.transform(image, generator), index, self.dataset.label(index), None


def collate_skip(items):
    """-> (images (B, 3, H, W), indices (B,), labels (B,), failures [(source, reason)])."""
    good = [it for it in items if it[0] is not None]
    failures = [(it[2], it[3]) for it in items if it[0] is None]
    if not good:
        return None, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), failures
    images = torch.stack([it[0] for it in good])
    indices = torch.tensor([it[1] for it in good], dtype=torch.long)
    labels = torch.tensor([it[2] for it in good], dtype=torch.long)
    return images, indices, labels, failures
