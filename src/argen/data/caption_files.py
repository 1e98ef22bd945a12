"""Caption-feature inputs given by path: an `argen extract-text-features` folder or a padded npz.

Contract:
- `read_features(path, length=None, rows=None)` -> (features (B, L, D) float32, mask (B, L) float32), left
  padded. A folder is padded to `length` (default: its recorded max length); an npz with `features`
  (B, L, D) and `mask` (B, L) is taken as it is. `rows` (a list of row indices) keeps those captions only.
- `parse_rows(text, count)`: `START:STOP` (either end may be left out, Python slice rules, no step) or a
  single row `I` -> the list of row indices among `count`; an empty selection or a malformed text is
  an `ArgenError`. Used by `--rows` of `argen sample` and `argen sample-batch`.
- `read_captions(path)` -> list of prompts: a text file with one prompt per line (blank lines skipped), or
  JSON: COCO's captions file (`annotations`, each with a `caption`, in file order), a list of strings,
  or {"prompts": [...]} (the `prompts.json` that `argen sample-batch --captions` writes).
A file that cannot be read, or lacks the arrays, is an `ArgenError` that names it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from argen.data.text_features import TextFeatureStore
from argen.utils.errors import ArgenError


def parse_rows(text: str, count: int) -> list[int]:
    """`START:STOP` or `I` -> row indices in [0, count)."""
    parts = text.strip().split(":")
    try:
        if len(parts) == 1:
            start = int(parts[0])
            stop = start + 1
        elif len(parts) == 2:
            start = int(parts[0]) if parts[0].strip() else 0
            stop = int(parts[1]) if parts[1].strip() else count
        else:
            raise ValueError
    except ValueError:
        raise ArgenError(f"--rows must be START:STOP (e.g. 0:8) or one row index, got {text!r}") from None
    if start < 0 or stop < 0:
        raise ArgenError(f"--rows takes row indices >= 0, got {text!r}")
    rows = list(range(start, min(stop, count)))
    if not rows:
        raise ArgenError(f"--rows {text} selects no rows of the {count} captions")
    return rows


def read_npz_features(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """An npz with `features` (B, L, D) and `mask` (B, L) -> float32 tensors, checked."""
    try:
        with np.load(path) as data:
            missing = {"features", "mask"} - set(data.files)
            if missing:
                raise ArgenError(f"{path} lacks {sorted(missing)}; it needs `features` (B,L,D) and `mask` (B,L)")
            features, mask = data["features"], data["mask"]
    except (OSError, ValueError, EOFError) as exc:
        raise ArgenError(f"cannot read caption features {path}: {exc}") from exc
    if features.ndim != 3 or mask.shape != features.shape[:2]:
        raise ArgenError(f"{path}: expected features (B,L,D) and mask (B,L), got {features.shape} and {mask.shape}")
    return torch.from_numpy(features.astype(np.float32)), torch.from_numpy(mask.astype(np.float32))


def read_features(path: str | Path, length: int | None = None,
                  rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption features -> (features (B, L, D) float32, mask (B, L) float32), left padded."""
    if Path(path).is_dir():
        store = TextFeatureStore(path)
        indices = range(len(store)) if rows is None else rows
        return store.get(indices, length or store.meta.get("max_length") or int(store.lengths.max()))
    features, mask = read_npz_features(path)
    if rows is not None:
        features, mask = features[rows], mask[rows]
    return features, mask


def read_captions(path: str | Path) -> list[str]:
    """A caption file (see the module docstring) -> prompts, stripped, none empty."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ArgenError(f"caption file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ArgenError(f"cannot read the caption file {path}: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArgenError(f"caption file {path} is not valid JSON ({exc})") from None
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            data = [a.get("caption") if isinstance(a, dict) else None for a in data["annotations"]]
        elif isinstance(data, dict) and isinstance(data.get("prompts"), list):
            data = data["prompts"]
        if not isinstance(data, list) or not all(isinstance(c, str) for c in data):
            raise ArgenError(f"caption file {path}: expected COCO captions JSON (annotations with a caption each), "
                             f"a list of strings or {{\"prompts\": [...]}}")
        captions = [" ".join(c.split()) for c in data]
        if "" in captions:
            raise ArgenError(f"caption file {path}: caption {captions.index('') + 1} is empty")
    else:
        captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise ArgenError(f"caption file {path} holds no captions")
    return captions
