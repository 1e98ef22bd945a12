"""LoRA adapters for generators: peft's file layout plus argen's record, read strictly, merged into a base.

Contract:
- An adapter is a directory with `adapter_config.json` (peft's `LoraConfig`, `peft_type` "LORA") and
  `adapter_model.safetensors` (peft's keys: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`,
  and `base_model.model.cls_embedding.*` when the run rebuilt the class rows or learned a new caption
  projection, which peft lists in `modules_to_save`). The safetensors metadata `argen` holds argen's
  record: `format`, `family` "lora", `base` and `base_sha256` (the base's identity, `base_identity`; peft's
  `base_model_name_or_path` is `base` too), `config` (the generator
  config the adapter was trained for: the base's architecture with the data shape of its codes),
  `class_names`, `tokenizer`, `training`, and `lora` (which must equal adapter_config.json). A
  training run's directory is such a directory. `save_adapter` writes both files atomically.
- `TARGET_GROUPS` / `target_modules(spec)`: `--lora-targets` takes comma-separated groups (attn = wqkv, wo;
  ffn = w1, w2, w3) and module names (wqkv, wo, w1, w2, w3, output); anything else is an `ArgenError`
  listing the valid names. `lora_config(rank, alpha, dropout, targets, extra)` -> peft `LoraConfig`
  (rank > 0; `extra` puts `cls_embedding` in `modules_to_save`). `lora_parameters(model, config)`
  counts an adapter's trainable parameters without building it.
- `base_identity(ref, state, record)`: `{"base": released name, "base_sha256": None}` for a released name (a
  released file keeps its name), else `{"base": record or ref, "base_sha256": state_sha256(state)}` of the
  base's float32 weights as argen names them. An adapter with a `base_sha256` fits only weights of that hash;
  one without, only a base of the released name `base`.
- `read_adapter(dir)` -> `Adapter`. Read as safetensors only; a missing directory or file, bad JSON, a
  config that is not LoRA, a truncated or foreign weights file, or two files that disagree is an
  `ArgenError` naming the file.
- `parse_lora(text)` -> (dir, scale) from `DIR[:SCALE]` (scale 1 by default).
- `apply_adapters(model, ref, adapters, image_size=None, merge=True)` -> a new generator: each (Adapter,
  scale) in turn is checked against the base (its identity must be `ref`'s, refused naming both; its
  config must be the base's architecture; every key and shape must fit) and merged into the weights
  (W + scale * alpha / r * B @ A, peft's merge, in float32), with the adapter's class rows or caption
  projection and its data shape (classes, image size; `image_size` overrides). At most one adapter may
  replace the condition embedding. With `merge=False` (one adapter) the peft layers stay in place,
  unmerged (to compare the two). `model.class_names` is set to the adapters' class names (or None).
- `merged_model(cfg, config, state)`: a plain generator from a training run's full (peft-injected) state.
- Serving many adapters at once, unmerged (`argen.nn.lora`): `parse_named_lora(text)` -> (name, ref, scale)
  from `[NAME=]REF[:SCALE]` (a bare REF is named after its folder or hub repository); `fetch_adapter(ref)`
  reads a local folder or `hf://owner/repo[@revision][/folder]` (the two files downloaded through
  `argen.checkpoint.hub`); `attach_adapters(model, ref, named, image_size)` checks every adapter as
  `apply_adapters` does (base identity, architecture, every key and shape) and installs them all as batched
  LoRA layers (`argen.nn.lora.install`): adapter k (1-based, in the given order) is row index k. An
  adapter's class rows or caption projection become its own condition embedding (a caption projection must
  take the base's caption shape: the server encodes prompts once). All adapters are served at one image
  size: `image_size`, else theirs when they agree (refused when they differ). `model.multi_lora.served`
  lists, per adapter, its name, path, scale and class names.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from argen.checkpoint.hub import HF_PREFIX, hub_folder
from argen.checkpoint.loading import build_gpt_config, load_strict
from argen.checkpoint.released import released_name
from argen.models.gpt import GPT, CaptionEmbedder, GPTConfig, LabelEmbedder
from argen.nn.lora import install
from argen.utils.errors import ArgenError, CheckpointError
from argen.utils.io import atomic_write, atomic_write_json
from argen.utils.torch_utils import state_sha256

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's key prefix (a PeftModel wraps the base model as base_model.model)
ADAPTER = "default"  # peft's adapter name while an adapter is injected
TARGET_GROUPS = {"attn": ("wqkv", "wo"), "ffn": ("w1", "w2", "w3")}
MODULES = ("wqkv", "wo", "w1", "w2", "w3", "output")
EXTRA = "cls_embedding"  # rebuilt class rows or a new caption projection train and travel with the adapter
ARCHITECTURE = ("dim", "n_layer", "n_head", "n_kv_head", "multiple_of", "ffn_dim_multiplier", "rope_base",
                "norm_eps", "kind", "vocab_size", "downsample")


@dataclass
class Adapter:
    path: Path
    config: dict  # adapter_config.json
    state: dict  # peft keys without PREFIX
    info: dict  # argen's record

    @property
    def gpt_config(self) -> GPTConfig:
        return GPTConfig.from_dict(self.info["config"])

    @property
    def replaces_condition(self) -> bool:
        return any(k.startswith(EXTRA + ".") for k in self.state)


# ---------------------------------------------------------------------- configs
def target_modules(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """`attn,ffn` -> ["wqkv", "wo", "w1", "w2", "w3"]; unknown names fail listing the valid ones."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in TARGET_GROUPS and n not in MODULES]
    if unknown or not names:
        groups = "; ".join(f"{g} = {'+'.join(m)}" for g, m in TARGET_GROUPS.items())
        raise ArgenError(f"--lora-targets {','.join(names) or repr(spec)}: {', '.join(unknown) or 'nothing'} matches "
                         f"no module; valid: the groups {groups}, or the modules {', '.join(MODULES)}")
    out: list[str] = []
    for name in names:
        for module in TARGET_GROUPS.get(name, (name,)):
            if module not in out:
                out.append(module)
    return out


