"""Training checkpoints: a set of named parts, one atomic file per step, a `latest` pointer, keep the last N.

`TrainingCheckpoint(directory, parts, keep, info)`: `parts` maps names to objects with `state_dict()` /
`load_state_dict()` (see `argen.training.parts`: model, optimizer, EMA, scheduler, grad scaler, data
position, RNG, settings that must match). `save(step)` gathers every part (collective under FSDP) and
the main rank writes `{"format": FORMAT, "step": step, "parts": {...}}`; `restore()` loads the newest
readable checkpoint into the parts in their order (put `Settings` parts first, so a mismatch is named
before any weights load) and returns its step, or 0 when there is none.

Layout under the checkpoint folder:
- `step-{step:08d}.pt`: one complete training state (tensors and plain Python values), written to a
  temp file and renamed into place through `argen.utils.io.atomic_write` (a full disk is a one-line
  error naming the filesystem and the space needed; the previous checkpoint stays intact). Read back
  with `torch.load(weights_only=True)` through `argen.utils.torch_utils.load_torch_file`: a file that
  holds other pickled objects is refused, naming them, and its code does not run.
- `latest`: the file name of the newest complete checkpoint, rewritten atomically after it is on disk.

Resuming from a corrupt, truncated or refused newest checkpoint falls back to the newest readable
older one and says so (a warning on the `argen.training` logger); when none is readable the error
names each file and why. A checkpoint of another format (an older argen) is refused with a clear error.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from argen.training import distributed as D
from argen.utils.errors import ArgenError, CheckpointError
from argen.utils.io import atomic_write, atomic_write_bytes
from argen.utils.torch_utils import load_torch_file

log = logging.getLogger("argen.training")
LATEST = "latest"
FORMAT = 2  # 1: the PR-era generator dict and the tokenizer's train_state.pt; 2: named parts
_STEP_RE = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def write_state(state: dict, path: Path) -> None:
    torch.save(state, path)


def state_bytes(state) -> int:
    """The tensor bytes in a nested state (what the file needs, less a little pickle overhead)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


class CheckpointManager:
    """The files: `step-*.pt` written atomically, `latest`, pruning, newest-readable loading."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory)
        self.keep = max(1, int(keep))

    def _steps(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _STEP_RE.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def exists(self) -> bool:
        return bool(self._steps())

    def save(self, state: dict, step: int) -> Path:
        """Write the state for `step`, then point `latest` at it, then prune old files."""
        path = self.directory / checkpoint_name(step)
        atomic_write(path, lambda tmp: write_state(state, tmp), size=state_bytes(state))
        atomic_write_bytes(self.directory / LATEST, (path.name + "\n").encode())
        for _, old in self._steps()[:-self.keep]:
            if old.name != path.name:
                old.unlink(missing_ok=True)
        return path

    def load(self, path: Path) -> dict:
        return load_torch_file(path, what="training checkpoint")

    def _candidates(self) -> list[Path]:
        """Newest first: the file `latest` names, then every step file by descending step."""
        ordered = [p for _, p in reversed(self._steps())]
        pointer = self.directory / LATEST
        if pointer.is_file():
            named = self.directory / pointer.read_text().strip()
            if named in ordered:
                ordered.remove(named)
                ordered.insert(0, named)
        return ordered

    def load_newest(self) -> tuple[dict, Path] | None:
        """The newest readable checkpoint and its path, or None when there is no checkpoint at all."""
        failures = []
        for path in self._candidates():
            try:
                state = self.load(path)
            except ArgenError as exc:
                failures.append(f"{path.name}: {exc}")
                log.warning("skipping an unreadable checkpoint: %s", exc)
                continue
            if failures:
                log.warning("resuming from %s: the newer checkpoint(s) could not be read (%s)", path,
                            "; ".join(failures))
            return state, path
        if failures:
            raise CheckpointError(f"no readable training checkpoint in {self.directory} ({'; '.join(failures)}); "
                                  f"delete the folder to start the run again")
        return None


class TrainingCheckpoint:
    """Named parts saved and restored together (see the module docstring)."""

    def __init__(self, directory: str | Path, parts: dict, keep: int = 2, info: D.DistInfo | None = None):
        self.files = CheckpointManager(directory, keep)
        self.parts = parts
        self.info = info or D.DistInfo()
        self.restored_from: Path | None = None

    @property
    def directory(self) -> Path:
        return self.files.directory

    def exists(self) -> bool:
        return self.files.exists()

    def save(self, step: int) -> None:
        state = {"format": FORMAT, "step": int(step), "parts": {n: p.state_dict() for n, p in self.parts.items()}}
        if self.info.is_main:
            self.files.save(state, step)
        D.barrier(self.info)

    def restore(self) -> int:
        found = self.files.load_newest()
        if found is None:
            return 0
        state, path = found
        if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("parts"), dict):
            raise CheckpointError(f"{path} was written by another version of argen (checkpoint format "
                                  f"{state.get('format', 1) if isinstance(state, dict) else '?'}, this one reads "
                                  f"{FORMAT}); start a new run in another --out")
        saved = state["parts"]
        missing = [n for n in self.parts if n not in saved]
        extra = [n for n in saved if n not in self.parts]
        if missing or extra:
            raise CheckpointError(f"{path} holds the parts {', '.join(saved) or 'none'} but this run needs "
                                  f"{', '.join(self.parts)}; resume with the run's original settings")
        for name, part in self.parts.items():
            part.load_state_dict(saved[name])
        self.restored_from = path
        return int(state["step"])
