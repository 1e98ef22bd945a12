"""Precomputed caption features sent over HTTP to a t2i server: decoding and checks.

Contract: `parse_captions(features, mask, caption_len, caption_dim)` -> list of `Caption`, one per
caption, each with left-padded features (caption_len, caption_dim) float32 (zero on padded slots)
and mask (caption_len,) float32 (1 on real tokens). Two forms, for `features` and `mask` alike:
- JSON lists. `features` is a list of captions, each a list of rows of `caption_dim` numbers.
  Without `mask` a caption holds its real tokens only (1..caption_len rows) and is left-padded
  here; with `mask` (a list of caption_len 0/1 values per caption) it has exactly caption_len rows.
- A string: base64 of a .npy file. `features` (B, L, D) float16/32/64; `mask` (B, caption_len) of
  bool, int or float 0/1. Without `mask` all L <= caption_len rows are real; with it L == caption_len.
A mask is left padded: zeros, then ones, with at least one 1. Values must be finite in float32.
Any problem raises `ArgenError` with a message naming the field, the caption and what to fix.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import ConfigDict, TypeAdapter, ValidationError

from argen.utils.errors import ArgenError

_STRICT = ConfigDict(strict=True)
_FEATURE_LISTS = TypeAdapter(list[list[list[float]]], config=_STRICT)  # (B, L_i, D)
_MASK_LISTS = TypeAdapter(list[list[bool | int | float]], config=_STRICT)  # (B, L)


@dataclass(frozen=True, eq=False)
class Caption:
    """One caption ready for the generator."""

    features: torch.Tensor  # (caption_len, caption_dim) float32, zero on padded slots
    mask: torch.Tensor  # (caption_len,) float32, 1 on real tokens (at the right end)
    tokens: int  # real tokens


def decode_npy(text: str, name: str, kinds: str) -> np.ndarray:
    """base64 of a .npy file -> array; only plain dtypes of the given kinds (numpy kind letters)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ArgenError(f"`{name}` is a string but not base64; send base64 of a .npy file, or JSON lists") from None
    stream = io.BytesIO(raw)
    try:  # parse the header ourselves: np.load would allocate whatever shape the header claims
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, EOFError) as exc:
        raise ArgenError(f"`{name}` is not a readable .npy file ({exc})") from None
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in kinds:
        raise ArgenError(f"`{name}` .npy has dtype {dtype}; expected {_KIND_NAMES[kinds]}")
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - stream.tell() != count * dtype.itemsize:
        raise ArgenError(f"`{name}` .npy header says {shape} {dtype} but holds {len(raw) - stream.tell()} data "
                         f"bytes, not {count * dtype.itemsize}")
    flat = np.frombuffer(raw, dtype=dtype, count=count, offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


_KIND_NAMES = {"f": "float16, float32 or float64", "bfiu": "bool, int or float 0/1 values"}


def _validated(adapter: TypeAdapter, value, name: str, form: str):
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "".join(f"[{i}]" for i in first["loc"])
        raise ArgenError(f"`{name}{where}`: {first['msg']}; `{name}` must be {form}") from None


def _feature_arrays(features, caption_dim: int) -> list[np.ndarray]:
    """Either form -> list of (L_i, D) float32 arrays (not yet checked against caption_len)."""
    if isinstance(features, str):
        array = decode_npy(features, "features", "f")
        if array.ndim != 3:
            raise ArgenError(f"`features` .npy must be (captions, tokens, {caption_dim}), got shape {array.shape}")
        arrays = list(array)
    else:
        lists = _validated(_FEATURE_LISTS, features, "features",
                           "a list of captions, each a list of rows of numbers, or a base64 .npy string")
        arrays = []
        for i, caption in enumerate(lists):
            if not caption:
                raise ArgenError(f"`features[{i}]` is empty; a caption needs at least one row of {caption_dim} numbers")
            widths = {len(row) for row in caption}
            if len(widths) > 1:
                raise ArgenError(f"`features[{i}]`: rows have different lengths {sorted(widths)}; each row must "
                                 f"hold {caption_dim} numbers")
            arrays.append(np.array(caption, dtype=np.float64).reshape(len(caption), widths.pop()))
    if not arrays:
        raise ArgenError("`features` is empty; send at least one caption")
    out = []
    for i, array in enumerate(arrays):
        if array.shape[-1] != caption_dim:
            raise ArgenError(f"`features[{i}]` rows are {array.shape[-1]} wide but this generator takes "
                             f"{caption_dim}-wide caption features (caption_dim); encode captions with the "
                             f"text encoder it was trained with")
        with np.errstate(over="ignore"):
            array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ArgenError(f"`features[{i}]` holds NaN, inf or values beyond float32; send finite numbers")
        out.append(array)
    return out


def _mask_array(mask, captions: int, caption_len: int) -> np.ndarray:
    """Either form -> (B, caption_len) bool, checked: 0/1, left padded, at least one real token."""
    if isinstance(mask, str):
        array = decode_npy(mask, "mask", "bfiu")
    else:
        rows = _validated(_MASK_LISTS, mask, "mask", "a list of 0/1 lists, one per caption, or a base64 .npy string")
        lengths = {len(row) for row in rows}
        if len(lengths) > 1:
            raise ArgenError(f"`mask` rows have different lengths {sorted(lengths)}; each must hold {caption_len}")
        array = np.array(rows, dtype=np.float64).reshape(len(rows), lengths.pop() if lengths else 0)
    if array.shape != (captions, caption_len):
        raise ArgenError(f"`mask` must be ({captions} captions, {caption_len} tokens), got shape {array.shape}")
    if not np.isin(array, (0, 1)).all():
        raise ArgenError("`mask` values must be 0 (padding) or 1 (real token)")
    real = array.astype(bool)
    for i, row in enumerate(real):
        if not row[-1] or (np.diff(row.astype(np.int8)) < 0).any():
            raise ArgenError(f"`mask[{i}]` must be left padded: zeros, then ones, ending in at least one 1")
    return real


def parse_captions(features, mask, caption_len: int, caption_dim: int) -> list[Caption]:
    """Request `features` (+ optional `mask`) -> one `Caption` per caption; raises ArgenError."""
    arrays = _feature_arrays(features, caption_dim)
    captions = []
    if mask is None:
        for i, array in enumerate(arrays):
            if not 1 <= len(array) <= caption_len:
                raise ArgenError(f"`features[{i}]` has {len(array)} tokens; without `mask` each caption holds its "
                                 f"real tokens only, 1 to {caption_len} (caption_len) rows")
        real = [np.arange(caption_len) >= caption_len - len(a) for a in arrays]
    else:
        lengths = sorted({len(a) for a in arrays})
        if lengths != [caption_len]:
            raise ArgenError(f"with `mask`, every caption must have exactly {caption_len} (caption_len) rows, "
                             f"got {lengths}")
        real = list(_mask_array(mask, len(arrays), caption_len))
    for array, keep in zip(arrays, real):
        padded = np.zeros((caption_len, caption_dim), dtype=np.float32)  # (L, D)
        padded[caption_len - int(keep.sum()):] = array[-int(keep.sum()):]
        captions.append(Caption(torch.from_numpy(padded), torch.from_numpy(keep.astype(np.float32)),
                                int(keep.sum())))
    return captions
