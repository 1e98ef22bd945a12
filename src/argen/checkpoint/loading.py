"""Load and save tokenizers and generators (released LlamaGen files and argen's own)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from argen.checkpoint.hub import gpt_arguments, tokenizer_arguments
from argen.checkpoint.released import extract_state_dict, read_torch_file
from argen.models.classifier import ClassifierConfig, ImageClassifier
from argen.models.gpt import GPT, GPTConfig, gpt_config
from argen.models.tokenizer import VQConfig, VQModel, vq_config
from argen.nn.packed import pack_linears
from argen.nn.quant import Int8Linear, is_quantized, quantize_int8
from argen.utils.errors import ArgenError, CheckpointError
from argen.utils.io import atomic_write, atomic_write_json

FORMAT = "argen"
FILE_STEMS = {"vq": "tokenizer", "gpt": "gpt", "classifier": "classifier"}
QUANTIZE_CHOICES = ("none", "int8")
CPU_KERNELS = ("aten", "packed")


# ------------------------------------------------------------------ strict loading
def load_strict(model: torch.nn.Module, state: dict, source: str, config_desc: str) -> None:
    """Copy `state` into `model`; fail naming every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                shown = ", ".join(items[:6]) + (f", ... (+{len(items) - 6} more)" if len(items) > 6 else "")
                parts.append(f"{len(items)} {label} key(s): {shown}")
        raise CheckpointError(f"{source} does not match {config_desc}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


# ------------------------------------------------------------------ argen format
def _resolve_argen_file(path: Path, family: str) -> Path | None:
    """The argen safetensors file at `path`, or None for a released (torch) file; a missing path is an error."""
    if not path.exists():
        what = {"vq": "tokenizer", "gpt": "generator", "classifier": "classifier"}[family]
        raise CheckpointError(f"{what} checkpoint {path} does not exist")
    if path.is_dir():
        candidate = path / f"{FILE_STEMS[family]}.safetensors"
        if not candidate.is_file():
            raise CheckpointError(f"{path} is a directory without {candidate.name}")
        return candidate
    if path.suffix == ".safetensors":
        return path
    return None


def _read_argen_meta(file: Path, family: str) -> dict:
    try:
        with safe_open(str(file), framework="pt") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {file}: the file is truncated or corrupt ({exc})") from exc
    if "argen" in meta:
        info = json.loads(meta["argen"])
    else:
        sidecar = file.with_suffix(".json")
        if not sidecar.is_file():
            raise CheckpointError(f"{file} carries no argen config and has no {sidecar.name} beside it")
        info = json.loads(sidecar.read_text())
    if info.get("family") != family:
        raise CheckpointError(f"{file} holds a {info.get('family')!r} model, not a {family!r} model")
    return info


def _load_argen_weights(file: Path) -> dict:
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {file}: the file is truncated or corrupt ({exc})") from exc


def _save_argen(model: torch.nn.Module, config_dict: dict, family: str, path: str | Path,
                extra: dict | None = None) -> Path:
    path = Path(path)
    file = path / f"{FILE_STEMS[family]}.safetensors" if path.suffix != ".safetensors" else path
    info = {"format": FORMAT, "family": family, "config": config_dict, **(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"argen": json.dumps(info, sort_keys=True)}
    atomic_write(file, lambda tmp: save_file(state, str(tmp), metadata=meta))
    atomic_write_json(file.with_suffix(".json"), info)
    return file


def _place_for_inference(model: torch.nn.Module, device, dtype) -> torch.nn.Module:
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


# ------------------------------------------------------------------ tokenizer
def save_tokenizer(model: VQModel, path: str | Path, extra: dict | None = None) -> Path:
    """Write `<path>/tokenizer.safetensors` (+ .json), or to `path` itself if it ends in .safetensors."""
    return _save_argen(model, model.config.to_dict(), "vq", path, extra)


def load_tokenizer(path: str | Path, config: str | VQConfig | None = None, device=None,
                   dtype: torch.dtype | None = None, container: str | None = None) -> VQModel:
    """Load a tokenizer in eval mode. Released files need `config` (e.g. "VQ-16") unless their released
    name says it; `path` may also be a released name or hub reference (`argen.checkpoint.hub`)."""
    path, config = tokenizer_arguments(path, config)
    argen_file = _resolve_argen_file(path, "vq")
    if argen_file is not None:
        info = _read_argen_meta(argen_file, "vq")
        cfg = VQConfig.from_dict(info["config"])
        if config is not None:
            asked = vq_config(config) if isinstance(config, str) else config
            if asked != cfg:
                raise CheckpointError(f"{argen_file} holds tokenizer config {cfg.name!r}, not {asked.name!r}")
        model = VQModel(cfg)
        load_strict(model, _load_argen_weights(argen_file), str(argen_file), f"tokenizer config {cfg.name!r}")
        return _place_for_inference(model, device, dtype)
    if config is None:
        raise ArgenError(f"{path} is a released (torch) checkpoint: pass the tokenizer config, e.g. "
                         f"config='VQ-16' (--tokenizer-config VQ-16)")
    cfg = vq_config(config) if isinstance(config, str) else config
    state = extract_state_dict(read_torch_file(path), str(path), container)
    model = VQModel(cfg)
    load_strict(model, state, str(path), f"tokenizer config {cfg.name!r}")
    return _place_for_inference(model, device, dtype)


# ------------------------------------------------------------------ classifier
def save_classifier(model: ImageClassifier, path: str | Path, extra: dict | None = None) -> Path:
    """Write `<path>/classifier.safetensors` (+ .json); `extra` holds the class names and provenance."""
    cfg = model.config
    return _save_argen(model, {**cfg.__dict__, "widths": list(cfg.widths)}, "classifier", path, extra)


def load_classifier(path: str | Path, device=None) -> tuple[ImageClassifier, dict]:
    """(classifier in eval mode, its metadata: class names, provenance) from an argen classifier file."""
    file = _resolve_argen_file(Path(path), "classifier")
    if file is None:
        raise CheckpointError(f"{path} is not an argen classifier (.safetensors)")
    info = _read_argen_meta(file, "classifier")
    cfg = ClassifierConfig(**{**info["config"], "widths": tuple(info["config"]["widths"])})
    model = ImageClassifier(cfg)
    load_strict(model, _load_argen_weights(file), str(file), "its classifier config")
    return _place_for_inference(model, device, None), info


# ------------------------------------------------------------------ generator
def build_gpt_config(config: str | GPTConfig, kind: str | None = None, image_size: int | None = None,
                     downsample: int | None = None, **overrides) -> GPTConfig:
    """Named config plus the released-file flags; for t2i the released caption width is 2048."""
    base = gpt_config(config) if isinstance(config, str) else config
    fields = {k: v for k, v in (("kind", kind), ("image_size", image_size), ("downsample", downsample))
              if v is not None}
    fields.update(overrides)
    if not fields:
        return base
    return GPTConfig.from_dict({**base.to_dict(), **fields})


def quantize_gpt(model: GPT, quantize: str | None, head: bool = False) -> GPT:
    """Quantise the generator's weights in place for decoding: "int8" swaps the transformer blocks'
    linear layers (and the output head if `head`) for per-channel int8 ones (`argen.nn.quant`); the
    embeddings, the norms and the caption projection stay as they are. None or "none": unchanged."""
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise ArgenError(f"unknown quantize {quantize!r}; choose from {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "int8":
        quantize_int8(model.layers)
        if head:
            model.output = Int8Linear.from_linear(model.output)
    return model


def save_gpt(model: GPT, path: str | Path, extra: dict | None = None) -> Path:
    """Write `<path>/gpt.safetensors` (+ .json), or to `path` itself if it ends in .safetensors."""
    if is_quantized(model):
        raise ArgenError("this generator is quantised for decoding; save the float model (and quantise it "
                         "when loading: load_gpt(..., quantize='int8'))")
    return _save_argen(model, model.config.to_dict(), "gpt", path, extra)


def load_gpt(path: str | Path, config: str | GPTConfig | None = None, kind: str | None = None,
             image_size: int | None = None, downsample: int | None = None, device=None,
             dtype: torch.dtype | None = None, container: str | None = None, quantize: str | None = None,
             lora=None, adapters=None, cpu_kernels: str = "aten") -> GPT:
    """Load a generator in eval mode. Released files need `config` and usually `kind`,
    `image_size` and `downsample`; argen files carry their own config (a different
    `image_size` may be given to sample at another resolution, since RoPE is not stored).
    `path` may also be a released name or hub reference; the name fills in the flags (`argen.checkpoint.hub`),
    or a bundled name (`demo-c2i`, `demo-t2i`). An argen file's recommended sampling settings (its
    metadata's `sampling`) become `model.sampling_defaults`.
    quantize: None/"none", or "int8" for int8 weight-only decoding (`quantize_gpt`; the weights are
    quantised from the file's values, before the cast to `dtype`). Such a model is for inference only.
    lora: LoRA adapters to merge into the weights (in float32, before quantising and casting): a directory,
    `"DIR:SCALE"`, a (dir, scale) pair, or a list of them (`argen.checkpoint.adapters`); each must have been
    trained on this base. The adapters' data shape (classes, image size) is the model's, unless
    `image_size` is given; `model.class_names` holds their class names. A folder may be `hf://owner/repo` (an
    adapter pushed with `argen push`, fetched through huggingface_hub).
    adapters: LoRA adapters to serve side by side, unmerged (batched LoRA, `argen.nn.lora`): a list of
    `"[NAME=]DIR[:SCALE]"` (DIR may be hf://...), or a dict NAME -> `"DIR[:SCALE]"`; a request picks one per
    image (`SlotRequest.adapter`, 0-based in this order), or none for the base. Not with `lora`.
    cpu_kernels: "aten" (default: torch's linear kernels, the tokens every test pins) or "packed" (the
    float linear layers multiply by oneDNN-reordered weight copies, `argen.nn.packed`: about 2x faster
    matrix multiplies when decoding on a CPU, a second copy of those weights in memory, and sampled
    tokens that may differ from aten's, rarely, in the last bits). "packed" needs a CPU model."""
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise ArgenError(f"unknown quantize {quantize!r}; choose from {', '.join(QUANTIZE_CHOICES)}")
    if cpu_kernels not in CPU_KERNELS:
        raise ArgenError(f"unknown cpu_kernels {cpu_kernels!r}; choose from {', '.join(CPU_KERNELS)}")
    if cpu_kernels == "packed" and device is not None and torch.device(device).type != "cpu":
        raise ArgenError(f"packed linear kernels are for a CPU model, and this one goes to {device}; "
                         f"leave cpu_kernels (--cpu-kernels) at aten")
    served = _read_served(adapters)
    if served and lora:
        raise ArgenError("give LoRA adapters either to merge (lora=, sample --lora) or to serve side by side "
                         "(adapters=, serve --lora), not both")
    adapters = _read_adapters(lora)  # before the base is read: a bad adapter fails fast
    ref, asked_size = path, image_size
    path, config, kind, image_size, downsample = gpt_arguments(path, config, kind, image_size, downsample)
    argen_file = _resolve_argen_file(path, "gpt")
    if argen_file is not None:
        info = _read_argen_meta(argen_file, "gpt")
        cfg = GPTConfig.from_dict(info["config"])
        if config is not None:
            asked = gpt_config(config) if isinstance(config, str) else config
            shape = ("dim", "n_layer", "n_head", "n_kv_head")
            if any(getattr(asked, f) != getattr(cfg, f) for f in shape):
                raise CheckpointError(f"{argen_file} holds generator config {cfg.name!r} "
                                      f"({cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.dim}), "
                                      f"not {asked.name!r}")
        if kind is not None and kind != cfg.kind:
            raise CheckpointError(f"{argen_file} is a {cfg.kind} generator, not {kind}")
        if image_size is not None or downsample is not None:
            cfg = build_gpt_config(cfg, image_size=image_size, downsample=downsample)
        model = GPT(cfg)
        load_strict(model, _load_argen_weights(argen_file), str(argen_file), f"generator config {cfg.name!r}")
        model.sampling_defaults = info.get("sampling")
        model = _with_adapters(model, ref, adapters, served, asked_size)
        return _for_kernels(_place_for_inference(quantize_gpt(model, quantize), device, dtype), cpu_kernels)
    if config is None:
        raise ArgenError(f"{path} is a released (torch) checkpoint: pass the generator config, e.g. "
                         f"config='GPT-B', kind='c2i', image_size=256, downsample=16")
    cfg = build_gpt_config(config, kind=kind, image_size=image_size, downsample=downsample)
    state = extract_state_dict(read_torch_file(path), str(path), container)
    model = GPT(cfg)
    desc = f"generator config {cfg.name!r} (kind={cfg.kind}, image_size={cfg.image_size}, downsample={cfg.downsample})"
    load_strict(model, state, str(path), desc)
    model = _with_adapters(model, ref, adapters, served, asked_size)
    return _for_kernels(_place_for_inference(quantize_gpt(model, quantize), device, dtype), cpu_kernels)


def _for_kernels(model: GPT, cpu_kernels: str) -> GPT:
    if cpu_kernels == "packed":
        pack_linears(model)
    return model


def _read_adapters(lora) -> list:
    if lora is None or (isinstance(lora, (list, tuple)) and not lora):
        return []
    from argen.checkpoint.adapters import fetch_adapter, parse_lora

    items = [lora] if isinstance(lora, (str, Path)) or (isinstance(lora, tuple) and len(lora) == 2
                                                         and not isinstance(lora[1], (str, Path, tuple))) else lora
    out = []
    for item in items:
        folder, scale = parse_lora(item)
        out.append((fetch_adapter(folder), scale))
    return out


def _read_served(adapters) -> list:
    """`adapters=` -> [(name, Adapter, scale)]."""
    if not adapters:
        return []
    from argen.checkpoint.adapters import fetch_adapter, parse_named_lora

    items = [f"{k}={v}" for k, v in adapters.items()] if isinstance(adapters, dict) else \
        [adapters] if isinstance(adapters, (str, Path)) else list(adapters)
    out = []
    for item in items:
        name, ref, scale = parse_named_lora(item)
        out.append((name, fetch_adapter(ref), scale))
    return out


def _with_adapters(model: GPT, ref, adapters: list, served: list, image_size: int | None) -> GPT:
    if served:
        from argen.checkpoint.adapters import attach_adapters

        return attach_adapters(model, ref, served, image_size=image_size)
    if not adapters:
        return model
    from argen.checkpoint.adapters import apply_adapters

    return apply_adapters(model, ref, adapters, image_size=image_size)
