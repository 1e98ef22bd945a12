"""WebDataset-style tar shards (the layout img2dataset writes) as an argen dataset, read with the stdlib.

Contract:
- Shard sources (`is_shard_spec(spec)` decides; `resolve_shards(spec)` -> list of tar paths, in order):
  `shards:<any of the below>`; a brace pattern `dir/{00000..00127}.tar` (numeric ranges keep their zero
  padding, `{a,b}` lists, several braces); one `.tar` file; a folder that holds `.tar` files and no
  subfolders (sorted by name); a list file (`.txt` or `.shards`) with one tar path or pattern per line
  (relative to the list's folder, `#` comments). Options follow a `?`, joined by `&`: `caption_key=K`
  (JSON key of the caption, default `caption`), `label_key=K` (JSON key of the class id, default
  `label`), `kind=c2i|t2i`, `skip_bad_shards=1`, `sidecars=DIR` (where the score sidecars are; default
  next to each shard). Only uncompressed `.tar` files are read.
- Filter (`sample_filter`, `argen.data.filters`): a sample whose record (its JSON metadata with its
  score sidecar's fields over it, `argen.data.sidecars`) does not pass is left out of streaming and of
  the map-style view, before any bad-record check, and counted in a `FilterReport`: per shard in the
  one passed to `iter_shard`, else in `filter_report` (the map-style view's index counts there too).
- A sample is the run of consecutive members with the same key (the member path up to the first `.` of
  its file name); the rest of the name, lower-cased, is the extension. The image is the first member
  with an image extension (jpg, jpeg, png, webp, ...). Captions: the JSON value under `caption_key`
  (a string or a list of strings) when `key.json` has it, else the text of `key.txt`. Class id: the
  integer in `key.cls`, else the JSON value under `label_key`.
- `kind` is c2i when the first sample of the first readable shard has a class id, else t2i (or the
  `kind` option).
- Bad data: a sample without an image, an unreadable or truncated image, or, for extraction, a sample
  without a readable caption (t2i) or class id (c2i) is a bad record (`problem()` / `BadImage`),
  counted by the callers' `FailureTracker` like a bad file in a folder. The map-style `load(i)` checks
  the image only. A missing, truncated or corrupt tar file raises
  `ShardError` (an `ArgenError` naming the file): tarfile stops silently at a bad header, so after the
  last member the end-of-archive block is checked to be present and zero. With `skip_bad_shards` the
  callers skip such a shard as a whole instead.
- `shard_list_sha256(paths)`: sha256 over the shard file names and sizes, in order; extraction records
  it so that a rerun with other shards is refused.
- Streaming (`ShardDataset.iter_shard(s)`) holds one sample at a time: memory does not depend on the
  number of shards. `split_shards(n, rank, world, worker, workers)` is the one rule for dividing shards
  between ranks and DataLoader workers (round robin, no duplicates, no gaps).
- Map-style view (for tokenizer training and evaluation): `len()`, `load(i)`, `label(i)`,
  `captions(i)`, `source(i)`, built on first use by scanning every shard's tar headers (no image is
  read); it keeps 12 bytes per sample (the header offset of its first member and its member count).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from argen.data.filters import FilterReport, SampleFilter
from argen.data.images import IMAGE_EXTENSIONS, BadImage, load_image
from argen.data.sidecars import load_scores, merge_record
from argen.utils.errors import ArgenError

log = logging.getLogger("argen.data")
PREFIX = "shards:"
LIST_SUFFIXES = (".txt", ".shards")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp") + tuple(sorted(e[1:] for e in IMAGE_EXTENSIONS
                                                            if e[1:] not in ("jpg", "jpeg", "png", "webp")))
OPTIONS = ("caption_key", "label_key", "kind", "skip_bad_shards", "sidecars")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_BYTES_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


class ShardError(ArgenError):
    """A missing, truncated or corrupt tar shard."""


def _split_options(spec: str) -> tuple[str, dict]:
    text = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    if "?" not in text:
        return text, {}
    text, query = text.split("?", 1)
    options = {}
    for part in filter(None, query.split("&")):
        name, sep, value = part.partition("=")
        if not sep or name not in OPTIONS:
            raise ArgenError(f"--data {spec!r}: unknown shard option {part!r} (use {', '.join(OPTIONS)})")
        options[name] = value
    return text, options


def expand_braces(pattern: str) -> list[str]:
    """'a/{00..02}.tar' -> ['a/00.tar', 'a/01.tar', 'a/02.tar']; '{x,y}' lists; braces without '..'
    or ',' are kept as they are."""
    for match in _BRACE.finditer(pattern):
        body = match.group(1)
        numbers = _RANGE.match(body)
        if numbers:
            first, last = numbers.groups()
            width = len(first) if first.lstrip("-").startswith("0") and len(first.lstrip("-")) > 1 else 0
            step = 1 if int(last) >= int(first) else -1
            choices = [str(i).zfill(width) for i in range(int(first), int(last) + step, step)]
        elif "," in body:
            choices = body.split(",")
        else:
            continue
        head, tail = pattern[:match.start()], pattern[match.end():]
        return [head + choice + rest for choice in choices for rest in expand_braces(tail)]
    return [pattern]


def _has_braces(text: str) -> bool:
    return any(_RANGE.match(m.group(1)) or "," in m.group(1) for m in _BRACE.finditer(text))


def _tar_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    children = [p for p in path.iterdir() if not p.name.startswith(".")]
    return any(p.suffix == ".tar" and p.is_file() for p in children) and not any(p.is_dir() for p in children)


def is_shard_spec(spec: str | Path) -> bool:
    """Whether `--data spec` names tar shards (see the module docstring)."""
    text = str(spec)
    if text.startswith(PREFIX):
        return True
    path_text, _ = text.split("?", 1) if "?" in text else (text, "")
    path = Path(path_text)
    return (_has_braces(path_text) or path.suffix == ".tar" or _tar_folder(path)
            or (path.suffix in LIST_SUFFIXES and path.is_file()))


def _expand(text: str, base: Path | None = None) -> list[Path]:
    paths = []
    for name in expand_braces(text):
        path = Path(name)
        paths.append(path if base is None or path.is_absolute() else base / path)
    return paths


def resolve_shards(spec: str) -> list[Path]:
    """The tar paths of a shard source, in order (they are not opened; see `check_exist`)."""
    text, _ = _split_options(str(spec))
    path = Path(text)
    if _has_braces(text):
        paths = _expand(text)
    elif path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file()
                       and not p.name.startswith("."))
        if not paths:
            raise ArgenError(f"--data {spec!r}: the folder {path} holds no .tar files")
    elif path.suffix in LIST_SUFFIXES and path.is_file():
        paths = []
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                paths.extend(_expand(line, path.parent))
        if not paths:
            raise ArgenError(f"--data {spec!r}: the list file {path} names no shards")
    else:
        paths = [path]
    compressed = [p for p in paths if p.suffix != ".tar"]
    if compressed:
        raise ArgenError(f"--data {spec!r}: {compressed[0]} is not an uncompressed .tar file (compressed shards "
                         f"are not supported; img2dataset writes plain .tar)")
    return paths


def shard_list_sha256(paths: list[Path]) -> str:
    """sha256 over 'name<TAB>size' lines of the shards in order (-1 for a missing file)."""
    digest = hashlib.sha256()
    for path in paths:
        size = path.stat().st_size if path.is_file() else -1
        digest.update(f"{path.name}\t{size}\n".encode())
    return digest.hexdigest()


def split_shards(num_shards: int, rank: int = 0, world_size: int = 1, worker: int = 0,
                 num_workers: int = 1) -> list[int]:
    """Shards of (rank, worker): rank r takes s % world_size == r; its worker w every num_workers-th of those."""
    return list(range(num_shards))[rank::world_size][worker::num_workers]


def _split_name(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _check_end(tar: tarfile.TarFile, path: Path) -> None:
    """tarfile ends silently at a truncated or corrupt header: require the zero end-of-archive block."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        raise ShardError(f"tar shard {path} is truncated (it ends at byte {tar.offset + len(block)} without the "
                         f"end-of-archive marker); download it again or pass skip_bad_shards=1")
    if block.strip(b"\0"):
        raise ShardError(f"tar shard {path} is corrupt (no valid tar header at byte {tar.offset}); download it "
                         f"again or pass skip_bad_shards=1")


