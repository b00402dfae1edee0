# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""Ignite handlers of the bundle, and the helper that finds the checkpoint to resume from."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import monai
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import compute_confusion_matrix_metric

__all__ = ["latest_checkpoint", "SegmentationReport"]


def latest_checkpoint(ckpt_dir: str | Path) -> str:
    """The newest resumable checkpoint in ``ckpt_dir``: ``checkpoint_final.pt`` (written at the end of a run or
    at an exception) or ``checkpoint_epoch=N.pt`` (written every epoch), whichever holds the later epoch."""
    ckpt_dir = Path(ckpt_dir)
    candidates = []
    for path in ckpt_dir.glob("*checkpoint_*.pt"):
        match = re.search(r"checkpoint_epoch=(\d+)\.pt$", path.name)
        epoch = int(match.group(1)) if match else None
        if epoch is None and path.name.endswith("checkpoint_final.pt"):
            state = torch.load(path, map_location="cpu", weights_only=True).get("trainer", {})
            epoch = state.get("iteration", 0) / max(state.get("epoch_length", 1), 1)  # Ignite saves no epoch
        if epoch is not None:
            candidates.append((epoch, path.stat().st_mtime, str(path)))
    if not candidates:
        raise FileNotFoundError(f"resume was asked for but {ckpt_dir} holds no checkpoint_epoch=N.pt or "
                                "checkpoint_final.pt; train without --resume first.")
    return max(candidates)[2]


class SegmentationReport:
    """
    At the end of an evaluation, write the per-image and mean Dice, IoU, precision and recall that the
    evaluator's MONAI metric handlers computed (each attached with ``save_details=True``):

    - ``<output_dir>/metrics.csv``: one row per image (``image, dice, iou, precision, recall``);
    - ``<output_dir>/metrics.json``: mean, standard deviation and median of each over the images, and the count.

    Args:
        output_dir: the folder the two files are written to.
        metric_names: the evaluator's metric name for each reported column, e.g.
            ``{"dice": "test_dice", "iou": "test_iou", "precision": "test_precision", "recall": "test_recall"}``.
            Names whose details hold confusion matrices (MONAI ``ConfusionMatrix`` handler) are turned into
            the column's metric (precision, recall, ...) image by image.
    """

    def __init__(self, output_dir: str | Path, metric_names: dict[str, str]) -> None:
        if not metric_names:
            raise ValueError("metric_names must map at least one report column to an evaluator metric name.")
        self.output_dir = Path(output_dir)
        self.metric_names = dict(metric_names)
        self._images: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self._images.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect_names)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _collect_names(self, engine: Engine) -> None:
        batch = engine.state.batch  # decollated by the evaluator: one dict per image
        items = batch if isinstance(batch, list) else monai.data.decollate_batch(batch)
        self._images.extend(str(item["image"].meta["filename_or_obj"]) for item in items)

    def __call__(self, engine: Engine) -> None:
        details = engine.state.metric_details
        columns: dict[str, np.ndarray] = {}
        for column, name in self.metric_names.items():
            if name not in details:
                raise KeyError(f"evaluator metric {name!r} has no per-image details: attach it with save_details=True.")
            values = torch.as_tensor(details[name]).float()
            if values.ndim == 3 and values.shape[-1] == 4:  # (images, classes, [tp, fp, tn, fn])
                values = compute_confusion_matrix_metric(column, values)
            columns[column] = values.reshape(len(values), -1).mean(1).cpu().numpy()
        n = len(next(iter(columns.values())))
        if len(self._images) != n:
            raise RuntimeError(f"collected {len(self._images)} image names for {n} metric rows.")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", *columns])
            for i, image in enumerate(self._images):
                writer.writerow([image, *(f"{columns[c][i]:.6f}" for c in columns)])
        summary = {
            c: {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v)), "median": float(np.nanmedian(v))}
            for c, v in columns.items()
        }
        summary["num_images"] = n
        (self.output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        engine.logger.info(
            "test metrics over %d images: %s", n, ", ".join(f"{c} {s['mean']:.4f}" for c, s in summary.items()
                                                             if isinstance(s, dict))
        )
