# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Checkpoints that are never half written: MONAI's ``CheckpointSaver`` with Ignite's atomic saving, CPU tensors in
every file, and a best-model ranking that survives a resume (:mod:`scripts.resume` holds the run's identity).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointSaver

__all__ = ["AtomicCheckpointSaver"]


def _on_cpu(obj):
    """``obj`` with every tensor in it, through dicts, lists and tuples, as a CPU copy (a CPU tensor as it is)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return type(obj)((k, _on_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


class _ReplacingDiskSaver(DiskSaver):
    """
    Ignite's ``DiskSaver(atomic=True)`` (a temporary file, renamed over the target; since Ignite 0.5 it also
    grants the group and others read permission, the reason MONAI chose ``atomic=False``), with MONAI's fixed
    file names. Ignite removes a checkpoint's predecessor *before* writing it; under a fixed name (``model.pt``,
    ``checkpoint_final.pt``) the rename replaces it anyway, so the old file is kept until the new one is whole.
    Every tensor is saved as a CPU tensor: a file written by a GPU run loads on a machine without one (MONAI's
    ``ckpt_export`` and MONAI Label's checkpoint loader load without ``map_location``).
    """

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        if idist.get_rank() == self.save_on_rank:  # the process that writes: the others would copy for nothing
            checkpoint = _on_cpu(checkpoint)
        super().__call__(checkpoint, self.filename or filename, metadata)

    def remove(self, filename: str) -> None:
        if self.filename is None:
            super().remove(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """
    MONAI's ``CheckpointSaver`` that never leaves half a file, and whose best-model tracking survives a resume.

    - Every file (epoch checkpoints, ``checkpoint_final.pt``, the key-metric ``model.pt``) is written to a
      temporary name and renamed over the old one, which stays whole until then: a crash while saving leaves
      the previous file (MONAI writes in place, and deletes ``model.pt`` before writing its successor).
    - ``state_dict``/``load_state_dict`` hold the key-metric ranking (the best score so far and its file), so a
      resumed run replaces ``model.pt`` only with a better model, not with the first one it validates.
    - On ``attach`` the epoch checkpoints already in ``save_dir`` (left by this run before a resume; a fresh
      run has set other runs' files aside, see :class:`scripts.resume.RunIdentity`) join the ``n_saved`` count,
      so that a resumed run keeps ``n_saved`` of them, not ``n_saved`` more.

    Takes the arguments of ``monai.handlers.CheckpointSaver``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in self._checkpoints():
            checkpoint.save_handler = _ReplacingDiskSaver(self.save_dir, checkpoint.save_handler.filename)

    def _checkpoints(self) -> list[Checkpoint]:
        found = (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint)
        return [c for c in found if c is not None]

    def attach(self, engine: Engine) -> None:
        interval = self._interval_checkpoint
        if interval is not None:
            prefix = f"{interval.filename_prefix}_" if interval.filename_prefix else ""
            pattern = re.compile(re.escape(prefix) + r"checkpoint_epoch=(\d+)\.pt")
            found = (pattern.fullmatch(p.name) for p in Path(self.save_dir).glob("*.pt"))
            interval.load_state_dict({"_saved": sorted((int(m.group(1)), m.group(0)) for m in found if m)})
        super().attach(engine)

    def state_dict(self) -> dict:
        return {"key_metric": self._key_metric_checkpoint.state_dict() if self._key_metric_checkpoint else {}}

    def load_state_dict(self, state_dict: dict) -> None:
        if self._key_metric_checkpoint is not None and state_dict.get("key_metric"):
            self._key_metric_checkpoint.load_state_dict(state_dict["key_metric"])