def lora_config(rank: int, alpha: float | None, dropout: float, targets, extra: bool, base: str | None = None):
    """peft's LoraConfig for `--lora-rank/--lora-alpha/--lora-dropout/--lora-targets`."""
    from peft import LoraConfig

    if rank is None or rank <= 0:
        raise ArgenError(f"--lora-rank must be a positive integer, got {rank}")
    if not 0 <= dropout < 1:
        raise ArgenError(f"--lora-dropout must lie in [0, 1), got {dropout}")
    return LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank), lora_dropout=float(dropout),
                      target_modules=target_modules(targets), bias="none",
                      modules_to_save=[EXTRA] if extra else None, base_model_name_or_path=base)


def lora_parameters(model: torch.nn.Module, modules: list[str], rank: int) -> int:
    """Parameters of rank-`rank` adapters on the linears named `modules` (works on the meta device)."""
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in modules)


def _released(ref: str | Path) -> str | None:
    """The released generator name `ref` stands for (a released file keeps its name), else None."""
    name = released_name(ref)
    local = Path(str(ref))
    if name is not None and name.family == "gpt" and not local.is_dir() and local.suffix != ".safetensors":
        return name.name
    return None


def base_identity(ref: str | Path, state: dict, record: str | None = None) -> dict:
    """Which base an adapter belongs to: a released name, else the sha256 of its weights (and where they were)."""
    name = _released(ref)
    if name is not None:
        return {"base": name, "base_sha256": None}
    return {"base": str(record or ref), "base_sha256": state_sha256(state)}


def _describe_base(info: dict) -> str:
    if not info.get("base_sha256"):
        return str(info.get("base"))
    return f"{info.get('base') or 'a generator'} (weights sha256 {info['base_sha256'][:12]})"


def _peft_json(config) -> dict:
    data = config.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in data.items()}


