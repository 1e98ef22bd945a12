"""Fine-tuning from released or argen weights (`argen train --init-from REF`): what the init and the data
must agree on, and how the parts that change start.

Contract (every refusal is an `ArgenError`, raised before the run writes anything):
- `check_flags(cfg)`: --class-init, --class-map, --reinit and --allow-tokenizer-change need --init-from.
- `finetune_config(cfg, init, shape, source, encoder)` -> the generator config of the run: the init's
  architecture (`argen.checkpoint.init_weights`) with the data shape of the codes
  (`argen.training.shape`). The codes must be of the init's kind. The image size may differ (the
  RoPE table is not stored). t2i: the caption features must be as wide as the init's caption
  projection takes (2048, FLAN-T5-XL, for the released models) unless `cfg.reinit == "caption-proj"`,
  and the caption length stays the init's (its unconditional caption is stored) unless the projection
  is reinitialised.
- `check_tokenizer(init, ds, allow_change)` -> (the tokenizer record the run's generator stores, notes).
  The codes' vocabulary must be the init's; a mismatch names both sizes and both tokenizers. The codes
  record their tokenizer's weights (`tokenizer_sha256`, argen.data.extract) and config; the init's
  tokenizer is the one an argen generator records, else the one a released or bundled name implies
  (`hub.default_tokenizer`, loaded to hash its weights). Different weights of the same vocabulary are
  refused unless `allow_change`. Where one side records nothing, a note says the check was skipped.
- `plan_classes(init, names, num_classes, class_init, class_map, source)` -> (where each class row
  starts, or None to keep the init's table; notes), without the weights; `class_table(init, starts)`
  builds the new table from the weights. The table is rebuilt when the codes' classes differ from the
  init's (names compared case- and separator-insensitively; without names on either side, the counts;
  1000 ImageNet synset folders n01440764 ... in sorted order are ImageNet's classes). The null
  (unconditional) row, the init's last row, stays the last row. Each new row starts from: the init row
  named in `class_map` (a JSON file {class name: init class id or name}); else per `class_init`: "null"
  (the null row), "mean" (of the init's class rows), "imagenet" (the init class of the same name: for a
  released model the ImageNet class; a name without one is refused, listing close matches), or None
  (the class of the same name where there is one, else the mean).
- `apply_init(model, init, table, reinit)` copies the init's weights into `model` (strictly: every key,
  every shape), with the rebuilt class table, or leaving `model`'s fresh caption projection and
  unconditional caption when `reinit == "caption-proj"`.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

import torch

from argen.checkpoint import load_tokenizer
from argen.checkpoint.init_weights import GPTInit, describe
from argen.checkpoint.loading import load_strict
from argen.checkpoint.released import imagenet_class_names, released_name
from argen.data.codes import CodeDataset
from argen.models.gpt import GPTConfig
from argen.training.shape import build_model_config
from argen.utils.errors import ArgenError, CheckpointError

TABLE = "cls_embedding.embedding_table.weight"
CAPTION_KEYS = ("cls_embedding.cap_proj.fc1.weight", "cls_embedding.cap_proj.fc2.weight",
                "cls_embedding.uncond_embedding")
_WNID = re.compile(r"n\d{8}")


# ---------------------------------------------------------------------- config
def check_flags(cfg) -> None:
    """The fine-tuning flags need --init-from."""
    given = [flag for flag, value in (("--class-init", cfg.class_init), ("--class-map", cfg.class_map),
                                      ("--reinit", cfg.reinit),
                                      ("--allow-tokenizer-change", cfg.new_tokenizer)) if value]
    if given and not cfg.init_from:
        raise ArgenError(f"{', '.join(given)} only apply when fine-tuning: add --init-from")


def finetune_config(cfg, init: GPTInit, shape: dict, source: str, encoder: str | None = None) -> GPTConfig:
    """The run's generator config: the init's architecture, the data shape of the codes in `source` (their
    caption features made by `encoder`); see the module docstring."""
    base = init.config
    if shape["kind"] != base.kind:
        raise ArgenError(f"the codes in {source} are {shape['kind']} codes but --init-from {init.label} is a "
                         f"{base.kind} generator")
    if cfg.reinit == "caption-proj" and base.kind != "t2i":
        raise ArgenError(f"--reinit caption-proj is for text-to-image generators; {init.label} is {base.kind}")
    if base.kind == "t2i" and (cfg.class_init or cfg.class_map):
        raise ArgenError(f"--class-init and --class-map are for class-conditional generators; {init.label} is t2i")
    shape = dict(shape)
    if base.kind == "t2i" and cfg.reinit != "caption-proj":
        width = shape.get("caption_dim")
        if width is not None and width != base.caption_dim:
            raise ArgenError(f"the caption features ({encoder or 'their encoder'}) are {width} wide but "
                             f"{init.label}'s caption projection takes {base.caption_dim} (FLAN-T5-XL for the "
                             f"released models); extract them with that encoder, or pass --reinit caption-proj "
                             f"to learn a new projection (the text path then starts over)")
        if cfg.caption_len is not None and cfg.caption_len != base.caption_len:
            raise ArgenError(f"--caption-len {cfg.caption_len} but {init.label} stores an unconditional caption of "
                             f"{base.caption_len} tokens; drop the flag (longer captions keep their first "
                             f"{base.caption_len} tokens) or pass --reinit caption-proj")
        shape["caption_len"] = base.caption_len
    return build_model_config(cfg, shape, source, base=base)


# ---------------------------------------------------------------------- tokenizer
def codes_tokenizer(ds: CodeDataset) -> dict:
    """The tokenizer record of the codes (what a generator trained on them stores)."""
    config = ds.tokenizer if isinstance(ds.tokenizer, dict) else None
    return {"sha256": ds.meta.get("tokenizer_sha256"), "config": config, "name": None,
            "codebook_size": ds.codebook_size}


def _tokenizer_name(ref: str) -> str:
    name = released_name(ref)
    return name.name if name is not None else str(ref)


def _describe(record: dict) -> str:
    config = (record.get("config") or {}).get("name")
    parts = [record.get("name") or config or "an unnamed tokenizer"]
    if record.get("name") and config:
        parts.append(config)
    if record.get("sha256"):
        parts.append(f"weights sha256 {record['sha256'][:12]}")
    return f"{parts[0]} ({', '.join(parts[1:])})" if len(parts) > 1 else parts[0]


def _expected_name(init: GPTInit) -> str | None:
    if init.tokenizer is not None:
        return init.tokenizer.get("name") or (init.tokenizer.get("config") or {}).get("name")
    return _tokenizer_name(init.tokenizer_ref) if init.tokenizer_ref else None


def _init_record(init: GPTInit) -> dict | None:
    """The init's tokenizer: recorded with an argen generator, or loaded (and hashed) from its implied name."""
    if init.tokenizer is not None:
        return init.tokenizer
    if init.tokenizer_ref is None:
        return None
    from argen.data.extract import weights_sha256

    try:
        model = load_tokenizer(init.tokenizer_ref)
    except ArgenError as exc:
        raise ArgenError(f"cannot check that the codes come from {init.label}'s tokenizer "
                         f"{_tokenizer_name(init.tokenizer_ref)}: {exc}; pass --allow-tokenizer-change to skip "
                         f"the check") from exc
    return {"sha256": weights_sha256(model), "config": model.config.to_dict(),
            "name": _tokenizer_name(init.tokenizer_ref), "codebook_size": model.config.codebook_size}


