"""Writing files so that a crash never leaves a half-written one (checkpoints, states, token caches)."""

from __future__ import annotations

import os
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[typing.BinaryIO], None]) -> None:
    """Write through a temp file in the same folder, fsync it and rename it over ``path``: all or nothing."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise
