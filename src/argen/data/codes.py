"""Code shards: the tokenized dataset a generator trains on.

Layout of a codes directory (written by `argen extract-codes` through `CodeShardWriter`):

- `codes-{i:05d}.npy`: (n, A, h, w) token ids, uint16 when the codebook has at most 65536 entries,
  else int32; A is the number of augmented copies per image (`num_augs`).
- `labels-{i:05d}.npy`: (n,) int64; class ids for c2i, caption/feature row indices for t2i.
- `meta.json`: the run's metadata, written when the writer is created (reruns must match it).
- `index.json`: written by `finalize()` once every shard is done: the metadata plus the shard list:
  `format: "argen-codes"`, `version`, `kind` (c2i|t2i), `tokenizer` (config dict), `codebook_size`,
  `grid` [h, w], `image_size`, `num_augs`, `aug_names`, `num_classes`, `class_names`,
  `text_features` (t2i: path relative to the codes dir), `shards` [{index, codes, labels, count}],
  `num_images`.

Every file is written atomically (temp + rename) and a shard counts as done only when both of its
files exist, so an interrupted extraction resumes by skipping `is_done` shards.

`CodeDataset(dir)` memory-maps the shards: `len(ds)` images, `get(i, aug)` -> (codes (h*w,) int64,
label), `get_batch(indices, augs)` for whole batches, and `check_compatible(gpt_config)` raises
`ArgenError` when the codes cannot train that generator.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from argen.utils.errors import ArgenError
from argen.utils.io import atomic_save_npy, atomic_write_json

FORMAT = "argen-codes"
VERSION = 1
KINDS = ("c2i", "t2i")
_SHARD_RE = re.compile(r"^codes-(\d{5})\.npy$")
# meta fields that must agree between a rerun and the files already on disk
_IDENTITY_KEYS = ("kind", "tokenizer", "codebook_size", "grid", "image_size", "num_augs", "aug_names",
                  "num_classes", "text_features", "source", "split", "num_images", "shard_size", "crop_range",
                  "tokenizer_sha256", "shards_sha256", "num_shards", "caption_key", "label_key", "filter")


def codes_name(index: int) -> str:
    return f"codes-{index:05d}.npy"


def labels_name(index: int) -> str:
    return f"labels-{index:05d}.npy"


def code_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def _normalize_meta(meta: dict) -> dict:
    """Fill defaults and check the fields a trainer relies on."""
    out = dict(meta)
    out.setdefault("format", FORMAT)
    out.setdefault("version", VERSION)
    for key in ("kind", "codebook_size", "grid"):
        if key not in out:
            raise ArgenError(f"code-shard metadata needs {key!r}")
    if out["kind"] not in KINDS:
        raise ArgenError(f"code-shard kind must be one of {KINDS}, got {out['kind']!r}")
    grid = out["grid"]
    if isinstance(grid, int):
        grid = [grid, grid]
    out["grid"] = [int(g) for g in grid]
    if len(out["grid"]) != 2:
        raise ArgenError(f"code-shard grid must be [h, w], got {grid!r}")
    out["codebook_size"] = int(out["codebook_size"])
    out.setdefault("tokenizer", None)
    out.setdefault("image_size", None)
    out.setdefault("num_augs", 1)
    out["num_augs"] = int(out["num_augs"])
    out.setdefault("aug_names", [f"aug{i}" for i in range(out["num_augs"])])
    if len(out["aug_names"]) != out["num_augs"]:
        raise ArgenError(f"aug_names has {len(out['aug_names'])} entries but num_augs is {out['num_augs']}")
    out.setdefault("num_classes", None)
    out.setdefault("class_names", None)
    out.setdefault("text_features", None)
    if out["kind"] == "t2i" and not out["text_features"]:
        raise ArgenError("t2i code shards need 'text_features' (path of the caption features, relative to the "
                         "codes directory)")
    return json.loads(json.dumps(out))  # plain JSON types, so comparisons with files on disk are exact


class CodeShardWriter:
    """Write code shards into `out_dir`; a rerun with the same metadata skips finished shards."""

    def __init__(self, out_dir: str | Path, meta: dict):
        self.out_dir = Path(out_dir)
        self.meta = _normalize_meta(meta)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        meta_file = self.out_dir / "meta.json"
        if meta_file.is_file():
            old = json.loads(meta_file.read_text())
            # a key that an older argen did not record cannot be compared
            diff = [k for k in _IDENTITY_KEYS if k in old and old[k] != self.meta.get(k)]
            if diff:
                raise ArgenError(f"{self.out_dir} already holds codes made with different settings "
                                 f"({', '.join(diff)}); choose another output directory or delete it")
        else:
            atomic_write_json(meta_file, self.meta)
        self.dtype = code_dtype(self.meta["codebook_size"])

    def is_done(self, index: int) -> bool:
        return (self.out_dir / codes_name(index)).is_file() and (self.out_dir / labels_name(index)).is_file()

    def write_shard(self, index: int, codes, labels) -> None:
        """codes (n, A, h, w) integer ids, labels (n,) int; both files are written atomically."""
        codes = codes.cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
        labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        h, w = self.meta["grid"]
        num_augs = self.meta["num_augs"]
        if codes.ndim != 4 or codes.shape[1:] != (num_augs, h, w):
            raise ArgenError(f"shard {index}: codes must be (n, {num_augs}, {h}, {w}), got {codes.shape}")
        if labels.shape != (codes.shape[0],):
            raise ArgenError(f"shard {index}: labels must be ({codes.shape[0]},), got {labels.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.meta["codebook_size"]):
            raise ArgenError(f"shard {index}: code ids out of range [0, {self.meta['codebook_size']})")
        codes = codes.astype(self.dtype)
        labels = labels.astype(np.int64)
        # labels last: their presence marks the shard as complete
        (self.out_dir / labels_name(index)).unlink(missing_ok=True)
        atomic_save_npy(self.out_dir / codes_name(index), codes)
        atomic_save_npy(self.out_dir / labels_name(index), labels)

    def finalize(self) -> dict:
        """Write `index.json` listing every finished shard; returns the index."""
        shards = []
        for path in sorted(self.out_dir.glob("codes-*.npy")):
            match = _SHARD_RE.match(path.name)
            if not match:
                continue
            index = int(match.group(1))
            if not self.is_done(index):
                continue
            count = int(np.load(path, mmap_mode="r").shape[0])
            shards.append({"index": index, "codes": codes_name(index), "labels": labels_name(index),
                           "count": count})
        index = {**self.meta, "shards": shards, "num_images": sum(s["count"] for s in shards)}
        atomic_write_json(self.out_dir / "index.json", index)
        return index


class CodeDataset:
    """Read-only, memory-mapped view of a finalized codes directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index_file = self.root / "index.json"
        if not self.root.is_dir():
            raise ArgenError(f"codes directory {self.root} does not exist; run `argen extract-codes` first")
        if not index_file.is_file():
            raise ArgenError(f"{self.root} has no index.json; run `argen extract-codes` to completion "
                             f"(it finalizes the shards)")
        try:
            self.meta = json.loads(index_file.read_text())
        except json.JSONDecodeError as exc:
            raise ArgenError(f"{index_file} is not valid JSON ({exc}); rerun `argen extract-codes`") from exc
        if self.meta.get("format") != FORMAT:
            raise ArgenError(f"{index_file} is not an argen code index (format {self.meta.get('format')!r})")
        if int(self.meta.get("version", 0)) > VERSION:
            raise ArgenError(f"{index_file} has format version {self.meta['version']}; this argen reads "
                             f"up to {VERSION}")
        self.meta = _normalize_meta(self.meta)
        if not self.meta.get("shards"):
            raise ArgenError(f"{self.root} lists no code shards; rerun `argen extract-codes`")
        h, w = self.grid
        self._codes: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        for shard in self.meta["shards"]:
            codes_file, labels_file = self.root / shard["codes"], self.root / shard["labels"]
            for file in (codes_file, labels_file):
                if not file.is_file():
                    raise ArgenError(f"code shard file {file} is missing; rerun `argen extract-codes` into "
                                     f"{self.root}")
            try:
                codes = np.load(codes_file, mmap_mode="r")
                labels = np.load(labels_file, mmap_mode="r")
            except (ValueError, OSError) as exc:
                raise ArgenError(f"cannot read shard {codes_file.name} ({exc}); delete it and rerun "
                                 f"`argen extract-codes`") from exc
            expected = (shard["count"], self.num_augs, h, w)
            if codes.shape != expected or labels.shape != (shard["count"],):
                raise ArgenError(f"shard {codes_file.name} has codes {codes.shape} / labels {labels.shape} but "
                                 f"index.json expects {expected}; rerun `argen extract-codes`")
            self._codes.append(codes)
            self._labels.append(labels)
        counts = np.array([c.shape[0] for c in self._codes], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._all_labels = np.concatenate([np.asarray(lab) for lab in self._labels]) if self._labels else None

    # ------------------------------------------------------------------ metadata
    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.meta["grid"])

    @property
    def codebook_size(self) -> int:
        return self.meta["codebook_size"]

    @property
    def num_augs(self) -> int:
        return self.meta["num_augs"]

    @property
    def num_classes(self) -> int | None:
        return self.meta.get("num_classes")

    @property
    def class_names(self) -> list[str] | None:
        return self.meta.get("class_names")

    @property
    def image_size(self) -> int | None:
        return self.meta.get("image_size")

    @property
    def tokenizer(self) -> dict | None:
        return self.meta.get("tokenizer")

    @property
    def text_features_dir(self) -> Path | None:
        rel = self.meta.get("text_features")
        return None if not rel else (self.root / rel).resolve()

    @property
    def labels(self) -> np.ndarray:
        """All labels (N,) int64, in dataset order."""
        return self._all_labels

    def __len__(self) -> int:
        return int(self._starts[-1])

    # ------------------------------------------------------------------ access
    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"image index {i} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        return shard, i - int(self._starts[shard])

    def shard_codes(self, k: int) -> np.ndarray:
        """Shard k's codes, memory-mapped: (count, num_augs, h, w), in dataset order (index.json's shards)."""
        return self._codes[k]

    def get(self, i: int, aug: int = 0) -> tuple[torch.Tensor, int]:
        """Image i's augmented copy `aug` -> (codes (h*w,) int64, label)."""
        if not 0 <= aug < self.num_augs:
            raise IndexError(f"augmentation {aug} out of range [0, {self.num_augs})")
        shard, row = self._locate(int(i))
        codes = torch.from_numpy(np.asarray(self._codes[shard][row, aug]).astype(np.int64).reshape(-1))
        return codes, int(self._labels[shard][row])

    def get_batch(self, indices, augs) -> tuple[torch.Tensor, torch.Tensor]:
        """indices, augs (B,) -> (codes (B, h*w) int64, labels (B,) int64)."""
        pairs = [self.get(int(i), int(a)) for i, a in zip(indices, augs)]
        codes = torch.stack([p[0] for p in pairs])  # (B, h*w)
        labels = torch.tensor([p[1] for p in pairs], dtype=torch.long)
        return codes, labels

    # ------------------------------------------------------------------ validation
    def check_compatible(self, gpt_config) -> None:
        """Raise ArgenError unless these codes can train a generator with `gpt_config`."""
        cfg = gpt_config
        if cfg.kind != self.kind:
            raise ArgenError(f"{self.root} holds {self.kind} codes but the generator config is {cfg.kind}")
        if cfg.vocab_size != self.codebook_size:
            raise ArgenError(f"the codes come from a tokenizer with codebook size {self.codebook_size} but the "
                             f"generator's vocab_size is {cfg.vocab_size}; use a matching config or tokenizer")
        h, w = self.grid
        if h != w or h != cfg.grid_size:
            raise ArgenError(f"the codes have a {h}x{w} grid but the generator expects {cfg.grid_size}x"
                             f"{cfg.grid_size} (image_size {cfg.image_size} / downsample {cfg.downsample}); "
                             f"set the generator's image size to match the tokenizer")
        if self.kind == "c2i" and len(self):
            top = int(self._all_labels.max())
            low = int(self._all_labels.min())
            if low < 0 or top >= cfg.num_classes:
                raise ArgenError(f"class labels in {self.root} span [{low}, {top}] but the generator has "
                                 f"{cfg.num_classes} classes")
