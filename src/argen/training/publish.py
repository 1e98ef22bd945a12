"""Share a generator on the Hugging Face Hub (`argen push`): stage a folder, then upload it in one commit.

Contract:
- `find_model(path)` -> `Model`: what `path` holds. A generator: a training run folder (`gpt.safetensors` +
  `gpt.json`, usually with `train_config.json`, `log.jsonl` and `samples/`), a folder holding an exported
  `gpt.safetensors`, or an argen generator file `X.safetensors` (config in its metadata). A LoRA adapter: a
  folder in peft's layout (`adapter_config.json` + `adapter_model.safetensors`) that is argen's, i.e. has an
  `argen` entry in `adapter_config.json` or in the weights' safetensors metadata (`adapter_metadata`).
  Anything else is an `ArgenError` that says what an argen run holds.
- `tokenizer_for(model, given, config)` -> (reference, tokenizer to upload or None). The tokenizer is the
  one given, else the one the run trained its sample grids with (`train_config.json`), the released or
  bundled one the generator records, the bundled `demo-vq` when its weights hash to the recorded sha256, or a
  `tokenizer.safetensors` beside the generator; none of these is an error asking for `--tokenizer`. A
  released or bundled name or an hf:// reference is recorded as a reference (nothing uploaded); a local
  tokenizer is uploaded in argen's format, after checking its codebook against the generator's vocabulary
  and its weights against the sha256 the codes recorded.
- `stage(model, repo, out, ...)` writes the repository's files into the empty folder `out`: the weights
  (`gpt.safetensors` + `gpt.json`, or the adapter's files), `tokenizer.safetensors` + `.json` when uploaded,
  the manifest `argen.json` (`argen.checkpoint.hub.MANIFEST`: what `argen.load_gpt("hf://owner/name")`
  reads), `samples.png` (the grid given, else the run's last sample grid, else one generated for the first
  classes of a c2i generator) and `README.md`, the model card (`argen.training.model_card`). The generator
  is loaded strictly before it is staged.
- `push(...)`: the repository id is checked with huggingface_hub's validator, the folder with `find_model`,
  and a token must be found (`huggingface_hub.get_token`: `HF_TOKEN` or `hf auth login`), all before
  anything is staged;
  then the folder is staged in a temp dir and uploaded with `HfApi.create_repo(exist_ok=True)`,
  `create_branch` for a `revision`, and `upload_folder`: one commit, so the repository gets all files or
  none. Returns the commit URL. Hub errors are one-line `ArgenError`s.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from argen.checkpoint import load_gpt, load_tokenizer, save_tokenizer
from argen.checkpoint.bundled import BUNDLED, BUNDLED_TOKENIZER
from argen.checkpoint.hub import MANIFEST, MANIFEST_FORMAT, is_hub_reference
from argen.checkpoint.loading import _read_argen_meta
from argen.training.model_card import GRID, find_evaluations, read_json, render_card
from argen.utils.errors import ArgenError, CheckpointError
from argen.utils.io import atomic_write_json

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CARD = "README.md"


@dataclass
class Model:
    """An argen generator or LoRA adapter found at `path` (`find_model`)."""

    path: Path
    kind: str  # "generator" or "adapter"
    weights: Path  # gpt safetensors file, or the adapter folder
    info: dict  # the generator's metadata (gpt.json), or the adapter's argen metadata
    run_dir: Path | None = None  # the training run folder, when there is one
    train: dict = field(default_factory=dict)  # train_config.json's "train", when there is one


# ---------------------------------------------------------------------- what is being pushed
def adapter_metadata(folder: Path) -> dict | None:
    """The argen metadata of a peft-layout adapter folder, or None when it is not an argen adapter."""
    config_file = folder / ADAPTER_FILES[0]
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArgenError(f"cannot read {config_file}: {exc}") from None
    if isinstance(config.get("argen"), dict):
        return {**config["argen"], "peft": config}
    weights = folder / ADAPTER_FILES[1]
    if weights.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights), framework="pt") as handle:
                meta = handle.metadata() or {}
        except (SafetensorError, OSError) as exc:
            raise ArgenError(f"cannot read {weights}: {exc}") from None
        if "argen" in meta:
            return {**json.loads(meta["argen"]), "peft": config}
    return None


def find_model(path: str | Path) -> Model:
    """What `path` holds (see the module docstring); an `ArgenError` when it is not an argen run."""
    path = Path(path)
    what = ("an argen run is a folder from `argen train` (gpt.safetensors + gpt.json), an argen generator "
            ".safetensors file, or an argen LoRA adapter folder (adapter_config.json)")
    if not path.exists():
        raise ArgenError(f"{path} does not exist; {what}")
    if path.is_dir():
        adapter = adapter_metadata(path)
        if adapter is not None:
            return Model(path, "adapter", path, adapter)
        if (path / ADAPTER_FILES[0]).is_file():
            raise ArgenError(f"{path} is a peft adapter without argen metadata (an `argen` entry in "
                             f"adapter_config.json or the weights' metadata), so not an argen adapter")
        file = path / "gpt.safetensors"
        if not file.is_file():
            raise ArgenError(f"{path} is not an argen run: it has no gpt.safetensors; {what}")
    elif path.suffix == ".safetensors":
        file = path
    else:
        raise ArgenError(f"{path} is not an argen run; {what}")
    try:
        info = _read_argen_meta(file, "gpt")
    except CheckpointError as exc:
        raise ArgenError(f"{path} is not an argen run: {exc}; {what}") from None
    run_dir = file.parent if (file.parent / "train_config.json").is_file() else None
    train = read_json(run_dir / "train_config.json").get("train", {}) if run_dir else {}
    return Model(path, "generator", file, info, run_dir, train)


# ---------------------------------------------------------------------- tokenizer
def _is_reference(ref: str) -> bool:
    """A name argen resolves without a local file: bundled, released, hf://."""
    return not Path(ref).exists() and (ref in BUNDLED or is_hub_reference(ref))


