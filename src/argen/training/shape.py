"""Size x shape: a named architecture plus the data shape read from the codes gives the generator config.

Contract:
- `data_shape(ds, store)` reads what the codes (`CodeDataset`) and their caption features
  (`TextFeatureStore`, t2i only) fix: kind, vocab_size (= the tokenizer's codebook size), image_size and
  downsample (grid = image_size / downsample), num_classes (c2i) and caption_dim / caption_len (t2i).
- `build_model_config(cfg, shape, source, base=None)` = `base` (the `--init-from` generator's config) or
  else `gpt_config(cfg.config or DEFAULT_CONFIG)` (architecture: layers, width, heads, dropout defaults)
  with every data-shape field replaced from `shape`, then the regularisation overrides of `cfg`
  (dropout, token dropout, drop path, class dropout).
- A data-shape value given in `cfg` (kind, vocab_size, image_size, num_classes, caption_len) must agree
  with the data; otherwise `ArgenError` says which flag contradicts which property of the data.
  `num_classes` may exceed the labels present; `caption_len` may differ from the features' length
  (captions are left padded or keep their first tokens).
"""

from __future__ import annotations

from dataclasses import replace

from argen.data.codes import CodeDataset
from argen.data.text_features import TextFeatureStore
from argen.models.gpt import DATA_SHAPE_FIELDS, GPTConfig, gpt_config
from argen.models.tokenizer import VQConfig
from argen.utils.errors import ArgenError

DEFAULT_CONFIG = "GPT-tiny"  # the architecture of a run given neither --config nor --init-from


def _downsample(ds: CodeDataset) -> int:
    grid = ds.grid[0]
    if ds.image_size and ds.image_size % grid == 0:
        return ds.image_size // grid
    if ds.tokenizer:
        try:
            return VQConfig.from_dict(ds.tokenizer).downsample
        except (ArgenError, TypeError):
            pass
    return 16


def data_shape(ds: CodeDataset, store: TextFeatureStore | None = None) -> dict:
    """The generator-config fields the data fixes (see the module docstring)."""
    h, w = ds.grid
    if h != w:
        raise ArgenError(f"the codes in {ds.root} have a {h}x{w} grid; the generator needs a square grid")
    downsample = _downsample(ds)
    shape = {"kind": ds.kind, "vocab_size": int(ds.codebook_size), "image_size": h * downsample,
             "downsample": downsample}
    if ds.kind == "c2i":
        labels = ds.labels
        top = int(labels.max()) + 1 if labels is not None and len(labels) else 1
        shape["num_classes"] = max(int(ds.num_classes or 0), top)
    elif store is not None:
        max_len = store.meta.get("max_length")
        lengths = store.lengths
        shape["caption_dim"] = int(store.dim)
        shape["caption_len"] = int(max_len) if max_len else int(lengths.max()) if len(lengths) else 1
    return shape


def check_explicit(cfg, shape: dict, source: str) -> None:
    """Raise when a data-shape value given in `cfg` contradicts the data in `source`."""
    if cfg.kind is not None and cfg.kind != shape["kind"]:
        raise ArgenError(f"--kind {cfg.kind} but {source} holds {shape['kind']} codes")
    if cfg.vocab_size is not None and cfg.vocab_size != shape["vocab_size"]:
        raise ArgenError(f"--vocab-size {cfg.vocab_size} but the codes in {source} come from a tokenizer with "
                         f"codebook size {shape['vocab_size']}")
    if cfg.image_size is not None and cfg.image_size != shape["image_size"]:
        grid = shape["image_size"] // shape["downsample"]
        raise ArgenError(f"--image-size {cfg.image_size} but the codes in {source} have a {grid}x{grid} grid "
                         f"from a downsample-{shape['downsample']} tokenizer, i.e. {shape['image_size']} px; "
                         f"extract codes at {cfg.image_size} px or drop the flag")
    if cfg.num_classes is not None and "num_classes" in shape and cfg.num_classes < shape["num_classes"]:
        raise ArgenError(f"--num-classes {cfg.num_classes} but the codes in {source} use class labels up to "
                         f"{shape['num_classes'] - 1}")


def build_model_config(cfg, shape: dict, source: str = "the codes", base: GPTConfig | None = None) -> GPTConfig:
    """Architecture (`base`, else `cfg.config`) + data shape + `cfg`'s regularisation overrides."""
    check_explicit(cfg, shape, source)
    fields = dict(shape)
    if cfg.num_classes is not None and fields.get("kind") == "c2i":
        fields["num_classes"] = cfg.num_classes
    if cfg.caption_len is not None and fields.get("kind") == "t2i":
        fields["caption_len"] = cfg.caption_len
    if cfg.drop_path is not None:
        fields["drop_path_rate"] = cfg.drop_path
    if cfg.dropout is not None:
        fields.update(token_dropout_p=cfg.dropout, resid_dropout_p=cfg.dropout, ffn_dropout_p=cfg.dropout)
    if cfg.token_dropout is not None:
        fields["token_dropout_p"] = cfg.token_dropout
    if cfg.class_dropout is not None:
        fields["class_dropout_prob"] = cfg.class_dropout
    unknown = set(shape) - set(DATA_SHAPE_FIELDS)
    if unknown:
        raise ArgenError(f"not data-shape fields: {sorted(unknown)}")
    return replace(base if base is not None else gpt_config(cfg.config or DEFAULT_CONFIG), **fields)
