"""Read released LlamaGen checkpoint files safely and strictly.

Files are torch pickles. They are opened with `weights_only=True`; the only extra class allowed is
`argparse.Namespace` (the training args stored beside the weights). The weights sit under
"model", "module", "state_dict" or "ema", or the file is a bare state dict (FSDP exports).
"""

from __future__ import annotations

import argparse
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from argen.utils.errors import CheckpointError

CONTAINER_KEYS = ("model", "module", "state_dict", "ema")
DERIVED_KEYS = ("freqs_cis",)


def read_torch_file(path: str | Path) -> object:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()
        detail = detail[0] if detail else type(exc).__name__
        if "Unsupported global" in str(exc):
            raise CheckpointError(f"{path} holds objects that are not allowed in a weights file (refusing to "
                                  f"unpickle arbitrary code): {detail}") from exc
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated or corrupt ({detail})") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated or corrupt ({first})") from exc


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