def _open_error(path: Path, exc: BaseException) -> ShardError:
    if not path.exists():
        return ShardError(f"tar shard {path} does not exist")
    return ShardError(f"tar shard {path} is unreadable or truncated ({type(exc).__name__}: {exc}); download it "
                      f"again or pass skip_bad_shards=1")


def iter_groups(path: Path, read: bool = True, exts: frozenset | None = None):
    """Yield (key, first header offset, member count, {ext: bytes} or None) per sample of one tar
    (`exts`: read only members with these extensions)."""
    try:
        with tarfile.open(path, "r:") as tar:
            key, start, count, files = None, 0, 0, {}
            while True:
                member = tar.next()
                if member is None:
                    break
                if not member.isfile():
                    continue
                name_key, ext = _split_name(member.name)
                if name_key != key and count:
                    yield key, start, count, (files if read else None)
                    count, files = 0, {}
                if not count:
                    key, start = name_key, member.offset
                count += 1
                if read and ext not in files and (exts is None or ext in exts):
                    files[ext] = tar.extractfile(member).read()
            _check_end(tar, path)
            if count:
                yield key, start, count, (files if read else None)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise _open_error(path, exc) from exc


def _read_group(path: Path, start: int, count: int) -> tuple[str, dict[str, bytes]]:
    key, files = "", {}
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            tar = tarfile.TarFile(fileobj=handle, mode="r")
            seen = 0
            while seen < count:
                member = tar.next()
                if member is None:
                    raise tarfile.ReadError("the shard changed since it was indexed")
                if not member.isfile():
                    continue
                seen += 1
                key, ext = _split_name(member.name)
                if ext not in files:
                    files[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise _open_error(path, exc) from exc
    return key, files


@dataclass
class ShardSample:
    """One sample: its key, image bytes (or None), captions, class id (or None), and why the captions or
    the class id could not be read (None when they were read or are simply absent)."""

    shard: int
    key: str
    image: bytes | None = None
    captions: list[str] = field(default_factory=list)
    label: int | None = None
    caption_problem: str | None = None
    label_problem: str | None = None
    meta: dict | None = None


def parse_sample(shard: int, key: str, files: dict[str, bytes], caption_key: str, label_key: str) -> ShardSample:
    sample = ShardSample(shard, key)
    sample.image = next((files[e] for e in IMAGE_EXTS if e in files), None)
    meta, json_problem = None, None
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            json_problem = f"unreadable JSON ({exc})"
        if meta is not None and not isinstance(meta, dict):
            meta, json_problem = None, "the JSON member is not an object"
    sample.meta = meta
    if meta is not None and meta.get(caption_key) is not None:
        value = meta[caption_key]
        captions = [value] if isinstance(value, str) else value
        if isinstance(captions, list) and all(isinstance(c, str) for c in captions):
            sample.captions = [c for c in captions if c.strip()]
        else:
            sample.caption_problem = f"JSON {caption_key!r} is not a string or a list of strings"
    elif "txt" in files:
        try:
            text = files["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            text, sample.caption_problem = "", "the .txt caption is not UTF-8"
        sample.captions = [text] if text else []
    raw = files.get("cls")
    if raw is None and meta is not None and meta.get(label_key) is not None:
        raw = meta[label_key]
    if raw is not None:
        try:
            if isinstance(raw, (bool, float)):
                raise ValueError(raw)
            sample.label = int(raw.decode().strip() if isinstance(raw, bytes) else raw)
        except (ValueError, TypeError, UnicodeDecodeError):
            sample.label_problem = f"class id {raw!r} is not an integer"
    if not sample.captions and sample.caption_problem is None:
        sample.caption_problem = json_problem
    if sample.label is None and sample.label_problem is None:
        sample.label_problem = json_problem
    return sample


class ShardDataset:
    """Tar shards as a dataset: streaming per shard for extraction, a header index for random access."""

    class_names = None

    def __init__(self, spec: str | Path, split: str = "all", min_size: int = 8, caption_key: str | None = None,
                 label_key: str | None = None, kind: str | None = None, skip_bad_shards: bool | None = None,
                 sample_filter: str | SampleFilter | None = None, sidecars: str | None = None):
        self.spec = str(spec)
        self.split = split
        path_text, options = _split_options(self.spec)
        self.location = PREFIX + path_text
        self.min_size = min_size
        self.caption_key = caption_key or options.get("caption_key") or "caption"
        self.label_key = label_key or options.get("label_key") or "label"
        skip = options.get("skip_bad_shards", "0") if skip_bad_shards is None else skip_bad_shards
        self.skip_bad_shards = skip if isinstance(skip, bool) else skip.lower() in ("1", "true", "yes")
        self.shards = resolve_shards(self.spec)
        self.filter = SampleFilter.parse(sample_filter)
        self.filter_text = self.filter.text if self.filter else None
        self.filter_report = self.filter.new_report() if self.filter else None
        self.sidecars = sidecars or options.get("sidecars") or None
        missing = [p for p in self.shards if not p.is_file()]
        if missing and not self.skip_bad_shards:
            raise ShardError(f"{len(missing)} of the {len(self.shards)} tar shards of --data {self.spec!r} do not "
                             f"exist (e.g. {missing[0]}); fix the pattern or pass skip_bad_shards=1")
        if len(missing) == len(self.shards):
            raise ShardError(f"none of the {len(self.shards)} tar shards of --data {self.spec!r} exists")
        self.sha256 = shard_list_sha256(self.shards)
        self.names = [p.name for p in self.shards]
        kind = kind or options.get("kind")
        if kind not in (None, "c2i", "t2i"):
            raise ArgenError(f"--data {self.spec!r}: kind must be c2i or t2i, not {kind!r}")
        self.kind = kind or self._detect_kind()
        self._index: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._starts: np.ndarray | None = None
        self._last: tuple[int, ShardSample] | None = None  # load(i) then label(i) read the tar once
        self.skipped: dict[int, str] = {}

    def _detect_kind(self) -> str:
        for s in range(len(self.shards)):
            try:
                for sample in self.iter_shard(s, apply_filter=False):
                    return "c2i" if sample.label is not None else "t2i"
            except ShardError:
                if not self.skip_bad_shards:
                    raise
        return "t2i"

    # ------------------------------------------------------------------ streaming
    def new_filter_report(self) -> FilterReport | None:
        return self.filter.new_report() if self.filter else None

    def scores(self, shard: int) -> dict | None:
        """The score sidecar's {key: fields} of shard `shard` (None without a sidecar)."""
        return load_scores(self.shards[shard], self.sidecars)

    def iter_shard(self, shard: int, images: bool = True, report: FilterReport | None = None,
                   apply_filter: bool = True):
        """Yield the `ShardSample`s of shard `shard` that pass the filter, in tar order (`images=False`:
        without reading the image bytes); raises `ShardError` for a bad tar."""
        exts = None if images else frozenset(("txt", "json", "cls"))
        keep = self._keeper(shard, report) if apply_filter else None
        for key, _, _, files in iter_groups(self.shards[shard], exts=exts):
            sample = parse_sample(shard, key, files, self.caption_key, self.label_key)
            if keep is None or keep(sample):
                yield sample

    def _keeper(self, shard: int, report: FilterReport | None):
        """sample -> whether it passes the filter (counted in `report`), or None without a filter."""
        if self.filter is None:
            return None
        report = report if report is not None else self.filter_report
        scores = self.scores(shard) or {}
        return lambda sample: report.add(merge_record(sample.meta, scores.get(sample.key)))

    def caption_problem(self, sample: ShardSample) -> str | None:
        """Why `sample` has no caption (None when it has one)."""
        if sample.captions:
            return None
        return sample.caption_problem or f"no caption (.txt or JSON {self.caption_key!r})"

    def problem(self, sample: ShardSample) -> str | None:
        """Why `sample` cannot be used for this dataset's kind (None when it can; the image is not decoded)."""
        if sample.image is None:
            return "no image member"
        if self.kind == "t2i":
            return self.caption_problem(sample)
        if sample.label is None:
            return sample.label_problem or f"no class id (.cls or JSON {self.label_key!r})"
        return None

    def decode(self, sample: ShardSample) -> Image.Image:
        """The sample's image as 8-bit RGB; raises `BadImage`."""
        if sample.image is None:
            raise BadImage("no image member")
        try:
            return load_image(io.BytesIO(sample.image), self.min_size)
        except BadImage as exc:  # PIL names the in-memory file by its repr
            raise BadImage(_BYTES_REPR.sub("the image member", str(exc))) from exc

    def sample_source(self, sample: ShardSample) -> str:
        return f"{self.shards[sample.shard]}:{sample.key}"

    # ------------------------------------------------------------------ map-style view
    def _build_index(self) -> None:
        index = []
        for s, path in enumerate(self.shards):
            starts, counts = [], []
            try:
                keep = self._keeper(s, None)
                exts = frozenset(("json",)) if keep else None
                for key, start, count, files in iter_groups(path, read=keep is not None, exts=exts):
                    if keep is not None and not keep(parse_sample(s, key, files, self.caption_key, self.label_key)):
                        continue
                    starts.append(start)
                    counts.append(count)
            except ShardError as exc:
                if not self.skip_bad_shards:
                    raise
                log.warning("skipping shard %s: %s", path, exc)
                self.skipped[s] = str(exc)
                starts, counts = [], []
            index.append((np.asarray(starts, dtype=np.int64), np.asarray(counts, dtype=np.int32)))
        self._index = index
        self._starts = np.concatenate([[0], np.cumsum([len(s) for s, _ in index])]).astype(np.int64)

    def _locate(self, i: int) -> tuple[int, int]:
        if self._index is None:
            self._build_index()
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        return shard, i - int(self._starts[shard])

    def __len__(self) -> int:
        if self._index is None:
            self._build_index()
        return int(self._starts[-1])

    def sample(self, i: int) -> ShardSample:
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        shard, row = self._locate(i)
        starts, counts = self._index[shard]
        path = self.shards[shard]
        key, files = _read_group(path, int(starts[row]), int(counts[row]))
        sample = parse_sample(shard, key, files, self.caption_key, self.label_key)
        self._last = (i, sample)
        return sample

    def load(self, i: int) -> Image.Image:
        return self.decode(self.sample(i))

    def source(self, i: int) -> str:
        return self.sample_source(self.sample(i))

    def label(self, i: int) -> int:
        label = self.sample(i).label
        return -1 if label is None else label

    def captions(self, i: int) -> list[str]:
        return list(self.sample(i).captions)