# ---------------------------------------------------------------------- files
def save_adapter(config, state: dict, out: str | Path, info: dict) -> Path:
    """Write `out/adapter_model.safetensors` (peft keys, argen's record in the metadata) and then
    `out/adapter_config.json`; `state` has peft's keys without the prefix (`get_peft_model_state_dict`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    peft = _peft_json(config)
    record = {"format": "argen", "family": "lora", **info, "lora": peft}
    tensors = {PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {"argen": json.dumps(record, sort_keys=True), "format": "pt"}
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    atomic_write_json(out / CONFIG_FILE, peft)
    return out


def is_adapter(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() or (path / WEIGHTS_FILE).is_file()


def read_adapter(path: str | Path) -> Adapter:
    """An adapter directory, read strictly (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise ArgenError(f"LoRA adapter {path} does not exist (expected a directory with {CONFIG_FILE} and "
                         f"{WEIGHTS_FILE})")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            more = " (a full fine-tune? pass it as --gpt)" if (path / "gpt.safetensors").is_file() else ""
            raise ArgenError(f"{path} is not a LoRA adapter: it has no {name}{more}")
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArgenError(f"cannot read {path / CONFIG_FILE}: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ArgenError(f"{path / CONFIG_FILE} is not a LoRA adapter config (peft_type "
                         f"{config.get('peft_type') if isinstance(config, dict) else None!r})")
    file = path / WEIGHTS_FILE
    try:
        with safe_open(str(file), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(file), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ArgenError(f"cannot read {file}: the file is truncated or corrupt ({exc})") from None
    try:
        info = json.loads(meta["argen"])
    except (KeyError, ValueError):
        raise ArgenError(f"{file} carries no argen record (base, config): it was not written by argen train") \
            from None
    if info.get("family") != "lora" or not isinstance(info.get("config"), dict) or not info.get("base"):
        raise ArgenError(f"{file} does not hold an argen LoRA adapter")
    if info.get("lora") != config:
        raise ArgenError(f"{path / CONFIG_FILE} and {file} disagree (written by different runs?)")
    strangers = [k for k in tensors if not k.startswith(PREFIX)]
    if strangers:
        raise ArgenError(f"{file} holds keys outside peft's layout: {', '.join(strangers[:4])}")
    state = {k[len(PREFIX):]: v for k, v in tensors.items()}
    return Adapter(path, config, state, info)


def parse_lora(text: str | Path | tuple) -> tuple[str, float]:
    """`DIR[:SCALE]` (or a (dir, scale) pair, or a path) -> (dir, scale)."""
    if isinstance(text, tuple):
        return str(text[0]), float(text[1])
    text = str(text)
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


# ---------------------------------------------------------------------- merging
def _inject(model: GPT, config: dict):
    """A peft LoraModel around `model` (condition embedding handled by the caller, not as modules_to_save)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    fields = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}
    fields.update(modules_to_save=None, inference_mode=True)
    try:
        return LoraModel(model, LoraConfig(**fields), ADAPTER)
    except (ValueError, TypeError) as exc:
        raise ArgenError(f"the adapter's config does not fit the generator: {exc}") from None


def _check_base(adapter: Adapter, ref: str, base: GPT, cache: dict) -> None:
    info = adapter.info
    if not info.get("base_sha256"):
        have = _released(ref)
        ok, here = have == info["base"], have or ref
    else:
        if "sha256" not in cache:  # hashed once for all adapters
            cache["sha256"] = state_sha256(base.state_dict())
        ok, here = cache["sha256"] == info["base_sha256"], f"{ref} (weights sha256 {cache['sha256'][:12]})"
    if not ok:
        raise ArgenError(f"LoRA adapter {adapter.path} was trained on {_describe_base(info)}, not on {here}; load it "
                         f"with that base (--gpt)")


def _fit(adapter: Adapter, base: GPT, image_size: int | None) -> GPTConfig:
    """The merged generator's config; refuses an adapter made for another architecture."""
    mine, theirs = adapter.gpt_config, base.config
    wrong = [f"{k} {getattr(mine, k)} vs {getattr(theirs, k)}" for k in ARCHITECTURE
             if getattr(mine, k) != getattr(theirs, k)]
    if not adapter.replaces_condition:
        wrong += [f"{k} {getattr(mine, k)} vs {getattr(theirs, k)}" for k in ("num_classes", "caption_dim",
                                                                             "caption_len")
                  if getattr(mine, k) != getattr(theirs, k)]
    if wrong:
        raise ArgenError(f"LoRA adapter {adapter.path} does not fit this generator (adapter vs generator: "
                         f"{'; '.join(wrong)})")
    fields = mine.to_dict()
    if image_size is not None:
        fields["image_size"] = image_size
    return GPTConfig.from_dict(fields)


def _lora_keys(state: dict) -> dict:
    """peft's saved keys (no adapter name) -> the injected module's keys."""
    out = {}
    for key, value in state.items():
        head, part, tail = key.rpartition(".lora_")
        kind, rest = tail.split(".", 1)
        out[f"{head}.lora_{kind}.{ADAPTER}.{rest}"] = value
    return out


def _one(base: GPT, adapter: Adapter, scale: float, image_size: int | None, merge: bool) -> GPT:
    cfg = _fit(adapter, base, image_size)
    model = GPT(cfg)
    state = base.state_dict()
    if adapter.replaces_condition:
        state = {k: v for k, v in state.items() if not k.startswith(EXTRA + ".")}
        state.update({k: v for k, v in adapter.state.items() if k.startswith(EXTRA + ".")})
    try:
        load_strict(model, state, f"LoRA adapter {adapter.path}", "the base generator with its condition embedding")
    except CheckpointError as exc:
        raise ArgenError(f"LoRA adapter {adapter.path} does not fit this generator: {exc}") from None
    lora = _inject(model, adapter.config)
    expected = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    given = _lora_keys({k: v for k, v in adapter.state.items() if not k.startswith(EXTRA + ".")})
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = [k for k in expected if k in given and given[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        shown = (missing + unexpected + misshaped)[:4]
        raise ArgenError(f"LoRA adapter {adapter.path} does not fit this generator: {len(missing)} missing, "
                         f"{len(unexpected)} unexpected and {len(misshaped)} mis-shaped adapter weights "
                         f"(e.g. {', '.join(shown)})")
    model.load_state_dict(given, strict=False)
    for module in model.modules():
        if hasattr(module, "set_scale"):
            module.set_scale(ADAPTER, scale)
    model.sampling_defaults = base.sampling_defaults
    return (lora.merge_and_unload() if merge else model).eval()


def apply_adapters(model: GPT, ref: str | Path, adapters: list[tuple[Adapter, float]], image_size: int | None = None,
                   merge: bool = True) -> GPT:
    """`model` (the float32 base loaded from `ref`) with `adapters` merged in (see the module docstring)."""
    replacing = [str(a.path) for a, _ in adapters if a.replaces_condition]
    if len(replacing) > 1:
        raise ArgenError(f"LoRA adapters {', '.join(replacing)} each bring their own class rows or caption "
                         f"projection; load one of them at a time")
    if not merge and len(adapters) != 1:
        raise ArgenError("an unmerged generator takes exactly one adapter")
    cache: dict = {}
    for adapter, _ in adapters:
        _check_base(adapter, str(ref), model, cache)  # every adapter against the base itself, before any merge
    names = None
    for adapter, scale in adapters:
        model = _one(model, adapter, scale, image_size, merge)
        if adapter.replaces_condition or names is None:
            names = adapter.info.get("class_names") or names
    model.class_names = names if model.config.kind == "c2i" else None
    return model


def merged_model(cfg: GPTConfig, config, state: dict) -> GPT:
    """A plain generator from a training run's full state (the peft-injected model's state dict)."""
    from peft.tuners.lora import LoraModel

    model = GPT(cfg)
    lora = LoraModel(model, config, ADAPTER)
    model.load_state_dict(state, strict=True)
    return lora.merge_and_unload().eval()


# ---------------------------------------------------------------------- serving many adapters, unmerged
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def parse_named_lora(text: str | Path) -> tuple[str, str, float]:
    """`[NAME=]REF[:SCALE]` -> (name, ref, scale); REF is a folder or `hf://owner/repo[@revision][/folder]`."""
    text = str(text)
    head, sep, rest = text.partition("=")
    name = None
    if sep and _NAME.fullmatch(head):
        name, text = head, rest
    ref, scale = parse_lora(text)
    if name is None:
        name = Path(ref.rstrip("/")).name.split("@")[0] if ref.startswith(HF_PREFIX) else Path(ref).resolve().name
    if not _NAME.fullmatch(name or ""):
        raise ArgenError(f"--lora {text}: the adapter's name {name!r} must be letters, digits, '_', '.' or '-'; "
                         f"name it with NAME={ref}")
    return name, ref, scale


def fetch_adapter(ref: str | Path) -> Adapter:
    """An adapter from a local folder, or from the Hub (`hf://owner/repo[@revision][/folder]`)."""
    text = str(ref)
    if not text.startswith(HF_PREFIX):
        return read_adapter(text)
    return read_adapter(hub_folder(text, (CONFIG_FILE, WEIGHTS_FILE)))


def _scaling(adapter: Adapter) -> float:
    config = adapter.config
    if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ArgenError(f"LoRA adapter {adapter.path} uses DoRA or per-module ranks, which argen cannot serve "
                         f"unmerged; merge it (argen merge-lora) and serve the result")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _stacks(model: GPT, adapters: list[tuple[Adapter, float]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per targeted linear: (a (K+1, R, in), b (K+1, R, out): B transposed) float32, entry 0 zeros, ranks padded
    to the largest of all, scale folded into b."""
    linears = {name: m for name, m in model.named_modules()
               if name.rsplit(".", 1)[-1] in MODULES and isinstance(m, torch.nn.Linear)}
    found: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for k, (adapter, scale) in enumerate(adapters, start=1):
        keys = [key for key in adapter.state if not key.startswith(EXTRA + ".")]
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key in keys:
            head, _, tail = key.rpartition(".lora_")
            pairs.setdefault(head, {})[tail.split(".", 1)[0]] = adapter.state[key].float()
        wrong = [h for h, p in pairs.items() if h not in linears or set(p) != {"A", "B"}
                 or p["A"].shape[1] != linears[h].in_features or p["B"].shape[0] != linears[h].out_features
                 or p["A"].shape[0] != p["B"].shape[1]]
        if wrong or not pairs:
            raise ArgenError(f"LoRA adapter {adapter.path} does not fit this generator: {len(wrong)} of its "
                             f"{len(pairs)} adapted layers are missing or mis-shaped here (e.g. "
                             f"{', '.join(wrong[:3]) or 'none adapted'})")
        factor = _scaling(adapter) * scale
        for head, p in pairs.items():
            found.setdefault(head, {})[k] = (p["A"], p["B"] * factor)
    out = {}
    count = len(adapters) + 1
    rank = max(a.shape[0] for per in found.values() for a, _ in per.values())  # one R for the whole model
    for head, per in found.items():
        linear = linears[head]
        a = torch.zeros(count, rank, linear.in_features)
        b = torch.zeros(count, rank, linear.out_features)
        for k, (ak, bk) in per.items():
            a[k, :ak.shape[0]] = ak
            b[k, :bk.shape[1]] = bk.T
        out[head] = (a, b)
    return out


def _embedder(adapter: Adapter, base: GPT, cfg: GPTConfig) -> torch.nn.Module:
    """The adapter's own condition embedding (its class rows, or its caption projection)."""
    theirs = base.config
    if cfg.kind == "c2i":
        module = LabelEmbedder(cfg.num_classes, cfg.dim)
    else:
        if (cfg.caption_dim, cfg.caption_len) != (theirs.caption_dim, theirs.caption_len):
            raise ArgenError(f"LoRA adapter {adapter.path} takes {cfg.caption_len} x {cfg.caption_dim} caption "
                             f"features but the base takes {theirs.caption_len} x {theirs.caption_dim}; a server "
                             f"encodes prompts once for every model, so serve it alone (argen merge-lora, then "
                             f"argen serve --gpt MERGED)")
        module = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.caption_len)
    state = {k[len(EXTRA) + 1:]: v for k, v in adapter.state.items() if k.startswith(EXTRA + ".")}
    try:
        load_strict(module, state, f"LoRA adapter {adapter.path}", "its condition embedding")
    except CheckpointError as exc:
        raise ArgenError(f"LoRA adapter {adapter.path} does not fit this generator: {exc}") from None
    return module


def _served_size(named: list[tuple[str, Adapter, float]], base: GPT, image_size: int | None) -> int:
    if image_size is not None:
        return image_size
    sizes = {GPTConfig.from_dict(a.info["config"]).image_size for _, a, _ in named}
    if len(sizes) > 1:
        listed = ", ".join(f"{name} {a.gpt_config.image_size} px" for name, a, _ in named)
        raise ArgenError(f"the adapters were trained at different image sizes ({listed}); one server generates "
                         f"one size: pass --image-size")
    return sizes.pop() if sizes else base.config.image_size


def attach_adapters(model: GPT, ref: str | Path, named: list[tuple[str, Adapter, float]],
                    image_size: int | None = None) -> GPT:
    """`model` (the float32 base from `ref`) serving every adapter of `named` unmerged (module docstring)."""
    names = [name for name, _, _ in named]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ArgenError(f"two adapters are named {', '.join(twice)}; name them apart with --lora NAME=DIR")
    cache: dict = {}
    for _, adapter, _ in named:
        _check_base(adapter, str(ref), model, cache)
    size = _served_size(named, model, image_size)
    configs = [_fit(adapter, model, size) for _, adapter, _ in named]
    if size != model.config.image_size:  # RoPE is not stored: the same weights at another grid
        moved = GPT(build_gpt_config(model.config, image_size=size))
        moved.load_state_dict(model.state_dict())
        moved.sampling_defaults, moved.class_names = model.sampling_defaults, getattr(model, "class_names", None)
        model = moved
    embedders = {k: _embedder(adapter, model, cfg) for k, ((_, adapter, _), cfg) in enumerate(zip(named, configs), 1)
                 if adapter.replaces_condition}
    lora = install(model, names, _stacks(model, [(a, s) for _, a, s in named]), embedders)
    lora.served = [{"name": name, "path": str(adapter.path), "scale": scale, "kind": cfg.kind,
                    "num_classes": cfg.num_classes if cfg.kind == "c2i" else None,
                    "class_names": (adapter.info.get("class_names") if adapter.replaces_condition else None)
                    if cfg.kind == "c2i" else None}
                   for (name, adapter, scale), cfg in zip(named, configs)]
    return model.eval()
