# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
The files evaluation and inference leave for people: MONAI's metric reports written whole, the metrics of each
annotated clip, the uncertainty maps and table of MC-dropout inference, and the topology pictures of the vessel task.
Ignite handlers on the evaluator.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import ignite.distributed as idist
import monai
import nibabel as nib
import numpy as np
from ignite.engine import Engine, Events
from monai.handlers import MetricsSaver
from monai.utils import convert_to_numpy
from PIL import Image

from scripts.errors import InputError, check_int
from scripts.files import atomic_path, set_aside, write_csv
from scripts.metrics import enhanced_alignment, mask_iou, structure_measure, topology_defects

__all__ = ["AtomicMetricsSaver", "ClipMetricsSaver", "UncertaintyReport", "TopologyOverlaySaver"]
logger = logging.getLogger(__name__)


class AtomicMetricsSaver(MetricsSaver):
    """
    MONAI's ``MetricsSaver`` whose files each appear whole or not at all, named by the data they scored, and
    never mixed with an earlier evaluation's.

    - ``monai.handlers.utils.write_metrics_reports`` opens ``metrics.csv``, ``<name>_raw.csv`` and
      ``<name>_summary.csv`` in ``save_dir`` and writes them in place, so a crash part-way leaves a cut-short
      report. Here the saving rank has MONAI write them into a new temporary folder inside ``save_dir``
      (``.metrics.<random>.tmp``) and renames each file over its target (``os.replace``, atomic within one file
      system); the folder is removed even when writing fails. Redirecting the whole call keeps MONAI's gathering
      of the file names across processes and its file formats as they are, with no copy of them here.
    - The configs name the metrics ``test_*``; with ``split`` another datalist list (``--eval_split
      validation``), they are written as ``validation_*`` (``validation_dice_raw.csv``, and so in ``metrics.csv``),
      so a report cannot be taken for the test set's.
    - When the evaluation starts, the reports an earlier one left in ``save_dir`` (``metrics.csv``, ``*_raw.csv``,
      ``*_summary.csv``, and :class:`ClipMetricsSaver`'s ``*_clip_metrics.csv``) are moved to
      ``save_dir/previous/evaluation-<time>/``, keeping the newest ``keep_previous``
      (:func:`scripts.files.set_aside`): an evaluation of fewer metrics leaves no stale file.

    Takes the arguments of ``monai.handlers.MetricsSaver``, plus ``split`` and ``keep_previous``.
    """

    REPORTS = ("metrics.csv", "*_raw.csv", "*_summary.csv", "*_clip_metrics.csv")

    def __init__(self, *args, split: str = "test", keep_previous: int = 5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(split, str) or not split.isidentifier():
            raise InputError(f"--eval_split must be a datalist key such as test or validation, got {split!r}.")
        self.split, self.keep_previous = split, check_int(keep_previous, "--keep_previous")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._set_aside)
        super().attach(engine)

    def _set_aside(self, engine: Engine) -> None:
        if idist.get_rank() == self.save_rank:
            set_aside(self.save_dir, self.REPORTS, "evaluation", self.keep_previous)

    def _named(self, values: dict) -> dict:
        return {re.sub(r"^test_", f"{self.split}_", k): v for k, v in values.items()}

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != self.save_rank:
            super().__call__(engine)  # takes part in gathering the file names, writes nothing
            return
        save_dir, state = self.save_dir, engine.state
        metrics, details = state.metrics, getattr(state, "metric_details", {})
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".metrics.", suffix=".tmp", dir=save_dir))
        try:
            self.save_dir, state.metrics, state.metric_details = str(tmp), self._named(metrics), self._named(details)
            super().__call__(engine)
            for path in tmp.iterdir():
                os.replace(path, Path(save_dir) / path.name)
        finally:
            self.save_dir, state.metrics, state.metric_details = save_dir, metrics, details
            shutil.rmtree(tmp, ignore_errors=True)


class _ClipFrame(NamedTuple):
    """What :class:`ClipMetricsSaver` keeps of a frame it scored (the masks themselves are not kept)."""

    clip: str
    s_alpha: float
    e_phi: float
    iou_previous: float  # with the clip's previous frame; NaN for its first
    present: bool  # the presence decision: the predicted mask is not empty