def _weights_sha256(model) -> str:
    from argen.data.extract import weights_sha256

    return weights_sha256(model)


def tokenizer_for(model: Model, given: str | None = None, config: str | None = None):
    """(reference to record, VQModel to upload or None); see the module docstring."""
    record = model.info.get("tokenizer") if isinstance(model.info.get("tokenizer"), dict) else {}
    ref, source = given, "--tokenizer"
    if ref is None and model.train.get("tokenizer"):
        ref, source = str(model.train["tokenizer"]), f"{model.run_dir}/train_config.json"
    if ref is None and record.get("name"):
        ref, source = record["name"], "the generator's metadata"
    if ref is None and model.info.get("bundled_as") in BUNDLED_TOKENIZER:
        ref, source = BUNDLED_TOKENIZER[model.info["bundled_as"]], "the generator's metadata"
    if ref is None and record.get("sha256"):
        bundled = load_tokenizer("demo-vq")
        if _weights_sha256(bundled) == record["sha256"]:
            ref, source = "demo-vq", "the sha256 the codes recorded"
    if ref is None and model.kind == "adapter" and isinstance(model.info.get("tokenizer"), str):
        ref, source = str(model.info["tokenizer"]), "the adapter's metadata"
    if ref is None:
        beside = model.weights.parent / "tokenizer.safetensors"
        if model.kind == "generator" and beside.is_file():
            ref, source = str(beside), "the file beside the generator"
    if ref is None:
        raise ArgenError(f"cannot tell which tokenizer {model.path} decodes with (the run records none); pass "
                         f"--tokenizer (a tokenizer folder or file, or a released or bundled name)")
    if _is_reference(ref):
        return ref.removesuffix(".pt") if not ref.startswith("hf://") else ref, None
    if not Path(ref).exists():
        raise ArgenError(f"the tokenizer {ref} (from {source}) does not exist; pass --tokenizer")
    tokenizer = load_tokenizer(ref, config=config)
    vocab = (model.info.get("config") or {}).get("vocab_size")
    if vocab is not None and tokenizer.config.codebook_size != vocab:
        raise ArgenError(f"the tokenizer {ref} has {tokenizer.config.codebook_size} codes but the generator's "
                         f"vocabulary is {vocab}")
    if record.get("sha256") and _weights_sha256(tokenizer) != record["sha256"]:
        raise ArgenError(f"the tokenizer {ref} is not the one the generator's codes were made with (weights sha256 "
                         f"{record['sha256'][:12]}...); pass that one as --tokenizer")
    return "tokenizer.safetensors", tokenizer


# ---------------------------------------------------------------------- staging
def _grid(model: Model, given: str | None, tokenizer, tokenizer_ref: str, out: Path) -> bool:
    """Write out/samples.png; False when there is no grid to be had (an adapter or a t2i generator without one)."""
    if given is not None:
        if not Path(given).is_file():
            raise ArgenError(f"--grid {given} does not exist")
        shutil.copyfile(given, out / GRID)
        return True
    if model.run_dir is not None:
        grids = sorted((model.run_dir / "samples").glob("step-*.png"))
        if grids:
            shutil.copyfile(grids[-1], out / GRID)
            return True
    if model.kind != "generator":
        return False
    gpt = load_gpt(model.weights)
    if gpt.config.kind != "c2i":
        return False
    import torch

    from argen.training.generator import sample_grid

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_ref)
    classes = torch.arange(min(8, gpt.config.num_classes))
    sample_grid(gpt, tokenizer, classes, None, (model.info.get("sampling") or {}).get("cfg_scale", 1.0), 0,
                out / GRID)
    return True


