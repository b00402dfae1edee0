# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Label audit (seed 004's label cleansing, done from the difficulty pass): which training labels an annotator
should review first.

For every training image the pass draws N dropout samples once and records two numbers from them: ``1 − Dice`` of
the thresholded mean prediction against the label (how far the model's answer is from the label) and the image's
difficulty D (how unsure the model is; :mod:`scripts.difficulty`). The images are ranked by a suspicion
(:data:`RANKINGS`):

- ``"dice_error"`` (the default): ``suspicion = 1 − Dice``;
- ``"dice_error_certainty"``: ``suspicion = (1 − Dice) · (1 − q_D)``, with ``q_D`` in [0, 1] the image's rank of D
  among the pass's images (0 for the lowest D, ties averaged), so that an image the model is unsure about counts as
  hard rather than mislabelled. The bundle's ranking up to version 0.12.

The default is measured (docs/results_difficulty.md, "The label audit's ranking"): on Kvasir-SEG with 26 of 720
training labels broken (erased, shifted, swapped), three draws, four training lengths, ``1 − Dice`` alone put 15 to
22 of the 26 in the top 10 % on average and the product with the thesis's D 7 to 12 (with the entropy over the
prediction 12 to 18): a shifted or swapped label contradicts the image exactly where the model is then unsure, so
the ``(1 − q_D)`` factor pushed the labels it should find down the list. An erased
label (empty, and Dice 0 against a non-empty prediction) scores 1 under both, the top, unless the model predicts
nothing there either, when nothing contradicts it.

The training run rewrites ``label_audit.csv`` after every pass (:class:`scripts.difficulty.DifficultyHistory`) and
draws ``figures/label_audit.png`` at its end; ``configs/audit.yaml`` does both for a trained ``model.pt``
(``python -m monai.bundle run auditing``), and the MONAI Label app serves the same order as its
``label_audit`` strategy.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

from scripts.files import atomic_path, atomic_write

__all__ = ["COLUMNS", "RANKINGS", "label_suspicion", "write_label_audit", "read_label_audit"]

COLUMNS = ("rank", "image", "label", "suspicion", "dice_error", "D")
RANKINGS = ("dice_error", "dice_error_certainty")


def label_suspicion(d: torch.Tensor, dice_error: torch.Tensor, ranking: str = "dice_error") -> torch.Tensor:
    """
    The suspicion of each image's label under ``ranking`` (module docstring): ``1 − Dice`` (``"dice_error"``) or
    ``(1 − Dice) · (1 − q_D)`` (``"dice_error_certainty"``).

    Args:
        d: (M,) difficulty of every image of a pass.
        dice_error: (M,) ``1 − Dice`` of each image's mean prediction against its label.
        ranking: one of :data:`RANKINGS`.

    Returns:
        (M,) float64 in [0, 1]; higher is more suspect.
    """
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}.")
    d, dice_error = torch.as_tensor(d, dtype=torch.float64), torch.as_tensor(dice_error, dtype=torch.float64)
    if d.shape != dice_error.shape or d.ndim != 1:
        raise ValueError(f"d and dice_error must be (M,) tensors of one shape, got {tuple(d.shape)} and "
                         f"{tuple(dice_error.shape)}.")
    if ranking == "dice_error" or len(d) < 2:
        return dice_error.clone()
    quantile = (rankdata(d.numpy(), method="average") - 1.0) / (len(d) - 1)  # ties share their average rank
    return dice_error * (1.0 - torch.from_numpy(quantile))


def write_label_audit(output_dir: str | Path, result: Mapping, suspect_maps: Mapping[str, np.ndarray] | None = None
                      ) -> Path:
    """
    Write ``output_dir/label_audit.csv`` (columns :data:`COLUMNS`, most suspect first) from a pass's ``result``
    (``images``, ``labels``, ``D``, ``dice_error``, ``suspicion``) and, when given, the maps of the top images to
    ``output_dir/mc_maps/label_audit.npz`` (the layout of :mod:`scripts.figures`). Returns the CSV's path.
    """
    output_dir = Path(output_dir)
    order = torch.as_tensor(result["suspicion"]).argsort(descending=True, stable=True).tolist()
    path = output_dir / "label_audit.csv"
    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for rank, i in enumerate(order, start=1):
            writer.writerow([rank, result["images"][i], result["labels"][i],
                             *(f"{float(result[k][i]):.6g}" for k in ("suspicion", "dice_error", "D"))])
    if suspect_maps:
        with atomic_path(output_dir / "mc_maps" / "label_audit.npz") as tmp:
            np.savez_compressed(tmp, epoch=int(result.get("epoch", 0)), **suspect_maps)
    return path


def read_label_audit(path: str | Path) -> list[dict]:
    """The rows of a ``label_audit.csv``, most suspect first, with numbers as floats."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = set(COLUMNS) - set(rows[0] if rows else COLUMNS)
    if missing:
        raise ValueError(f"{path} lacks the column(s) {sorted(missing)}; expected {COLUMNS}.")
    return [{**r, **{k: float(r[k]) for k in COLUMNS[3:]}, "rank": int(r["rank"])} for r in rows]
