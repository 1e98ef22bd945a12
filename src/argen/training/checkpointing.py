"""Training-state checkpoints: atomic files, a `latest` pointer, keep the last N.

Layout under the checkpoint folder:
- `step-{step:08d}.pt`: one complete training state (a dict of tensors and plain Python values,
  readable with `torch.load(weights_only=True)`), written to a temp file and renamed into place.
- `latest`: the file name of the newest complete checkpoint, rewritten atomically only after that
  checkpoint is fully on disk. A crash or a full disk at any moment leaves `latest` pointing at an
  intact checkpoint.

`CheckpointManager.save(state, step)` writes, moves `latest`, then prunes all but the newest `keep`
files (never the one `latest` names). `load_latest()` returns the state or None.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from argen.utils.errors import ArgenError, CheckpointError
from argen.utils.io import atomic_write, atomic_write_bytes
from argen.utils.torch_utils import load_torch_file

LATEST = "latest"
_STEP_RE = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def write_state(state: dict, path: Path) -> None:
    torch.save(state, path)


class CheckpointManager:
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

    def latest_path(self) -> Path | None:
        pointer = self.directory / LATEST
        if not pointer.is_file():
            return None
        path = self.directory / pointer.read_text().strip()
        if not path.is_file():
            raise CheckpointError(f"{pointer} names {path.name}, which is missing; delete {pointer} to fall "
                                  f"back to an older checkpoint or start without --resume")
        return path

    def save(self, state: dict, step: int) -> Path:
        """Write the state for `step`, then point `latest` at it, then prune old files."""
        path = self.directory / checkpoint_name(step)
        atomic_write(path, lambda tmp: write_state(state, tmp))
        atomic_write_bytes(self.directory / LATEST, (path.name + "\n").encode())
        current = path.name
        for _, old in self._steps()[:-self.keep]:
            if old.name != current:
                old.unlink(missing_ok=True)
        return path

    def load(self, path: Path) -> dict:
        try:
            return load_torch_file(path, what="training checkpoint")
        except ArgenError as exc:
            raise CheckpointError(f"{exc}; delete it and point {self.directory / LATEST} at an older one") from exc

    def load_latest(self) -> dict | None:
        path = self.latest_path()
        return None if path is None else self.load(path)