def stage(model: Model, repo: str, out: str | Path, tokenizer: str | None = None, tokenizer_config: str | None = None,
          license_id: str = "other", grid: str | None = None, metrics: list[str] | None = None) -> Path:
    """Write the repository's files into `out` (created; it must not hold files). Returns `out`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ArgenError(f"{out} is not empty; stage into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_ref, tok_model = tokenizer_for(model, tokenizer, tokenizer_config)
    evaluations = find_evaluations(model, metrics)
    kind = (model.info.get("config") or {}).get("kind") or model.info.get("kind")
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "kind": kind, "tokenizer": tokenizer_ref,
                "generator": None}
    if model.kind == "generator":
        load_gpt(model.weights)  # only weights that load strictly are pushed
        shutil.copyfile(model.weights, out / "gpt.safetensors")
        atomic_write_json(out / "gpt.json", model.info)
        manifest["generator"] = "gpt.safetensors"
    else:
        for file in sorted(model.weights.iterdir()):
            if file.is_file() and file.suffix in (".json", ".safetensors") and file.name != MANIFEST:
                shutil.copyfile(file, out / file.name)
        manifest["adapter"] = {"files": list(ADAPTER_FILES), "base": model.info.get("base")
                               or model.info.get("peft", {}).get("base_model_name_or_path")}
    if tok_model is not None:
        save_tokenizer(tok_model, out)
    has_grid = _grid(model, grid, tok_model, tokenizer_ref, out)
    atomic_write_json(out / MANIFEST, manifest)
    (out / CARD).write_text(render_card(model, repo, tokenizer_ref, license_id, evaluations, has_grid),
                            encoding="utf-8")
    return out


# ---------------------------------------------------------------------- upload
def check_repo_id(repo: str) -> str:
    """`owner/name`, checked by huggingface_hub's own validator."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ArgenError(f"--repo {repo!r} is not a valid Hub repository id: {first}") from None
    if repo.count("/") != 1:
        raise ArgenError(f"--repo {repo!r} is not a valid Hub repository id: use owner/name")
    return repo


def hub_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ArgenError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN (a token with write "
                         "access) before pushing")
    return token


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What a failed Hub request raises: huggingface_hub's HTTP errors, and the transport errors (refused
    connection, timeout) of the HTTP client its session is built on (httpx or a fork of it)."""
    import importlib

    from huggingface_hub import get_session
    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [HfHubHTTPError, OSError, ValueError]
    client = importlib.import_module(type(get_session()).__module__.split(".")[0])
    base = getattr(client, "HTTPError", None)
    if isinstance(base, type) and issubclass(base, BaseException):
        errors.append(base)
    return tuple(errors)


def upload(folder: Path, repo: str, token: str, private: bool = False, revision: str | None = None,
           message: str | None = None) -> str:
    """Create the repository if needed and commit `folder` to it in one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    step = "create the repository"
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if revision is not None:
            step = f"create the branch {revision}"
            api.create_branch(repo, branch=revision, exist_ok=True, repo_type="model")
        step = "upload"
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", revision=revision,
                                 commit_message=message or "argen push")
    except _hub_errors() as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArgenError(f"could not {step} on the Hub for {repo}: {first} (nothing was committed)") from None
    return str(getattr(info, "commit_url", info))


def push(path: str | Path, repo: str, private: bool = False, revision: str | None = None,
         tokenizer: str | None = None, tokenizer_config: str | None = None, license_id: str = "other",
         grid: str | None = None, metrics: list[str] | None = None, stage_dir: str | Path | None = None,
         message: str | None = None) -> str:
    """Stage `path` and upload it to `repo` (see the module docstring); with `stage_dir`, stage there only
    (no token needed) and return that folder."""
    check_repo_id(repo)
    model = find_model(path)
    args = (tokenizer, tokenizer_config, license_id, grid, metrics)
    if stage_dir is not None:  # staged beside the target, renamed into place when complete
        target = Path(stage_dir)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ArgenError(f"--stage {target} already holds files; stage into a new folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".argen-stage-", dir=target.parent) as tmp:
            stage(model, repo, Path(tmp) / "repo", *args)
            if target.exists():
                target.rmdir()
            (Path(tmp) / "repo").rename(target)
        return str(target)
    token = hub_token()
    with tempfile.TemporaryDirectory(prefix="argen-push-") as tmp:
        folder = stage(model, repo, Path(tmp) / "repo", *args)
        return upload(folder, repo, token, private, revision, message)
