"""Device and dtype parsing, and safe reading of torch files, shared by the library and the CLI.

`load_torch_file(path, allowed=(), what=...)` opens a `torch.save` file with `weights_only=True`
(plus the classes in `allowed`) and turns every failure into one-line `ArgenError`s: a file holding
pickled objects that are not allowed names them (their code never runs); random bytes, truncated and
foreign files say so; a missing file says it does not exist.

`state_sha256(state)` / `weights_sha256(model)`: a sha256 naming a set of weights (names, shapes, dtypes,
bytes), e.g. the tokenizer that made some codes or the base an adapter was trained on.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

from argen.utils.errors import ArgenError

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ArgenError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16") from None


def parse_device(name: str | torch.device | None) -> torch.device:
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ArgenError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgenError(f"device {name!r} was asked for but CUDA is not available on this machine")
    return device


def _refused_globals(path: Path, exc: Exception) -> list[str]:
    """The globals a weights-only load refused, read from the file's pickle without running it."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError, OSError, pickle.UnpicklingError, EOFError):
        found = []
    if not found:
        found = re.findall(r"GLOBAL\s+([\w.]+)", str(exc))  # torch writes the name after an upper-case GLOBAL
    return list(dict.fromkeys(found))


def _detail(exc: Exception) -> str:
    """torch's own reason in one short line, without its advice to load with weights_only=False."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(exc).__name__


def load_torch_file(path: str | Path, allowed: Sequence[type] = (), what: str = "file", hint: str = ""):
    """`torch.load(path, weights_only=True)` on the CPU with one-line `ArgenError`s for every bad file."""
    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    if not path.is_file():
        raise ArgenError(f"{what} {path} does not exist")
    try:
        with torch.serialization.safe_globals(list(allowed)), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # random bytes: one line only
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if re.search(r"unsupported global", str(exc), flags=re.IGNORECASE):
            names = ", ".join(_refused_globals(path, exc)) or "unknown"
            raise ArgenError(f"{what} {path} holds pickled objects that are not allowed ({names}); refusing to "
                             f"load it, as that could run code from the file{suffix}") from exc
        raise ArgenError(f"cannot read {what} {path}: it is not a torch file, or it is truncated or corrupt "
                         f"({_detail(exc)}){suffix}") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError) as exc:
        raise ArgenError(f"cannot read {what} {path}: the file is truncated or corrupt "
                         f"({_detail(exc)}){suffix}") from exc
    except Exception as exc:  # arbitrary bytes can stop the weights-only unpickler anywhere (IndexError, ...)
        raise ArgenError(f"cannot read {what} {path}: it is not a torch file, or it is truncated or corrupt "
                         f"({type(exc).__name__}: {_detail(exc)}){suffix}") from exc


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict (sorted names, shapes, dtypes, bytes): which weights these are."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """`state_sha256` of a model's state dict (e.g. which tokenizer made the codes)."""
    return state_sha256(model.state_dict())
