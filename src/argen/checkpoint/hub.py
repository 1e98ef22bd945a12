"""Checkpoint references: local paths, released LlamaGen names and Hugging Face Hub files.

Contract:
- `resolve(ref)` -> (local Path, ReleasedName or None):
  * an existing local path is used as it is;
  * `hf://owner/repo/path/in/repo` (or `hf://owner/repo@revision/path`) is that file on the Hub;
  * `hf://owner/repo` (or `hf://owner/repo@revision`) is a repository written by `argen push`: its manifest
    `argen.json` (`MANIFEST`) names the generator file in it and its tokenizer (a file in it, or the reference
    of a released or bundled one). For a generator it means the generator file; `--tokenizer hf://owner/repo`
    means its tokenizer. A local folder with an `argen.json` (a staged `argen push --stage DIR`) reads the same;
  * a released name that is not a local path (`c2i_B_256`, `c2i_B_256.pt`, `vq_ds16_c2i`) is the published
    file in its repository (`argen.checkpoint.released.RELEASED_REPOS`);
  * a bundled name that is not a local path (`demo-c2i`, `demo-t2i`, `demo-vq`) is the file that ships
    inside argen (`argen.checkpoint.bundled`); nothing is downloaded.
  Hub files are fetched with `huggingface_hub.hf_hub_download` into its standard cache (`HF_HOME`,
  `HF_HUB_CACHE`). A transfer that breaks off is resumed from where it stopped with HTTP Range requests
  (huggingface_hub retries up to 5 times within the run; a killed process starts that file over, since
  huggingface_hub removes its partial file). A cached file is
  used without a download where the Hub says it is current, and with `HF_HUB_OFFLINE=1` the cache alone
  is used, with no network. Any failure is a one-line `CheckpointError`.
  The ReleasedName comes from the file name, for hub references and local files alike (`.../c2i_L_384.pt`).
- `gpt_arguments(ref, config, kind, image_size, downsample)` and `tokenizer_arguments(ref, config)` fill in
  the loader arguments a released name implies. A given argument that contradicts the name raises
  `ArgenError` naming both, before any download, except `image_size`: the weights hold no size, so
  a given size wins (sampling a 384 px model at 256 px, as for argen files).
- `default_tokenizer(gpt_ref)`: the released tokenizer of a released generator name (from the same hub
  repository for an hf:// reference, the file beside it for a local file when it is there), the bundled
  tokenizer of a bundled generator, the tokenizer a pushed repository's manifest names, else None.
- `read_manifest(data)` checks a manifest's fields; an adapter repository's generator reference is refused with
  the name of its base model.
- `hub_folder(ref, names)`: the files `names` of `hf://owner/repo[@revision][/folder]` (a LoRA adapter's two
  files), downloaded as above, -> the local folder that holds them.
- `checkpoint_record(ref)`: the reference a run writes down (hf://... for hub files, else the absolute path).
- `model_id(ref)`: the name a server reports for a checkpoint; `gpt_class_names(ref, num_classes)`: its class
  names (stored with an argen generator, or ImageNet's for a released 1000-class file), else None.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from argen.checkpoint.bundled import BUNDLED_TOKENIZER, bundled_path
from argen.checkpoint.released import RELEASED_REPOS, ReleasedName, imagenet_class_names, released_name
from argen.utils.errors import ArgenError, CheckpointError

HF_PREFIX = "hf://"
MANIFEST = "argen.json"  # what a repository written by `argen push` holds
MANIFEST_FORMAT = "argen-hub"


def parse_hub_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`hf://owner/repo[@revision]/path` -> (repo id, path in the repo, revision or None); the path is None for
    a whole repository (`hf://owner/repo[@revision]`)."""
    parts = ref[len(HF_PREFIX):].strip("/").split("/")
    if len(parts) < 2 or not all(parts) or parts[1].startswith("@"):
        raise ArgenError(f"{ref!r} is not a hub reference: use hf://owner/repo/file (e.g. "
                         f"hf://FoundationVision/LlamaGen/c2i_B_256.pt) or hf://owner/repo for a repository "
                         f"written by argen push")
    repo, revision = parts[1], None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    return f"{parts[0]}/{repo}", "/".join(parts[2:]) or None, revision or None