def check_tokenizer(init: GPTInit, ds: CodeDataset, allow_change: bool) -> tuple[dict, list[str]]:
    """Refuse codes from another tokenizer (see the module docstring); -> (record to store, notes)."""
    codes = codes_tokenizer(ds)
    vocab = init.config.vocab_size
    expected = _expected_name(init)
    if ds.codebook_size != vocab:
        trained = f" (trained on {expected})" if expected else ""
        advice = f"extract the codes with --tokenizer {expected}" if expected else "extract them with its tokenizer"
        raise ArgenError(f"the codes in {ds.root} come from {_describe(codes)} with {ds.codebook_size} codes but "
                         f"--init-from {init.label} predicts {vocab} tokens{trained}; {advice}")
    if allow_change:
        return codes, [f"--allow-tokenizer-change: the tokenizer of the codes was not checked against "
                       f"{init.label}'s"]
    theirs = _init_record(init) if codes.get("sha256") else init.tokenizer
    if theirs is None:
        return codes, [f"could not check that the codes come from {init.label}'s tokenizer (one of them records "
                       f"no tokenizer); the vocabularies agree ({vocab})"]
    if codes.get("sha256") and theirs.get("sha256"):
        same = codes["sha256"] == theirs["sha256"]
    elif codes.get("config") and theirs.get("config") and codes["config"] != theirs["config"]:
        same = False
    else:
        return codes, [f"could not check that the codes come from {init.label}'s tokenizer (no weights hash on "
                       f"one side); the vocabularies agree ({vocab})"]
    if not same:
        raise ArgenError(f"the codes in {ds.root} come from {_describe(codes)} but --init-from {init.label} was "
                         f"trained on {_describe(theirs)}: the same {vocab}-token vocabulary with other meanings; "
                         f"extract the codes with --tokenizer {theirs.get('name') or expected or 'its tokenizer'}, "
                         f"or pass --allow-tokenizer-change to train on them anyway")
    return {**codes, "name": theirs.get("name")}, []


