"""Score sidecars: per-shard JSON files of computed metadata (CLIP similarity, aesthetic score) that
filters read as if it were the samples' own metadata.

Contract:
- `sidecar_path(shard, folder=None)`: `<folder or the shard's folder>/<shard stem>.scores.json`.
- A sidecar is one JSON object: `format` (1), `shard` (the tar's name), `shard_size` (its bytes when
  scored), `scorers` (the identity of each model that made a field: name, path, sha256 of its weights),
  `fields` (the field names it sets), `samples` ({key: {field: value}}; a sample whose image or caption
  could not be scored lacks those fields, so a filter counts it as missing), `bad` ({key: reason}).
  It is written atomically once the whole shard is scored, so its presence marks the shard done.
- `load_scores(shard, folder)` -> {key: {field: value}} or None when there is no sidecar; a sidecar
  made from a shard of another size raises `ArgenError` (the shard changed: score it again).
- Sidecar fields override the metadata's fields of the same name (`merge_record`).
"""

from __future__ import annotations

import json
from pathlib import Path

from argen.utils.errors import ArgenError
from argen.utils.io import atomic_write_json

SUFFIX = ".scores.json"
FORMAT = 1


def sidecar_path(shard: Path, folder: str | Path | None = None) -> Path:
    return Path(folder or shard.parent) / f"{shard.stem}{SUFFIX}"


def read_sidecar(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArgenError(f"score sidecar {path} is unreadable ({exc}); delete it and run `argen score-shards` "
                         f"again") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("samples"), dict):
        raise ArgenError(f"{path} is not an argen score sidecar (format {FORMAT}); delete it and run "
                         f"`argen score-shards` again")
    return data


def load_scores(shard: Path, folder: str | Path | None = None) -> dict | None:
    path = sidecar_path(shard, folder)
    if not path.is_file():
        return None
    data = read_sidecar(path)
    size = shard.stat().st_size if shard.is_file() else -1
    if data.get("shard_size") != size:
        raise ArgenError(f"score sidecar {path} was made from another version of {shard} ({data.get('shard_size')} "
                         f"bytes, now {size}); run `argen score-shards` again")
    return data["samples"]


def write_sidecar(shard: Path, folder: str | Path | None, scorers: dict, fields: list[str], samples: dict,
                  bad: dict) -> Path:
    path = sidecar_path(shard, folder)
    atomic_write_json(path, {"format": FORMAT, "shard": shard.name, "shard_size": shard.stat().st_size,
                             "scorers": scorers, "fields": fields, "samples": samples, "bad": bad})
    return path


def merge_record(meta: dict | None, scores: dict | None) -> dict:
    """The record a filter sees: the sample's JSON metadata with its sidecar fields laid over it."""
    if not scores:
        return meta or {}
    return {**(meta or {}), **scores}