def _hub_url(repo: str, revision: str | None, filename: str | None = None) -> str:
    return f"{HF_PREFIX}{repo}{'@' + revision if revision else ''}" + (f"/{filename}" if filename else "")


def read_manifest(data: dict, where: str) -> dict:
    """A checked `argen.json`: `generator` (a file in the repository, or None for an adapter), `tokenizer`
    (a file in it, or a checkpoint reference), `kind`; an `adapter` entry names its `base` model."""
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{where} is not an argen push manifest (format {MANIFEST_FORMAT!r})")
    for key in ("generator", "tokenizer"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise CheckpointError(f"{where}: `{key}` must be a string")
    return data


def _repo_manifest(repo: str, revision: str | None) -> dict:
    where = _hub_url(repo, revision)
    try:
        path = _download(repo, MANIFEST, revision)
    except CheckpointError as exc:
        if "no such file" not in str(exc):
            raise
        raise CheckpointError(f"{where} has no {MANIFEST}, so it is not a repository written by argen push; "
                              f"name a file in it: {where}/FILE") from None
    try:
        return read_manifest(json.loads(path.read_text(encoding="utf-8")), f"{where}/{MANIFEST}")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {where}/{MANIFEST}: {exc}") from None


def _local_manifest(path: Path) -> dict | None:
    file = path / MANIFEST
    if not file.is_file():
        return None
    try:
        return read_manifest(json.loads(file.read_text(encoding="utf-8")), str(file))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from None


def _generator_file(manifest: dict, where: str) -> str:
    if manifest.get("generator") is None:
        base = (manifest.get("adapter") or {}).get("base")
        raise ArgenError(f"{where} holds a LoRA adapter, not a generator" + (f" (its base model: {base})" if base
                                                                              else "")
                         + "; load the base model with the adapter")
    return manifest["generator"]


def _manifest_tokenizer(manifest: dict, repo: str | None, revision: str | None, folder: Path | None) -> str | None:
    """The manifest's tokenizer as a reference: a file of the repository (or folder), else as written."""
    ref = manifest.get("tokenizer")
    if ref is None or ref.startswith(HF_PREFIX) or "/" in ref:
        return ref
    if repo is not None and ref.endswith(".safetensors"):
        return _hub_url(repo, revision, ref)
    if folder is not None and (folder / ref).is_file():
        return str(folder / ref)
    return ref


def _repo_ref(ref: str) -> tuple[str, str | None] | None:
    """(repo, revision) when `ref` is a whole repository (`hf://owner/repo[@revision]`), else None."""
    if not ref.startswith(HF_PREFIX):
        return None
    repo, filename, revision = parse_hub_ref(ref)
    return None if filename is not None else (repo, revision)


def repo_file_ref(ref: str | Path, role: str = "generator") -> str:
    """A whole-repository reference (or a staged folder) -> the reference of its generator or tokenizer file;
    any other reference unchanged."""
    text = str(ref)
    whole = _repo_ref(text)
    if whole is not None:
        repo, revision = whole
        manifest = _repo_manifest(repo, revision)
        if role == "tokenizer":
            return _manifest_tokenizer(manifest, repo, revision, None) or text
        return _hub_url(repo, revision, _generator_file(manifest, _hub_url(repo, revision)))
    local = Path(text)
    if role == "generator" and local.is_dir():
        manifest = _local_manifest(local)
        if manifest is not None:
            return str(local / _generator_file(manifest, text))
    if role == "tokenizer" and local.is_dir() and not (local / "tokenizer.safetensors").is_file():
        manifest = _local_manifest(local)
        if manifest is not None:
            return _manifest_tokenizer(manifest, None, None, local) or text
    return text


def _hub_source(ref: str) -> tuple[str, str, str | None] | None:
    """Where on the Hub the file `ref` names lives, or None for a local path (a whole repository: its generator)."""
    if ref.startswith(HF_PREFIX):
        repo, filename, revision = parse_hub_ref(ref)
        if filename is None:
            return parse_hub_ref(repo_file_ref(ref))
        return repo, filename, revision
    if Path(ref).exists() or "/" in ref or os.sep in ref:
        return None
    stem = ref[:-3] if ref.endswith(".pt") else ref
    if stem in RELEASED_REPOS:
        return RELEASED_REPOS[stem], f"{stem}.pt", None
    return None


def is_hub_reference(ref: str | Path) -> bool:
    """Whether `ref` names a file on the Hub (hf://... or a released name) rather than a local path."""
    return str(ref).startswith(HF_PREFIX) or _hub_source(str(ref)) is not None


def _name(text: str) -> ReleasedName | None:
    if _repo_ref(text) is not None:  # a pushed repository holds argen files, which carry their config
        return None
    source = _hub_source(text)
    return released_name(source[1] if source else text)


def _download(repo: str, filename: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError:
        raise ArgenError("hub checkpoints need huggingface_hub: pip install huggingface_hub") from None
    where = f"{repo}/{filename}" + (f"@{revision}" if revision else "")
    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except GatedRepoError:
        raise CheckpointError(f"hf://{where}: the repository is gated; log in with `hf auth login` "
                              f"(or set HF_TOKEN) after accepting its terms") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"hf://{where}: no such repository on the Hugging Face Hub (or it is private)") from None
    except LocalEntryNotFoundError:
        if constants.is_offline_mode():
            raise CheckpointError(f"hf://{where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                                  f"HF_HUB_OFFLINE is set: download it once online, or unset HF_HUB_OFFLINE"
                                  ) from None
        raise CheckpointError(f"cannot download hf://{where}: the Hub is unreachable and the file is not in the "
                              f"cache ({constants.HF_HUB_CACHE}); check the connection, or run with "
                              f"HF_HUB_OFFLINE=1 on a machine that has it cached") from None
    except EntryNotFoundError:
        raise CheckpointError(f"hf://{where}: no such file in the repository") from None
    except HfHubHTTPError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot download hf://{where}: {first}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot download hf://{where}: {exc.strerror or exc}") from None


def hub_folder(ref: str, names: tuple[str, ...]) -> Path:
    """The local folder holding the files `names` of `hf://owner/repo[@revision][/folder]`, downloaded."""
    repo, folder, revision = parse_hub_ref(ref)
    files = [_download(repo, f"{folder}/{name}" if folder else name, revision) for name in names]
    return files[0].parent


def resolve(ref: str | Path) -> tuple[Path, ReleasedName | None]:
    """A checkpoint reference -> (local path, what its released file name says, or None)."""
    text = str(ref)
    source = _hub_source(text)
    name = released_name(source[1] if source else text)
    if source is None:
        local = Path(ref)
        return (local if local.exists() else bundled_path(text) or local), name
    return _download(*source), name


def _contradiction(ref: str, name: ReleasedName, flag: str, given, implied) -> ArgenError:
    return ArgenError(f"--{flag} {given} contradicts {ref}, which is a {name.config} {name.kind} file "
                      f"(--{flag} {implied}); drop the flag or pick the checkpoint that matches it")


def _config_name(config) -> str | None:
    return config if isinstance(config, str) or config is None else None


def released_gpt_flags(ref: str | Path, config=None, kind: str | None = None, image_size: int | None = None,
                       downsample: int | None = None) -> tuple[object, str | None, int | None, int | None]:
    """(config, kind, image_size, downsample) filled in from a released name; no download."""
    text = str(ref)
    name = _name(text)
    if name is None:
        return config, kind, image_size, downsample
    if name.family == "vq":
        raise ArgenError(f"{text} is a tokenizer ({name.config}); pass it as --tokenizer, and a generator as --gpt")
    given = _config_name(config)
    if given is not None and given.lower() != name.config.lower():
        raise _contradiction(text, name, "gpt-config", given, name.config)
    if kind is not None and kind != name.kind:
        raise _contradiction(text, name, "kind", kind, name.kind)
    if downsample is not None and downsample != name.downsample:
        raise _contradiction(text, name, "downsample", downsample, name.downsample)
    return (name.config if config is None else config), name.kind, \
        (name.image_size if image_size is None else image_size), name.downsample


def gpt_arguments(ref: str | Path, config=None, kind: str | None = None, image_size: int | None = None,
                  downsample: int | None = None) -> tuple[Path, object, str | None, int | None, int | None]:
    """(path, config, kind, image_size, downsample) for `load_gpt`, filled in from a released name."""
    ref = repo_file_ref(ref)
    flags = released_gpt_flags(ref, config, kind, image_size, downsample)
    path, _ = resolve(ref)
    return (path, *flags)


def tokenizer_arguments(ref: str | Path, config=None) -> tuple[Path, object]:
    """(path, config) for `load_tokenizer`, filled in from a released name."""
    text = repo_file_ref(ref, "tokenizer")
    if text != str(ref):
        return tokenizer_arguments(text, config)
    name = _name(text)
    if name is not None and name.family == "gpt":
        raise ArgenError(f"{text} is a generator ({name.config} {name.kind}); pass it as --gpt, and a tokenizer "
                         f"as --tokenizer (for it: {name.tokenizer})")
    if name is not None:
        given = _config_name(config)
        if given is not None and given.lower() != name.config.lower():
            raise _contradiction(text, name, "tokenizer-config", given, name.config)
        config = name.config if config is None else config
    path, _ = resolve(ref)
    return path, config


def default_tokenizer(gpt_ref: str | Path) -> str | None:
    """The released tokenizer that goes with a released generator name (c2i_B_256 -> vq_ds16_c2i)."""
    text = str(gpt_ref)
    if text in BUNDLED_TOKENIZER and not Path(text).exists():
        return BUNDLED_TOKENIZER[text]
    if _repo_ref(text) is not None or (Path(text).is_dir() and (Path(text) / MANIFEST).is_file()):
        return repo_file_ref(text, "tokenizer")
    source = _hub_source(text)
    name = released_name(source[1] if source else text)
    if name is None or name.family != "gpt":
        return None
    if source is not None and text.startswith(HF_PREFIX):
        repo, _, revision = source
        return f"{HF_PREFIX}{repo}{'@' + revision if revision else ''}/{name.tokenizer}.pt"
    if source is None:  # a local released file: its tokenizer beside it, if it is there
        sibling = Path(text).parent / f"{name.tokenizer}.pt"
        if sibling.is_file():
            return str(sibling)
    return name.tokenizer


def checkpoint_record(ref: str | Path) -> str:
    """How a run records the checkpoint it used: the hub reference for a hub file, else the absolute path."""
    text = str(ref)
    if _repo_ref(text) is not None:
        return text.rstrip("/")
    source = _hub_source(text)
    if source is None:
        return str(Path(text).resolve())
    repo, filename, revision = source
    return _hub_url(repo, revision, filename)


def model_id(ref: str | Path) -> str:
    """A short model name: the released name, else the file or folder name without its suffix."""
    text = str(ref).rstrip("/")
    whole = _repo_ref(text)
    if whole is not None:
        return whole[0].split("/")[1]
    source = _hub_source(text)
    name = released_name(source[1] if source else text)
    if name is not None:
        return name.name
    path = Path(source[1] if source else text)
    stem = path.parent.name if path.suffix == ".safetensors" and path.stem == "gpt" else path.stem
    return stem or "argen"


def gpt_class_names(ref: str | Path, num_classes: int) -> list[str] | None:
    """Class names for a c2i generator: those stored in an argen file, ImageNet's for a released
    1000-class file, else None."""
    path, _ = resolve(ref)
    file = path / "gpt.safetensors" if path.is_dir() else path
    if file.suffix == ".safetensors":
        sidecar = file.with_suffix(".json")
        names = None
        if sidecar.is_file():
            try:
                names = json.loads(sidecar.read_text(encoding="utf-8")).get("class_names")
            except (OSError, ValueError):
                names = None
        if names is None:
            names = _safetensors_class_names(file)
        if isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names):
            return names
        return None
    return list(imagenet_class_names()) if num_classes == len(imagenet_class_names()) else None


def _safetensors_class_names(file: Path):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            meta = handle.metadata() or {}
        return json.loads(meta.get("argen", "{}")).get("class_names")
    except (SafetensorError, OSError, ValueError):
        return None
