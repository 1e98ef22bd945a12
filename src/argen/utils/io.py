"""Atomic file writes, full-disk errors, and the run-directory lock.

Atomic writes: write to a temp file in the same folder, fsync, then rename. A crash or a full disk
during a write leaves the previous file intact and no temp file behind.

Full disks: every helper here (`atomic_path` and the `atomic_write*` functions built on it) turns a
full-disk failure into one `ArgenError` line naming the file, the filesystem (its mount point), the
free space and the bytes needed when known. Recognised failures: `OSError` with ENOSPC/EDQUOT, torch's
`RuntimeError` from `torch.save` on a full disk ("unexpected pos", "PytorchStreamWriter failed"), and
any error whose text carries the OS's "No space left on device" (e.g. safetensors' `SafetensorError`).
Code that writes outside these helpers can call `disk_full_error(exc, path)`.

Run lock: `with run_lock(directory, "argen train"):` takes an exclusive `fcntl.flock` on
`DIRECTORY/.argen.lock` (ranks other than 0 lock `.argen.rank{R}.lock`), writes the holder's pid, host,
command and start time into it, and refuses a second writer with an `ArgenError` naming the holder.
The kernel drops the lock when the holding process dies, so a stale lock file never blocks. The lock
is re-entrant within one process (nested `run_lock` on the same directory just counts).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from argen.utils.errors import ArgenError

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# substrings of full-disk failures that do not arrive as OSError (torch.save, safetensors)
_FULL_TEXTS = ("unexpected pos", "pytorchstreamwriter failed", "file write failed", "no space left on device",
               "os error 28", "disk quota exceeded", "os error 122")
_UMASK = os.umask(0o022)  # read the process umask (os.umask can only be read by setting it) ...
os.umask(_UMASK)  # ... and put it back at once
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile on a full disk


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) reports a full disk or an exceeded quota."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            text = str(exc).lower()
            if any(marker in text for marker in _FULL_TEXTS) or _SHORT_WRITE.search(text):
                return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def format_bytes(n: int | float) -> str:
    """`1536` -> `'1.5 KiB'`."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the filesystem that holds `path` (or its nearest existing parent)."""
    current = Path(os.path.abspath(path))
    while not current.exists() and current != current.parent:
        current = current.parent
    while not os.path.ismount(current) and current != current.parent:
        current = current.parent
    return current


def disk_full_error(exc: BaseException, path: str | os.PathLike, needed: int | None = None,
                    written: int | None = None, intact: bool | None = None) -> ArgenError | None:
    """The one-line `ArgenError` for a full disk while writing `path`, or None if `exc` is another error.

    `needed`: bytes the file needs, when known; `written`: bytes that reached the disk before it
    filled (a lower bound); `intact`: whether an older file under `path` is still in place."""
    if not is_disk_full(exc):
        return None
    final = Path(path)
    folder = final.parent if str(final.parent) else Path(".")
    quota = (isinstance(exc, OSError) and exc.errno == errno.EDQUOT) or "quota" in str(exc).lower()
    try:
        free = format_bytes(shutil.disk_usage(mount_point(folder) if not folder.exists() else folder).free)
    except OSError:
        free = "unknown"
    if needed:
        need = f"{format_bytes(needed)} needed"
    elif written:
        need = f"more than {format_bytes(written)} needed"
    else:
        need = "size needed unknown"
    if intact is None:
        intact = final.exists()
    tail = "the previous file is intact" if intact else "no partial file was left"
    what = "disk quota exceeded" if quota else "no space left on device"
    return ArgenError(f"{what} while writing {final}: the filesystem mounted at {mount_point(folder)} has "
                      f"{free} free, {need}; {tail}. Free some space and rerun")


def _clear_frames(exc: BaseException | None) -> None:
    """Drop the locals of the finished frames of `exc` and the exceptions it chains to."""
    for _ in range(8):
        if exc is None:
            return
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, size: int | None = None) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success rename it over `path`, on failure delete it.

    `size` (bytes), when known, is named in the full-disk error."""
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as exc:
        error = disk_full_error(exc, final, needed=size)
        if error is not None:
            raise error from exc
        raise
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; argen's outputs get the usual mode
    finally:
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException as exc:
        try:
            written = tmp.stat().st_size
        except OSError:
            written = None
        full = is_disk_full(exc)
        if full:  # finished writer frames (torch.save's) may still hold the temp file open and its space
            _clear_frames(exc)
        tmp.unlink(missing_ok=True)
        error = disk_full_error(exc, final, needed=size, written=written) if full else None
        if error is not None:
            raise error from exc
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], size: int | None = None) -> Path:
    """Call `write(tmp_path)` and atomically move the result to `path` (`size`: expected bytes, if known)."""
    with atomic_path(path, size=size) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path, size=len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    return atomic_write_bytes(path, data)


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write one array as an .npy file atomically (exactly `path`, no suffix added)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)

    with atomic_path(path, size=int(array.nbytes) + 128) as tmp:
        write(tmp)
    return Path(path)


def make_output_dir(out: str | os.PathLike) -> Path:
    """Create the output folder `out` (and its parents); a failure is one ArgenError line."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArgenError(f"cannot create the output directory {out}: {exc.strerror or exc}") from exc
    return out


def cache_dir() -> Path:
    """argen's per-user cache folder: `$ARGEN_CACHE`, else `~/.cache/argen` (not created here)."""
    return Path(os.environ.get("ARGEN_CACHE") or Path.home() / ".cache" / "argen")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's contents, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


LOCK_NAME = ".argen.lock"
_held: dict[Path, list] = {}  # resolved lock path -> [fd, depth], for re-entrant use in one process
_held_guard = threading.Lock()


def lock_path(directory: str | os.PathLike, rank: int = 0) -> Path:
    """The lock file of a run directory (rank 0, or a single process) or of one rank's share of it."""
    name = LOCK_NAME if rank == 0 else f".argen.rank{rank}.lock"
    return Path(directory) / name


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return (f"pid {info['pid']} ({info['command']}) on {info['host']}, started at {info['started']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike, command: str, rank: int = 0) -> Iterator[Path]:
    """Hold the run directory's exclusive lock for the block; refuse if another process holds it."""
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise ArgenError(f"{folder} exists and is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArgenError(f"cannot create the run directory {folder}: {exc.strerror or exc}") from exc
    path = lock_path(folder, rank).resolve()
    with _held_guard:
        if path in _held:
            _held[path][1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _held_guard:
                _held[path][1] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ArgenError(f"{folder} is in use by {_holder(path)}; wait for it to finish, stop it, or use "
                             f"another output directory") from None
        raise
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError:
        pass  # the lock itself is held; only the holder description could not be written (full disk)
    with _held_guard:
        _held[path] = [fd, 1]
    try:
        yield path
    finally:
        with _held_guard:
            del _held[path]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
