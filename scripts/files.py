# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Writing files so that a crash never leaves half of one: every report, history and checkpoint of the bundle is
written to a temporary name in the same folder and renamed over the target (``os.replace`` is atomic on POSIX
and Windows), so the target is always either the old file or the new one.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from monai.data import PILWriter

from scripts.errors import InputError, check_int

__all__ = ["atomic_write", "atomic_path", "write_csv", "AtomicPILWriter", "check_output_dir", "PREVIOUS", "set_aside"]

PREVIOUS = "previous"  # the subfolder where a new run or evaluation puts what an earlier one left
logger = logging.getLogger(__name__)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """
    A temporary path beside ``path`` to write to (``.<name>.<random>.tmp<suffixes>``, so that a writer that
    chooses the format by suffix still can); on a clean exit it replaces ``path``, on an exception it is
    removed and ``path`` is left as it was. The new file gets the permissions of an ordinary new file (the
    temporary one is private until then).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name ends like the target (.png, .nii.gz): writers that choose the format by suffix still can
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes), dir=path.parent)
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


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """A CSV file of ``header`` and ``rows``, written whole through :func:`atomic_path`."""
    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


class AtomicPILWriter(PILWriter):
    """MONAI's ``PILWriter`` (``SaveImaged(writer=...)``) writing each image through :func:`atomic_path`."""

    def write(self, filename, verbose: bool = False, **kwargs):
        with atomic_path(filename) as tmp:
            super().write(tmp, verbose=verbose, **kwargs)


def check_output_dir(path: str | os.PathLike, option: str = "--output_dir") -> bool:
    """
    Check, before any work, that the folder ``path`` (given by the command-line ``option``) can take the command's
    outputs: an :class:`InputError` when it, or a folder above it, is an existing file, or when the folder it
    is in (or would be created in) is not writable. Creates nothing. Returns True, for use as a config step.
    """
    path = Path(path)
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        what = "is an existing file" if existing == path else f"lies under {existing}, which is a file"
        raise InputError(f"{option} {path} {what}: pass {option} a folder (it is created if missing).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path} is not writable (no write permission on {existing}): pass {option} "
                         "another folder.")
    return True


def set_aside(folder: str | os.PathLike, patterns: Sequence[str], label: str, keep: int = 5,
              copy: Sequence[str] = ()) -> Path | None:
    """
    Move what an earlier run or evaluation left in ``folder`` out of a new one's way: the entries of ``folder``
    matching the glob ``patterns`` (files or folders) go, whole, to ``folder/previous/<label>-<date>-<time>/``; those
    named in ``copy`` are copied instead (they stay usable where they are). Then only the newest ``keep`` folders of
    ``previous/`` are kept (``keep`` = 0 keeps none). Each step is one log line naming what moved or was removed,
    so that nothing disappears unseen. Returns the new folder (already removed again when ``keep`` is 0), or None
    when nothing matched.
    """
    keep = check_int(keep, "--keep_previous")
    folder = Path(folder)
    found = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.name != PREVIOUS})
    if not found:
        return None
    stamp = f"{label.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    target = folder / PREVIOUS / stamp
    for n in range(2, 1000):  # two in one second: a fresh name, never a merge
        if not target.exists():
            break
        target = folder / PREVIOUS / f"{stamp}-{n}"
    target.mkdir(parents=True)
    for path in found:
        if path.name in copy:
            shutil.copy2(path, target / path.name)
        else:
            shutil.move(str(path), target / path.name)
    logger.warning(f"{folder} held the files of an earlier {label} ({', '.join(p.name for p in found)}); "
                   f"moved them to {target}.")
    older = sorted((p for p in (folder / PREVIOUS).iterdir() if p.is_dir()), key=lambda p: (p.stat().st_mtime, p.name))
    removed = older[: max(len(older) - keep, 0)]
    for path in removed:
        shutil.rmtree(path)
    if removed:
        logger.warning(f"removed {len(removed)} older folder(s) of {folder / PREVIOUS} to keep the newest {keep} "
                       f"(--keep_previous): {', '.join(p.name for p in removed)}.")
    return target