class ClipMetricsSaver:
    """
    The metrics of each annotated clip an evaluation scores: when the evaluated datalist entries carry a ``clip``
    (frames of one video: ``python -m scripts.prepare_data`` on SUN-SEG, on CVC-ClinicDB or with ``--clip-table``),
    ``save_dir/<split>_clip_metrics.csv`` is written as the evaluation ends, one row per clip in the order its
    first frame was scored, then the row ``mean``, the mean over clips (each clip weighs the same, as SUN-SEG
    averages), also logged::

        clip, frames, dice, iou, precision, recall, s_alpha, e_phi, consecutive_iou, presence_flips

    - As in SUN-SEG's evaluation, the first and the last frame of each clip are dropped from every clip metric;
      ``frames`` counts the frames scored (a clip of fewer than 3 frames has none: NaN metrics, left out of the
      mean; the mean's ``frames`` is the mean number per clip).
    - ``dice``, ``iou``, ``precision``, ``recall`` (the keys of ``metrics``): the mean over the clip's frames of the
      per-image values the evaluator's metric handlers saved (``engine.state.metric_details``, what
      ``MetricsSaver`` writes to ``<name>_raw.csv``: the mean over classes), frames where a metric is NaN (an
      empty label; nothing predicted, for precision) left out.
    - ``s_alpha``, ``e_phi``: the mean over frames of :func:`~scripts.metrics.structure_measure` and
      :func:`~scripts.metrics.enhanced_alignment` (the mean over thresholds, SUN-SEG's E^mn_φ) of the foreground
      probability (the last channel of ``prob_key``, a softmax) against the label.
    - ``consecutive_iou``: the mean IoU of the predicted masks of consecutive frames scored
      (:func:`~scripts.metrics.mask_iou`, two empty masks 1); ``presence_flips``: the frames scored whose presence
      decision (a non-empty mask) differs from the previous frame's (:func:`~scripts.metrics.temporal_stability`).

    Every value is measured on the frames as the network sees them (resized to ``image_size``), as the per-image
    metrics are; SUN-SEG scores maps at the mask's size, min-max normalised (PySODMetrics' ``normalize=True``). A
    clip's frames are taken in the order the evaluator scores them, the datalist's (the evaluation's DataLoader
    does not shuffle), in which ``prepare_data`` lists each clip's frames together, in natural order.

    Without ``clip`` keys nothing is computed or written. The file is written whole or not at all
    (:func:`scripts.files.write_csv`); :class:`AtomicMetricsSaver` sets an earlier evaluation's aside with its
    other reports. Under ``torch.distributed`` (``configs/multi_gpu_evaluate.yaml``) each process scores a share of
    every clip's frames, so nothing is written and rank 0 says so: evaluate clips in one process.

    Args:
        save_dir: folder of the file (the evaluation's ``output_dir``).
        metrics: column -> the metric handler (``save_details: true``) whose per-image values it averages, e.g.
            ``{"dice": "test_dice"}``.
        split: the datalist key scored, the file's prefix (``--eval_split``).
        prob_key, label_key, pred_key: keys of the evaluator's output items, channel-first in the readers' (W, H)
            order: the class probabilities, the label and the discrete prediction (one-hot or one channel).
    """

    STABILITY = ("s_alpha", "e_phi", "consecutive_iou", "presence_flips")

    def __init__(self, save_dir: str | Path, metrics: Mapping[str, str], split: str = "test", prob_key: str = "prob",
                 label_key: str = "label", pred_key: str = "pred") -> None:
        if not isinstance(metrics, Mapping) or not all(isinstance(v, str) for v in metrics.values()):
            raise InputError(f"ClipMetricsSaver metrics must map columns to metric names, e.g. {{dice: test_dice}}, "
                             f"got {metrics!r}.")
        self.save_dir, self.metrics, self.split = Path(save_dir), dict(metrics), split
        self.prob_key, self.label_key, self.pred_key = prob_key, label_key, pred_key
        self.columns = ("clip", "frames", *self.metrics, *self.STABILITY)
        self._frames: list[_ClipFrame | None] = []  # per frame scored, None for one without a clip
        self._previous: dict[str, np.ndarray] = {}  # the last predicted mask of each clip
        self._skipped = False  # frames with a clip seen but not scored (more than one process)
        self._one_process = True

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _start(self, engine: Engine) -> None:
        self._frames, self._previous, self._skipped = [], {}, False
        self._one_process = idist.get_world_size() == 1

    @staticmethod
    def _foreground(x) -> np.ndarray:
        """The last channel of a channel-first (C, W, H) map as a float (H, W) array."""
        return convert_to_numpy(x, wrap_sequence=True)[-1].T

    def _record(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        batch = batch if isinstance(batch, list) else monai.data.decollate_batch(batch)
        output = output if isinstance(output, list) else monai.data.decollate_batch(output)
        for item, out in zip(batch, output):
            clip = item.get("clip") if isinstance(item, Mapping) else None
            if clip is None or not self._one_process:
                self._skipped |= clip is not None
                self._frames.append(None)  # keeps the frames in step with the metric details
                continue
            if self.prob_key not in out:
                raise InputError(f"the evaluator's output lacks {self.prob_key!r}, the class probabilities of the clip "
                                 "metrics: configs/evaluate.yaml's postprocessing copies the softmax of pred into it.")
            prob, label = self._foreground(out[self.prob_key]), self._foreground(out[self.label_key]) > 0.5
            mask = self._foreground(out[self.pred_key]) > 0.5
            previous = self._previous.get(clip)
            self._previous[clip] = mask
            self._frames.append(_ClipFrame(clip, structure_measure(prob, label), enhanced_alignment(prob, label),
                                           np.nan if previous is None else mask_iou(previous, mask), bool(mask.any())))

    def __call__(self, engine: Engine) -> None:
        if self._skipped and idist.get_rank() == 0:
            logger.warning(f"{self.split}_clip_metrics.csv is not written by a multi-process evaluation (each process "
                           "scores a share of every clip's frames); evaluate clips in one process for it.")
        clips: dict[str, list[int]] = {}
        for i, frame in enumerate(self._frames):
            if frame is not None:
                clips.setdefault(frame.clip, []).append(i)
        if not clips:
            return
        details = getattr(engine.state, "metric_details", {})
        per_image = {}
        for column, name in self.metrics.items():
            if name not in details:
                raise InputError(f"ClipMetricsSaver needs the per-image values of metric {name} (column {column}): "
                                 "give its handler save_details: true, or leave the column out.")
            values = convert_to_numpy(details[name], dtype=np.float64, wrap_sequence=True).reshape(
                len(details[name]), -1)
            if len(values) != len(self._frames):
                raise RuntimeError(f"metric {name} holds {len(values)} per-image values for {len(self._frames)} "
                                   "frames scored; the clip metrics pair them in scoring order.")
            with warnings.catch_warnings():  # a frame NaN in every class stays NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                per_image[column] = np.nanmean(values, axis=1)  # MetricsSaver's `mean` column
        rows = [self._clip_row(clip, frames[1:-1], per_image) for clip, frames in clips.items()]
        scored = np.array([row[1:] for row in rows if row[1] > 0], dtype=np.float64).reshape(-1, len(self.columns) - 1)
        with warnings.catch_warnings():  # a column NaN in every clip stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = ["mean", *np.nanmean(scored, axis=0)]
        path = self.save_dir / f"{self.split}_clip_metrics.csv"
        write_csv(path, self.columns, [[f"{v:.6f}" if isinstance(v, float) else v for v in row]
                                       for row in [*rows, mean]])
        shown = ", ".join(f"{c} {v:.4f}" for c, v in zip(self.columns[2:], mean[2:]))
        logger.info(f"{self.split} clip metrics, mean over {len(scored)} clips (first and last frame of each "
                    f"dropped): {shown}; per clip in {path}")

    def _clip_row(self, clip: str, frames: list[int], per_image: dict[str, np.ndarray]) -> list:
        """The row of one clip over the frames scored (indices into ``self._frames``, the clip's own in order)."""
        scored = [self._frames[i] for i in frames]
        with warnings.catch_warnings():  # no frame scored, or a metric NaN in every frame: NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            values = [float(np.nanmean(per_image[c][frames])) if frames else np.nan for c in self.metrics]
            values += [float(np.mean([getattr(f, k) for f in scored])) if scored else np.nan
                       for k in ("s_alpha", "e_phi")]
            # the first frame scored is compared with a dropped one: its IoU and flip are not the clip's
            values.append(float(np.mean([f.iou_previous for f in scored[1:]])) if len(scored) > 1 else np.nan)
        present = [f.present for f in scored]
        return [clip, len(frames), *values, sum(a != b for a, b in zip(present[:-1], present[1:]))]


class UncertaintyReport:
    """
    What MC-dropout inference (``configs/inference.yaml`` with ``mc_samples`` > 0) writes for each frame, as each
    batch completes, from the evaluator's decollated output after ``ResizeToOriginald`` and ``SplitDimd`` (so every
    map is at the frame's original size, in MONAI/PIL axis order):

    - ``<stem>_<map>.png``: the probability, variance, entropy and mutual-information maps, colour-mapped on fixed
      ranges (:func:`scripts.figures.colour_map`) for a person to look at;
    - ``<stem>_<map>.nii.gz``: the same maps as float32 NIfTI (nibabel; axes x, y = width, height), for programs;
    - ``uncertainty.csv``: one row per frame, ``image, height, width, area_pixels, area_fraction,
      mean_mi_foreground, mean_entropy, seconds``. ``mean_mi_foreground`` is the mean mutual information over
      the *predicted* foreground: the frame's difficulty D of method.md §3 without a ground truth (empty when
      nothing is predicted). ``seconds`` is the frame's share of its batch's time (inference and postprocessing).

    Frames of videos and frame folders are left to :class:`scripts.video.VideoReport` (their mutual information
    goes to its ``frames.csv`` and overlay video): maps of every frame of a long video would be millions of files.

    The CSV is rewritten with all rows so far after every batch, so a run stopped part-way keeps the frames it
    finished. Every file is written whole or not at all (a temporary name renamed over the target,
    :mod:`scripts.files`): a crash never leaves a cut-short PNG, NIfTI or CSV. Beyond the maps themselves a frame
    needs a few bytes a pixel here (the colour image, the mask), not the ~100 of a float64 RGBA colour map.

    Args:
        output_dir: folder of the files (the one the masks go to).
        mask_key: key of the binary mask in the output items, (1, W, H) or (W, H).
        prefix: prefix of the map keys made by ``SplitDimd`` (``pred_probability``, ``pred_variance``, ...).
    """

    MAPS = {"probability": "mean", "variance": "variance", "entropy": "entropy",
            "mutual_information": "mutual_information"}  # output name: colour scheme of scripts.figures
    COLUMNS = ("image", "height", "width", "area_pixels", "area_fraction", "mean_mi_foreground", "mean_entropy",
               "seconds")

    def __init__(self, output_dir: str | Path, mask_key: str = "pred", prefix: str = "pred_") -> None:
        self.output_dir = Path(output_dir)
        self.mask_key, self.prefix = mask_key, prefix
        self.csv_path = self.output_dir / "uncertainty.csv"
        self._began = 0.0
        self._rows: list[list] = []
        from scripts.figures import colour_map  # matplotlib only where maps are drawn

        self._colour_map = colour_map

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_STARTED, self._tick)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _start(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._rows = []
        write_csv(self.csv_path, self.COLUMNS, self._rows)

    def _save_map(self, values: np.ndarray, stem: Path, name: str, scheme: str) -> None:
        # NIfTI axes x, y = the frame's width, height (PIL order), 1 unit per pixel
        with atomic_path(f"{stem}_{name}.nii.gz") as tmp:
            nib.save(nib.Nifti1Image(np.asarray(values, dtype=np.float32), np.eye(4)), tmp)
        with atomic_path(f"{stem}_{name}.png") as tmp:
            Image.fromarray(self._colour_map(values.T, scheme)).save(tmp)  # (H, W, 3) for PIL

    def _tick(self, engine: Engine) -> None:
        self._began = time.perf_counter()

    def __call__(self, engine: Engine) -> None:
        items = engine.state.output
        items = items if isinstance(items, list) else monai.data.decollate_batch(items)
        batch = engine.state.batch if isinstance(engine.state.batch, list) else [{}] * len(items)
        rows = []
        for item, given in zip(items, batch):
            if given.get("kind", "image") != "image":  # a video's frame: its row and overlay are VideoReport's
                continue
            missing = [k for k in (self.mask_key, *(self.prefix + m for m in self.MAPS)) if k not in item]
            if missing:
                raise KeyError(f"the inference output lacks {missing}: mc_samples > 0 and the SplitDimd of "
                               "configs/inference.yaml are needed for the uncertainty report.")
            source = str(item[self.mask_key].meta["filename_or_obj"])
            # (W, H), PIL order; views of the output, not copies
            arrays = {name: item[self.prefix + name].detach().cpu().numpy()[0] for name in self.MAPS}
            stem = self.output_dir / Path(source).stem
            for name, scheme in self.MAPS.items():
                self._save_map(arrays[name], stem, name, scheme)
            mi, entropy = arrays["mutual_information"], arrays["entropy"]
            mask = item[self.mask_key].detach().cpu().numpy().reshape(mi.shape) > 0.5
            rows.append([source, mask.shape[1], mask.shape[0], int(mask.sum()), f"{mask.mean():.6f}",
                         f"{mi[mask].mean():.6g}" if mask.any() else "", f"{entropy.mean():.6g}"])
        seconds = (time.perf_counter() - self._began) / max(len(rows), 1)
        self._rows.extend(row + [f"{seconds:.4f}"] for row in rows)
        write_csv(self.csv_path, self.COLUMNS, self._rows)


class TopologyOverlaySaver:
    """
    Where each predicted vessel mask breaks, written as each batch completes (evaluation or inference of the vessel
    task): ``<stem>_topology.png``, the picture of :func:`scripts.figures.topology_overlay` (breaks red, fragments
    magenta, missed vessels blue, false positives orange), and ``topology.csv``, one row per image: ``image,
    breaks, fragments, missed_fraction`` (the share of the label's pixels the mask misses; empty without a label).
    Breaks need a ground truth, fragments do not (:func:`scripts.metrics.topology_defects`). Under
    ``torch.distributed`` each process draws its own images and the rows of all are gathered at the end of the
    run, then written by rank 0 (one process rewrites the file after each batch, so that a crash keeps the rows).

    The ground truth is the output item's ``label`` when it has one (evaluation), else the file ``label_pattern``
    names in ``label_dir`` (inference), if it exists: ``{stem}`` is the image's file name without extension,
    ``{id}`` its part before the first ``_`` (CHASE_DB1: ``{stem}_1stHO.png``; DRIVE: ``{id}_manual1.gif``).

    Args:
        output_dir: folder of the files.
        label_dir: where inference finds the ground truths; None: only the output's ``label``.
        label_pattern: file name of an image's ground truth in ``label_dir``.
        fragment_size: components of fewer pixels are fragments.
        pred_key: the binary mask in the output items: (1, W, H), (W, H), or one-hot (2, W, H).
    """

    COLUMNS = ("image", "breaks", "fragments", "missed_fraction")

    def __init__(self, output_dir: str | Path, label_dir: str | Path | None = None,
                 label_pattern: str = "{stem}_1stHO.png", fragment_size: int = 100, pred_key: str = "pred") -> None:
        self.output_dir = Path(output_dir)
        self.label_dir = None if label_dir is None else Path(label_dir)
        if self.label_dir is not None and not self.label_dir.is_dir():
            raise InputError(f"--label_dir {self.label_dir} is not a folder.")
        self.label_pattern, self.pred_key = label_pattern, pred_key
        self.fragment_size = check_int(fragment_size, "TopologyOverlaySaver fragment_size", 1)
        self._rows: list[list] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write_gathered)

    def _start(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._rows = []

    def _write_gathered(self, engine: Engine) -> None:
        if idist.get_world_size() > 1:
            rows = sorted(row for part in idist.all_gather(self._rows) for row in part)
            if idist.get_rank() == 0:
                write_csv(self.output_dir / "topology.csv", self.COLUMNS, rows)

    @staticmethod
    def _plane(x) -> np.ndarray:
        """The foreground of a (W, H), (1, W, H) or one-hot (2, W, H) mask as (H, W) bool."""
        a = convert_to_numpy(x, wrap_sequence=True)
        a = a[-1] if a.ndim == 3 else a
        return a.T > 0.5

    def _label(self, item: dict, source: str, stem: str, shape: tuple) -> np.ndarray | None:
        if item.get("label") is not None:
            return self._plane(item["label"])
        if self.label_dir is None:
            return None
        path = self.label_dir / self.label_pattern.format(stem=stem, id=stem.split("_")[0])
        if not path.is_file():
            return None
        label = np.asarray(Image.open(path).convert("L")) > 0
        if label.shape != shape:
            raise InputError(f"ground truth {path} is {label.shape[1]}×{label.shape[0]} (W×H) but its image "
                             f"{source} is {shape[1]}×{shape[0]}.")
        return label

    def __call__(self, engine: Engine) -> None:
        from scripts.figures import topology_overlay  # matplotlib only where pictures are drawn

        items = engine.state.output
        items = items if isinstance(items, list) else monai.data.decollate_batch(items)
        for item in items:
            source = str(item[self.pred_key].meta["filename_or_obj"])
            stem = Path(source).name.split(".")[0]
            pred = self._plane(item[self.pred_key])
            label = self._label(item, source, stem, pred.shape)
            defects = topology_defects(pred, label, self.fragment_size)
            image = item["image"].detach().cpu().numpy()  # (C, W, H) in [0, 1]
            picture = topology_overlay(np.moveaxis(image, 0, -1).transpose(1, 0, 2), defects, pred, label)
            with atomic_path(self.output_dir / f"{stem}_topology.png") as tmp:
                Image.fromarray(picture).save(tmp, format="PNG")
            missed = "" if label is None or not label.any() else f"{defects['missed'].sum() / label.sum():.6f}"
            self._rows.append([source, defects["count"]["breaks"], defects["count"]["fragments"], missed])
        if idist.get_world_size() == 1:
            write_csv(self.output_dir / "topology.csv", self.COLUMNS, self._rows)
