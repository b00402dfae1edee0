# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Writing files so that a crash never leaves half of one: every report, history and checkpoint of the bundle is
written to a temporary name in the same folder and renamed over the target (``os.replace`` is atomic on POSIX
and Windows), so the target is always either the old file or the new one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "atomic_path"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """
    A temporary path beside ``path`` to write to; on a clean exit it replaces ``path``, on an exception it is
    removed and ``path`` is left as it was. The new file gets the permissions of an ordinary new file (the
    temporary one is private until then).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator:
    """``open(path, mode, **kwargs)`` through :func:`atomic_path`: the file appears whole when the block ends."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
