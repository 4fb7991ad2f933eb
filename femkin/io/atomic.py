"""Atomic file writes: a crash (or a killed job) leaves the old file or none, never half a file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(
    path: str | os.PathLike, writer: Callable[[Path], object], *, durable: bool = False
) -> Path:
    """Write ``path`` through ``writer(tmp)`` on a temporary file beside it, then rename.

    The temporary file (``.<name>.tmp<pid>`` in the same folder, so the rename stays on one
    file system and is atomic) is removed if ``writer`` fails.

    Args:
        path: the file to write.
        writer: writes the whole content to the path it is given.
        durable: flush the file to disk (``fsync``) before the rename, for files a run
            resumes from (checkpoints).

    Returns:
        ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        writer(tmp)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
