"""Generator weights to start a training run from (`argen train --init-from REF`), from any reference.

Contract:
- `REF` is anything `--gpt` takes: a released name (`c2i_B_256`), an `hf://` reference, a released
  `.pt` file (by its released name or not), a bundled name (`demo-c2i`) or an argen generator
  (directory or `.safetensors`); `argen.checkpoint.hub.resolve` finds the file.
- `read_init(ref, config=None, weights=True)` -> `GPTInit`: the init's full config and, with
  `weights`, its tensors (float32 on the CPU, keys as argen's model names them). With
  `weights=False` a released name or an argen file is described without reading or downloading the
  weights (`load_weights(init)` reads them later; a file whose tensors contradict its name or metadata
  is a `CheckpointError`). `init_architecture(ref, config)` is `read_init(..., weights=False).config`.
  In both, the architecture (layers, width, heads, FFN size) comes from the weights:
  from an argen file's config, a released name's named config, or else the named config
  (`argen.models.gpt.GPT_CONFIGS`) whose width, depth, attention and FFN shapes match the tensors.
  The data-shape fields (kind, vocabulary, classes, caption width and length) come from the tensors.
  `config` (a name, e.g. from `--config`) that contradicts the init raises `ArgenError` naming both.
- `GPTInit.class_names`: the names stored with an argen generator, ImageNet's for a released
  1000-class file, else None. `GPTInit.tokenizer`: the tokenizer record an argen generator stores
  (`{"sha256", "config", "name"}`), else None. `GPTInit.tokenizer_ref`: the reference of the
  tokenizer a released or bundled generator was trained with (`hub.default_tokenizer`), else None.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from argen.checkpoint.hub import checkpoint_record, default_tokenizer, gpt_class_names, resolve
from argen.checkpoint.loading import _load_argen_weights, _read_argen_meta, _resolve_argen_file, build_gpt_config
from argen.checkpoint.released import (
    ReleasedName,
    extract_state_dict,
    imagenet_class_names,
    read_torch_file,
    released_name,
)
from argen.models.gpt import GPT_CONFIGS, GPTConfig, gpt_config
from argen.nn.llama import swiglu_hidden_dim
from argen.utils.errors import ArgenError, CheckpointError

ARCHITECTURE_FIELDS = ("dim", "n_layer", "n_head", "n_kv_head", "multiple_of", "ffn_dim_multiplier")


@dataclass
class GPTInit:
    """Weights and config of an init generator (see the module docstring)."""

    ref: str
    record: str  # how a run writes the reference down (hf://... or an absolute path)
    state: dict | None  # None until `load_weights`
    config: GPTConfig
    class_names: list[str] | None
    tokenizer: dict | None
    tokenizer_ref: str | None
    released: ReleasedName | None

    @property
    def label(self) -> str:
        return self.released.name if self.released else self.ref


def describe(cfg: GPTConfig) -> str:
    return f"{cfg.name} ({cfg.n_layer} layers, width {cfg.dim}, {cfg.n_head} heads)"


def _architecture(cfg: GPTConfig) -> tuple:
    return tuple(getattr(cfg, f) or (cfg.n_head if f == "n_kv_head" else None) for f in ARCHITECTURE_FIELDS)


def check_config(ref: str, init_cfg: GPTConfig, config: str | None) -> None:
    """Raise when the named architecture `config` (e.g. `--config`) contradicts the init's."""
    if config is None:
        return
    asked = gpt_config(config)
    if _architecture(asked) != _architecture(init_cfg):
        raise ArgenError(f"--config {config} contradicts --init-from {ref}, which is {describe(init_cfg)}: the "
                         f"architecture comes from the init weights; drop --config")


def _argen_file(path: Path) -> Path | None:
    return _resolve_argen_file(path, "gpt")


def init_architecture(ref: str, config: str | None = None) -> GPTConfig:
    """The init's config; a released name or an argen file answers without reading the weights."""
    return read_init(ref, config, weights=False).config


def _generator_name(ref: str) -> ReleasedName | None:
    name = released_name(ref)
    if name is not None and name.family != "gpt":
        raise ArgenError(f"--init-from {ref} is a tokenizer ({name.config}); give a generator, e.g. c2i_B_256")
    return name


def _tensor_architecture(state: dict) -> tuple:
    """(width, layers, wqkv rows, FFN hidden size) of a generator's tensors."""
    dim = state["tok_embeddings.weight"].shape[1]
    layers = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    qkv = state.get("layers.0.attention.wqkv.weight")
    hidden = state.get("layers.0.feed_forward.w1.weight")
    return dim, layers, None if qkv is None else qkv.shape[0], None if hidden is None else hidden.shape[0]


def _config_architecture(cfg: GPTConfig) -> tuple:
    kv = (cfg.n_kv_head or cfg.n_head) * (cfg.dim // cfg.n_head)
    return cfg.dim, cfg.n_layer, cfg.dim + 2 * kv, swiglu_hidden_dim(cfg.dim, cfg.multiple_of, cfg.ffn_dim_multiplier)


def _infer_named(state: dict, source: str, config: str | None) -> GPTConfig:
    """The named config (`config` when given) whose shapes match a released file's tensors."""
    found = _tensor_architecture(state)
    if config is not None:
        cfg = gpt_config(config)
        if _config_architecture(cfg) != found:
            raise ArgenError(f"--config {config} contradicts --init-from {source}, whose weights have "
                             f"{found[1]} layers of width {found[0]}; drop --config")
        return cfg
    for cfg in GPT_CONFIGS.values():
        if _config_architecture(cfg) == found:
            return cfg
    raise ArgenError(f"cannot tell the architecture of {source} from its weights ({found[1]} layers, width "
                     f"{found[0]}): pass --config NAME (one of {', '.join(GPT_CONFIGS)})")


def data_shape_of(state: dict, source: str) -> dict:
    """The data-shape fields the tensors fix: kind, vocab_size, num_classes or caption_dim/caption_len."""
    if "tok_embeddings.weight" not in state:
        raise CheckpointError(f"{source} holds no generator weights (no tok_embeddings.weight)")
    shape = {"vocab_size": int(state["tok_embeddings.weight"].shape[0])}
    if "cls_embedding.embedding_table.weight" in state:
        shape.update(kind="c2i", num_classes=int(state["cls_embedding.embedding_table.weight"].shape[0]) - 1)
    elif "cls_embedding.cap_proj.fc1.weight" in state:
        shape.update(kind="t2i", caption_dim=int(state["cls_embedding.cap_proj.fc1.weight"].shape[1]))
        if "cls_embedding.uncond_embedding" in state:
            shape["caption_len"] = int(state["cls_embedding.uncond_embedding"].shape[0])
    else:
        raise CheckpointError(f"{source} has neither a class embedding nor a caption projection")
    return shape


def read_init(ref: str, config: str | None = None, weights: bool = True) -> GPTInit:
    """The init generator's config and, with `weights`, its tensors (see the module docstring). Without
    `weights` nothing large is read or downloaded where the config is known without them (a released name,
    an argen file's metadata); `load_weights` then reads them."""
    ref = str(ref)
    name = _generator_name(ref)
    local = Path(ref)
    state, tokenizer = None, None
    if name is not None and not local.is_dir() and local.suffix != ".safetensors":
        cfg = build_gpt_config(name.config, kind=name.kind, image_size=name.image_size, downsample=name.downsample)
        check_config(ref, cfg, config)  # before any download
        names = list(imagenet_class_names()) if cfg.kind == "c2i" and cfg.num_classes == 1000 else None
    else:
        path, _ = resolve(ref)
        argen_file = _argen_file(path)
        if argen_file is not None:
            info = _read_argen_meta(argen_file, "gpt")
            cfg = GPTConfig.from_dict(info["config"])
            tokenizer = info.get("tokenizer") if isinstance(info.get("tokenizer"), dict) else None
        else:
            state = _released_state(path)
            cfg = _infer_named(state, str(path), config)
            cfg = replace(cfg, **data_shape_of(state, str(path)))
        check_config(ref, cfg, config)
        names = gpt_class_names(ref, cfg.num_classes) if cfg.kind == "c2i" else None
    init = GPTInit(ref=ref, record=checkpoint_record(ref), state=state, config=cfg, class_names=names,
                   tokenizer=tokenizer, tokenizer_ref=default_tokenizer(ref), released=name)
    return load_weights(init) if weights else init


def _released_state(path: Path) -> dict:
    return extract_state_dict(read_torch_file(path), str(path))


def load_weights(init: GPTInit) -> GPTInit:
    """Read (download) the init's tensors, as float32; they must have the shape its config says."""
    if init.state is None:
        path, _ = resolve(init.ref)
        argen_file = _argen_file(path)
        state = _load_argen_weights(argen_file) if argen_file is not None else _released_state(path)
        found = data_shape_of(state, str(path))
        wrong = {k: v for k, v in found.items() if getattr(init.config, k) != v}
        if wrong:
            found_text = ", ".join(f"{k} {v} (expected {getattr(init.config, k)})" for k, v in wrong.items())
            raise CheckpointError(f"{path} does not hold what its name or metadata says: {found_text}")
        init.state = state
    init.state = {k: (v.float() if v.is_floating_point() else v) for k, v in init.state.items()}
    return init


def null_row(init: GPTInit) -> torch.Tensor:
    """The unconditional (null) class row of a c2i init: the last row of its class table."""
    return init.state["cls_embedding.embedding_table.weight"][init.config.num_classes]
