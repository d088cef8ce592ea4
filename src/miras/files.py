"""Writing files so that a crash never leaves a half-written one (checkpoints, states, token caches)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[typing.BinaryIO], None]) -> None:
    """Write through a temp file in the same folder, fsync it and rename it over ``path``: all or nothing.
    The file gets the permissions a plain ``open(path, "w")`` would give it (0666 less the umask), not
    the temp file's private 0600."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # (an interrupt just after the rename: nothing to remove)
            os.unlink(temp)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """fsync a folder so that a rename in it outlives a power cut (where the system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse to fsync a folder
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` as the whole of ``path``, written as ``atomic_write`` writes."""
    atomic_write(path, lambda handle: handle.write(data))
    return Path(path)


def _umask() -> int:
    """The process's umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