# ---------------------------------------------------------------------- classes
def normalize(name: str) -> str:
    """Class names compare case-insensitively, with _ and - as spaces."""
    return " ".join(re.sub(r"[_\-]+", " ", str(name)).lower().split())


def _lookup(names: list[str]) -> dict[str, int]:
    table: dict[str, int] = {}
    for i, name in enumerate(names):
        table.setdefault(normalize(name), i)  # a repeated name (ImageNet has two "crane") means its first id
    return table


def _close(name: str, names: list[str], lookup: dict[str, int]) -> str:
    matches = difflib.get_close_matches(normalize(name), list(lookup), n=3, cutoff=0.6)
    return f"close: {', '.join(repr(names[lookup[m]]) for m in matches)}" if matches else "no close match"


def _same_classes(init: GPTInit, names: list[str] | None, num_classes: int) -> bool:
    if num_classes != init.config.num_classes:
        return False
    if names is None or init.class_names is None:
        return True
    if [normalize(n) for n in names] == [normalize(n) for n in init.class_names]:
        return True
    return (init.class_names == list(imagenet_class_names()) and all(_WNID.fullmatch(n) for n in names)
            and list(names) == sorted(names))


def read_class_map(path: str, names: list[str], init: GPTInit) -> dict[str, int]:
    """{codes' class name: init row} from a JSON file of {class name: init class id or name}."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ArgenError(f"cannot read --class-map {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ArgenError(f"--class-map {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ArgenError(f"--class-map {path} must be a JSON object {{class name: ImageNet class id or name}}")
    ours = {normalize(n): n for n in names}
    strangers = [k for k in data if normalize(k) not in ours]
    if strangers:
        raise ArgenError(f"--class-map {path} names classes the codes do not have: "
                         f"{', '.join(map(repr, strangers))} (the codes' classes: {', '.join(map(repr, names))})")
    count, init_names = init.config.num_classes, init.class_names or []
    lookup = _lookup(init_names)
    rows, unknown = {}, []
    for key, value in data.items():
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < count:
                raise ArgenError(f"--class-map {path}: {key!r} -> {value} is not a class id of {init.label} "
                                 f"(0..{count - 1})")
            rows[ours[normalize(key)]] = value
        elif isinstance(value, str) and normalize(value) in lookup:
            rows[ours[normalize(key)]] = lookup[normalize(value)]
        elif isinstance(value, str):
            unknown.append(f"{value!r} ({_close(value, init_names, lookup)})")
        else:
            raise ArgenError(f"--class-map {path}: {key!r} -> {value!r} must be a class id or a class name")
    if unknown:
        raise ArgenError(f"--class-map {path} names classes {init.label} does not have: {'; '.join(unknown)}; use "
                         f"ids, or start those classes with --class-init mean or null")
    return rows


def plan_classes(init: GPTInit, names: list[str] | None, num_classes: int, class_init: str | None,
                 class_map: str | None, source: str) -> tuple[list | None, list[str]]:
    """Where each class row of the run starts: an init row id, "null" or "mean"; None keeps the init's table.
    Needs no weights, so a bad class map or name fails before they are read. -> (starts, notes)."""
    if _same_classes(init, names, num_classes):
        unused = [flag for flag, value in (("--class-init", class_init), ("--class-map", class_map)) if value]
        note = [f"{' and '.join(unused)} unused: the codes have {init.label}'s classes"] if unused else []
        return None, note
    if names is None and (class_map or class_init == "imagenet"):
        raise ArgenError(f"the codes in {source} record no class names, so classes cannot be matched by name; "
                         f"use --class-init mean or null")
    if class_init == "imagenet" and init.class_names is None:
        raise ArgenError(f"--class-init imagenet: {init.label} records no class names; use --class-init mean or "
                         f"null, or ids in --class-map")
    mapped = read_class_map(class_map, names, init) if class_map else {}
    init_names = init.class_names or []
    lookup = _lookup(init_names)
    starts, shown, unmatched = [], [], []
    for i in range(num_classes):
        name = names[i] if names is not None and i < len(names) else None
        row = mapped.get(name) if name is not None else None
        if row is None and class_init in (None, "imagenet") and name is not None:
            row = lookup.get(normalize(name))
        if row is not None:
            starts.append(row)
            shown.append(f"{name!r} <- {row} {init_names[row]!r}" if row < len(init_names) else f"{name!r} <- {row}")
        elif class_init == "imagenet":
            unmatched.append(f"{name!r} ({_close(name, init_names, lookup)})")
        else:
            starts.append("null" if class_init == "null" else "mean")
            shown.append(f"{name if name is not None else i!r} <- {'null row' if class_init == 'null' else 'mean'}")
    if unmatched:
        what = "ImageNet class" if init_names == list(imagenet_class_names()) else f"class of {init.label}"
        raise ArgenError(f"--class-init imagenet: no {what} is named {', '.join(unmatched)}; map them with "
                         f"--class-map FILE, or start them with --class-init mean or null")
    text = "; ".join(shown[:8]) + (f"; ... (+{len(shown) - 8} more)" if len(shown) > 8 else "")
    return starts, [f"class embedding rebuilt for {num_classes} classes (null row kept): {text}"]


def class_table(init: GPTInit, starts: list | None) -> torch.Tensor | None:
    """The rebuilt class-embedding table (K + 1, dim) from `plan_classes`'s starts; the null row last."""
    if starts is None:
        return None
    old = init.state[TABLE]  # (K0 + 1, dim): rows 0..K0-1 are classes, row K0 the null class
    count = init.config.num_classes
    null, mean = old[count], old[:count].mean(dim=0)
    rows = [null if s == "null" else mean if s == "mean" else old[s] for s in starts]
    return torch.stack([*rows, null]).clone()


# ---------------------------------------------------------------------- weights
def apply_init(model: torch.nn.Module, init: GPTInit, table: torch.Tensor | None, reinit: str | None) -> None:
    """Copy the init's weights into `model` (see the module docstring)."""
    state = dict(init.state)
    if table is not None:
        state[TABLE] = table
    if reinit == "caption-proj":
        fresh = model.state_dict()
        state.update({k: fresh[k] for k in CAPTION_KEYS})
    try:
        load_strict(model, state, f"--init-from {init.label}", f"the run's generator {describe(model.config)}")
    except CheckpointError as exc:
        raise ArgenError(str(exc)) from None
