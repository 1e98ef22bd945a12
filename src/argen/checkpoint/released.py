"""Read released LlamaGen checkpoint files safely and strictly.

Files are torch pickles. They are opened with `weights_only=True`; the only extra class allowed is
`argparse.Namespace` (the training args stored beside the weights). The weights sit under
"model", "module", "state_dict" or "ema", or the file is a bare state dict (FSDP exports).

Released names (`released_name(ref)`): the stem of a released file name says its flags.
`c2i_L_384` is GPT-L, c2i, 384 px, VQ-16 (tokenizer `vq_ds16_c2i`); `t2i_XL_stage2_512` is GPT-XL,
t2i, 512 px, VQ-16 (`vq_ds16_t2i`); `vq_ds8_c2i` is VQ-8. `RELEASED_REPOS` says which Hugging Face
repository holds each published file (c2i in FoundationVision/LlamaGen, t2i in peizesun/llamagen_t2i).
`imagenet_class_names()` are the 1000 ImageNet class names, index = class id, for the c2i models
(`checkpoint/data/imagenet_classes.txt`, one per line, the short names torchvision's weights metadata uses).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import torch

from argen.utils.errors import ArgenError, CheckpointError
from argen.utils.torch_utils import load_torch_file

CONTAINER_KEYS = ("model", "module", "state_dict", "ema")
DERIVED_KEYS = ("freqs_cis",)


def read_torch_file(path: str | Path) -> object:
    """`torch.load(weights_only=True)` allowing only `argparse.Namespace`; every bad file is one
    `CheckpointError` line (`argen.utils.torch_utils.load_torch_file` names refused pickled objects)."""
    try:
        return load_torch_file(path, allowed=[argparse.Namespace], what="checkpoint")
    except CheckpointError:
        raise
    except ArgenError as exc:
        raise CheckpointError(str(exc)) from exc.__cause__


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(obj: object, source: str = "checkpoint", container: str | None = None) -> dict:
    """Find the weights inside a loaded checkpoint object and normalise the keys."""
    if container is not None:
        if not isinstance(obj, Mapping) or container not in obj:
            raise CheckpointError(f"{source} has no {container!r} entry")
        state = obj[container]
    elif _is_state_dict(obj):
        state = obj
    else:
        state = None
        if isinstance(obj, Mapping):
            for key in CONTAINER_KEYS:
                if key in obj and isinstance(obj[key], Mapping):
                    state = obj[key]
                    break
        if state is None:
            keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"{source} has no weights under any of {list(CONTAINER_KEYS)} and is not a "
                                  f"bare state dict (found {keys})")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in ("_orig_mod.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if k.split(".")[-1] not in DERIVED_KEYS}


# ------------------------------------------------------------------ released names
C2I_REPO = "FoundationVision/LlamaGen"
T2I_REPO = "peizesun/llamagen_t2i"
RELEASED_REPOS = {
    **{name: C2I_REPO for name in ("vq_ds16_c2i", "vq_ds8_c2i", "c2i_B_256", "c2i_B_384", "c2i_L_256",
                                   "c2i_L_384", "c2i_XL_384", "c2i_XXL_384", "c2i_3B_384")},
    **{name: T2I_REPO for name in ("vq_ds16_t2i", "t2i_XL_stage1_256", "t2i_XL_stage2_512")},
}
GPT_SIZES = {"B": "GPT-B", "L": "GPT-L", "XL": "GPT-XL", "XXL": "GPT-XXL", "3B": "GPT-3B"}
VQ_FOR_DOWNSAMPLE = {16: "VQ-16", 8: "VQ-8"}
_GPT_NAME = re.compile(r"(c2i)_(B|L|XL|XXL|3B)_(\d+)|(t2i)_(B|L|XL|XXL|3B)_stage\d+_(\d+)")
_VQ_NAME = re.compile(r"vq_ds(8|16)_(c2i|t2i)")


@dataclass(frozen=True)
class ReleasedName:
    """What a released file name says: family "gpt" or "vq" and the flags that go with it."""

    name: str  # the stem, e.g. "c2i_L_384"
    family: str
    config: str  # "GPT-L" or "VQ-16"
    kind: str  # c2i or t2i (for a tokenizer: the models it was released with)
    image_size: int | None = None  # generators only
    downsample: int = 16

    @property
    def tokenizer(self) -> str:
        """The released tokenizer this generator was trained on."""
        return f"vq_ds{self.downsample}_{self.kind}"

    def flags(self) -> dict:
        """The CLI flags this name stands for (as `--name value` text)."""
        if self.family == "vq":
            return {"tokenizer-config": self.config}
        return {"gpt-config": self.config, "kind": self.kind, "image-size": self.image_size,
                "downsample": self.downsample}


def released_name(ref: str | Path) -> ReleasedName | None:
    """The released name in `ref`'s file name (`c2i_B_256`, `.../c2i_B_256.pt`, `hf://.../c2i_B_256.pt`)."""
    stem = re.sub(r"\.(pt|pth|bin)$", "", str(ref).replace("\\", "/").rsplit("/", 1)[-1])
    if match := _GPT_NAME.fullmatch(stem):
        kind, size, pixels = match.group(1, 2, 3) if match.group(1) else match.group(4, 5, 6)
        return ReleasedName(stem, "gpt", GPT_SIZES[size], kind, int(pixels), 16)
    if match := _VQ_NAME.fullmatch(stem):
        downsample = int(match.group(1))
        return ReleasedName(stem, "vq", VQ_FOR_DOWNSAMPLE[downsample], match.group(2), None, downsample)
    return None


@cache
def imagenet_class_names() -> tuple[str, ...]:
    """ImageNet-1k class names, one per class id (0..999), as the released c2i models number them."""
    text = resources.files("argen.checkpoint").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())
