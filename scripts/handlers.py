# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""Ignite handlers of the bundle: atomic checkpoints, the difficulty pass, the evaluation and uncertainty reports."""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import ignite.distributed as idist
import monai
import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from ignite.metrics.metric import reinit__is_reduced
from monai.handlers import CheckpointSaver, ConfusionMatrix, IgniteMetricHandler, MetricsSaver
from monai.metrics import compute_confusion_matrix_metric
from PIL import Image

from scripts.audit import label_suspicion, write_label_audit
from scripts.difficulty import dice_error
from scripts.errors import InputError, check_int
from scripts.files import atomic_path, atomic_write, write_csv
from scripts.metrics import (BettiErrorMetric, ClDiceMetric, ComponentRatioMetric, FieldOfViewConfusionMatrixMetric,
                             FieldOfViewROCAUCMetric, topology_defects)
from scripts.uncertainty import check_chunk_size, mc_foreground_samples, uncertainty_maps

__all__ = ["AtomicCheckpointSaver", "DifficultyPass", "DifficultyHistory", "PerImageConfusionMatrix",
           "AtomicMetricsSaver", "UncertaintyReport", "TopologyOverlaySaver", "FieldOfViewMetricHandler", "ClDice",
           "ComponentRatio", "BettiError", "FieldOfViewConfusionMatrix", "FieldOfViewROCAUC"]


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


class DifficultyPass:
    """
    The Monte Carlo dropout difficulty pass of method.md §3-4, an Ignite handler on the trainer.

    At the start of epoch e (from 1) with e >= ``start`` and (e − ``start``) mod ``interval`` = 0, the trainer's
    network, frozen, makes ``num_samples`` dropout samples of every image of ``dataset``
    (:func:`mc_foreground_samples`). ``scorer`` turns each batch's (N, B, H, W) samples and masks into (B,)
    difficulties D, ``eps_map`` the D of all images into ε, and ``table``, which the loss reads, takes the new
    values. From the same samples comes the label audit's evidence, 1 − Dice of the mean prediction. Sampling runs
    inside ``torch.random.fork_rng`` with a seed of its own (``seed``, epoch, rank), so training draws the same
    batches and augmentations as without the pass. Under ``torch.distributed`` each process scores every
    ``world_size``-th image and the scores are gathered, so every process ends with the same table. ``history``
    (rank 0; None writes nothing) gets each pass's result and the maps of ``num_map_images`` fixed images and of
    the ``num_audit_images`` most suspect labels (sampled again: a few images, not the set).
    """

    def __init__(self, dataset, scorer, eps_map, table, start: int = 0, interval: int = 10, num_samples: int = 10,
                 batch_size: int = 8, num_workers: int = 0, chunk_size: int | str = "auto", seed: int = 0,
                 history: DifficultyHistory | None = None, num_map_images: int = 8, num_audit_images: int = 8) -> None:
        self.dataset, self.scorer, self.eps_map, self.table, self.history = dataset, scorer, eps_map, table, history
        self.start = check_int(start, "DifficultyPass start (--mc_start)")
        self.interval = check_int(interval, "DifficultyPass interval (--mc_interval)", 1)
        self.num_samples = check_int(num_samples, "DifficultyPass num_samples (--mc_samples)", 2)
        self.batch_size, self.num_workers = check_int(batch_size, "batch_size", 1), num_workers
        self.chunk_size, self.seed = check_chunk_size(chunk_size), seed
        self.num_map_images, self.num_audit_images = num_map_images, num_audit_images

    def is_due(self, epoch: int) -> bool:
        """Algorithm 1's schedule (``Events.EPOCH_STARTED(every=τ)`` would never fire at epoch 1)."""
        return epoch >= self.start and (epoch - self.start) % self.interval == 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED(event_filter=lambda _, epoch: self.is_due(epoch)), self)
        if self.history is not None:
            self.history.attach(engine)

    def __call__(self, engine: Engine) -> None:
        self.run_pass(engine.network, engine.state.epoch)

    def run_pass(self, network: torch.nn.Module, epoch: int) -> dict:
        """Score every image with ``network``, update the table and hand the result to the history; returns it."""
        began = time.perf_counter()
        result = self.score(network, epoch)
        result.update(D_norm=self.eps_map.normalise(result["D"]), eps=self.eps_map(result["D"], epoch))
        self.table.update(result["labels"], result["eps"])
        result.update(epoch=epoch, pass_number=self.table.num_passes, seconds=time.perf_counter() - began)
        if self.history is not None and idist.get_rank() == 0:
            fixed = np.random.default_rng(self.seed).permutation(len(self.dataset))[: self.num_map_images]
            self.history.write(result, self.maps(network, fixed.tolist(), epoch), self.suspect_maps(network, result))
        return result

    def suspect_maps(self, network: torch.nn.Module, result: dict) -> dict[str, np.ndarray]:
        """:meth:`maps` of the ``num_audit_images`` most suspect labels of a :meth:`score` result."""
        suspects = result["suspicion"].argsort(descending=True, stable=True)[: self.num_audit_images]
        return self.maps(network, suspects.tolist(), result.get("epoch", 0))

    def score(self, network: torch.nn.Module, epoch: int) -> dict:
        """Image and label ids, D, 1 − Dice and label suspicion of every image (all processes', dataset order)."""
        rank, world = idist.get_rank(), idist.get_world_size()
        rows = []
        for batch, samples in self._sample(network, range(rank, len(self.dataset), world), epoch):
            labels = batch["label"].as_tensor()
            d, error = self.scorer(samples, labels).tolist(), dice_error(samples.mean(0), labels).tolist()
            rows += zip(batch["index"].tolist(), batch["image"].meta["filename_or_obj"],
                        batch["label"].meta["filename_or_obj"], d, error)
        rows = sorted(r for part in idist.all_gather(rows) for r in part)  # one part without torch.distributed
        _, images, labels, d, error = zip(*rows)
        d, error = torch.tensor(d, dtype=torch.float64), torch.tensor(error, dtype=torch.float64)
        return {"images": [str(i) for i in images], "labels": [str(i) for i in labels], "D": d,
                "dice_error": error, "suspicion": label_suspicion(d, error),
                "scored_here": len(range(rank, len(self.dataset), world))}

    def maps(self, network: torch.nn.Module, indices: list[int], epoch: int) -> dict[str, np.ndarray]:
        """The images, labels and uncertainty maps of the images at ``indices`` (of :func:`uncertainty_maps`)."""
        parts = [{"image": batch["image"].as_tensor(), "label": batch["label"].as_tensor()[:, 0],
                  **uncertainty_maps(samples), "ids": batch["label"].meta["filename_or_obj"]}
                 for batch, samples in self._sample(network, indices, epoch)]
        if not parts:
            return {}
        arrays = {k: torch.cat([p[k] for p in parts]).float().cpu().numpy() for k in parts[0] if k != "ids"}
        return {"ids": np.array([str(i) for p in parts for i in p["ids"]]), **arrays}

    def _sample(self, network, indices, epoch):
        """Batches of the images at ``indices`` with their (N, B, H, W) samples, drawn from the pass's own seed."""
        device = next(network.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed + 100_003 * epoch + idist.get_rank())
            loader = monai.data.DataLoader(_Indexed(self.dataset, list(indices)), batch_size=self.batch_size,
                                           num_workers=self.num_workers)  # it draws a seed: inside the fork
            for batch in loader:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                yield batch, mc_foreground_samples(network, batch["image"].as_tensor(), self.num_samples,
                                                   self.chunk_size)


class _Indexed(torch.utils.data.Dataset):
    """The items of ``dataset`` at ``indices``, each with its ``index`` in ``dataset``."""

    def __init__(self, dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[self.indices[i]], "index": self.indices[i]}


class DifficultyHistory:
    """
    What the difficulty pass leaves for people to look at, in ``output_dir`` (rank 0; every file written whole,
    then renamed, :mod:`scripts.files`):

    - ``difficulty_history.csv``: one row per image per pass, ``pass, epoch, image, label, D, D_norm, eps,
      dice_error, seconds`` (the last the pass's wall time). Rows of this pass number or later, left by a crashed
      or older run, are replaced.
    - ``mc_maps/pass_NNN.npz``: the image, label and uncertainty maps of a fixed set of images (the layout of
      :mod:`scripts.figures`); ``mc_maps/label_audit.npz``: the same for the most suspect labels of the last pass.
    - ``label_audit.csv``: the training images ranked by the evidence of a wrong label (:mod:`scripts.audit`).
    - TensorBoard histograms and medians of D and ε, with a ``summary_writer``, and a log line per pass.
    - When training completes, ``figures/``: the uncertainty evolution of the easiest and hardest mapped image, the
      ε distribution over the passes and the label-audit sheet.
    """

    def __init__(self, output_dir: str | Path, summary_writer=None) -> None:
        self.output_dir = Path(output_dir)
        self.writer = summary_writer

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self.write_figures)

    def write(self, result: dict, maps: dict[str, np.ndarray], suspect_maps: dict[str, np.ndarray]) -> None:
        """Record one pass's ``result`` (of :meth:`DifficultyPass.run_pass`) and the maps of its images."""
        k, epoch, d, eps = result["pass_number"], result["epoch"], result["D"], result["eps"]
        logging.getLogger(__name__).info(
            f"difficulty pass {k} at epoch {epoch}: {len(d)} images in {result['seconds']:.1f} s; D min/median/max "
            f"{d.min():.4g}/{d.median():.4g}/{d.max():.4g}; eps min/median/max {eps.min():.3f}/{eps.median():.3f}/"
            f"{eps.max():.3f}")
        if self.writer is not None:
            for name in ("D", "eps"):
                self.writer.add_histogram(f"difficulty_pass/{name}", result[name], epoch)
                self.writer.add_scalar(f"difficulty_pass/{name}_median", float(result[name].median()), epoch)
            self.writer.add_scalar("difficulty_pass/seconds", result["seconds"], epoch)
            self.writer.flush()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        history = self.output_dir / "difficulty_history.csv"
        kept = []  # rows of this pass or later come from a run that crashed after them, or from an older run
        if history.exists():
            with open(history, newline="") as f:
                kept = [r for r in list(csv.reader(f))[1:] if int(r[0]) < k]
        columns = ("D", "D_norm", "eps", "dice_error")
        with atomic_write(history, newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["pass", "epoch", "image", "label", *columns, "seconds"])
            writer.writerows(kept)
            for i, (image, label) in enumerate(zip(result["images"], result["labels"])):
                writer.writerow([k, epoch, image, label, *(f"{float(result[c][i]):.6g}" for c in columns),
                                 f"{result['seconds']:.3f}"])
        if maps:
            with atomic_path(self.output_dir / "mc_maps" / f"pass_{k:03d}.npz") as tmp:
                np.savez_compressed(tmp, epoch=epoch, **maps)
        write_label_audit(self.output_dir, result, suspect_maps)

    def write_figures(self, engine: Engine | None = None) -> list[Path]:
        """The figures of :mod:`scripts.figures` and the label-audit sheet; rank 0, once a pass has run."""
        if idist.get_rank() != 0 or not (self.output_dir / "difficulty_history.csv").exists():
            return []
        from scripts.figures import plot_label_audit, write_figures

        scores = None
        last = sorted((self.output_dir / "mc_maps").glob("pass_*.npz"))
        if last:
            with np.load(last[-1]) as z:
                dice = 1.0 - dice_error(torch.as_tensor(z["mean"]), torch.as_tensor(z["label"]))  # both empty: 1
                scores = {str(i): float(v) for i, v in zip(z["ids"], dice)}
        written = write_figures(self.output_dir, scores=scores)
        audit = self.output_dir / "mc_maps" / "label_audit.npz"
        if audit.exists():
            written.append(plot_label_audit(audit, self.output_dir / "label_audit.csv",
                                            self.output_dir / "figures" / "label_audit.png"))
        return written


class PerImageConfusionMatrix(ConfusionMatrix):
    """
    MONAI's ``ConfusionMatrix`` handler whose per-image details are its metric, not the confusion counts.

    With ``save_details=True`` MONAI stores the (images, classes, 4) counts ``[tp, fp, tn, fn]`` in
    ``engine.state.metric_details[name]``, which ``MetricsSaver`` (``monai.handlers.utils.write_metrics_reports``)
    cannot write: it writes details as (images, classes) tables. This handler stores
    ``compute_confusion_matrix_metric(metric_name, counts)`` instead, (images, classes), NaN where the metric is
    undefined for an image, so that ``<name>_raw.csv`` and ``<name>_summary.csv`` hold per-image precision, recall,
    ... as they hold the Dice of ``MeanDice``. The handler's value (``engine.state.metrics[name]``) is MONAI's.

    Takes the arguments of ``monai.handlers.ConfusionMatrix`` (one ``metric_name``).
    """

    def compute(self):
        result = super().compute()  # stores the counts when save_details
        if self.save_details:
            details = self._engine.state.metric_details
            details[self._name] = compute_confusion_matrix_metric(self.metric_fn.metric_name[0], details[self._name])
        return result


class AtomicMetricsSaver(MetricsSaver):
    """
    MONAI's ``MetricsSaver`` whose files each appear whole or not at all, as every file the bundle writes.

    ``monai.handlers.utils.write_metrics_reports`` opens ``metrics.csv``, ``<name>_raw.csv`` and
    ``<name>_summary.csv`` in ``save_dir`` and writes them in place, so a crash part-way leaves a cut-short report.
    Here the saving rank has MONAI write them into a new temporary folder inside ``save_dir``
    (``.metrics.<random>.tmp``) and renames each file over its target (``os.replace``, atomic within one file
    system); the folder is removed even when writing fails. Redirecting the whole call keeps MONAI's gathering of
    the file names across processes and its file formats as they are, with no copy of them here.

    Takes the arguments of ``monai.handlers.MetricsSaver``.
    """

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != self.save_rank:
            super().__call__(engine)  # takes part in gathering the file names, writes nothing
            return
        save_dir = self.save_dir
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".metrics.", suffix=".tmp", dir=save_dir))
        try:
            self.save_dir = str(tmp)
            super().__call__(engine)
            for path in tmp.iterdir():
                os.replace(path, Path(save_dir) / path.name)
        finally:
            self.save_dir = save_dir
            shutil.rmtree(tmp, ignore_errors=True)


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
        rows = []
        for item in items:
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
        a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
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


class FieldOfViewMetricHandler(IgniteMetricHandler):
    """
    MONAI's ``IgniteMetricHandler`` for the metrics of :mod:`scripts.metrics`, whose ``update`` also takes the
    field of view: ``output_transform`` gives ``(y_pred, y)`` (the whole image) or ``(y_pred, y, mask)``, e.g.
    ``from_engine(['pred', 'label', 'fov'])``. A MONAI evaluator's output holds only image, label, pred and the keys
    its postprocessing adds, so the FOV of the batch must be copied into it under a new name, e.g. with
    ``CopyItemsd(keys='fov', names='pred_fov')`` in the postprocessing and ``from_engine(['pred', 'label',
    'pred_fov'])`` (``engine_apply_transform`` keeps a batch key in the batch). Details (``save_details``):
    ``engine.state.metric_details[name]``, (images, classes), one row per image for ``MetricsSaver``.

    Takes the arguments of ``monai.handlers.IgniteMetricHandler``.
    """

    def iteration_completed(self, engine: Engine) -> None:
        # Ignite splits lists of per-image tensors into one update each for (y_pred, y) pairs only: the metric
        # takes the lists, masks included, itself
        self.update(self._output_transform(engine.state.output))

    @reinit__is_reduced
    def update(self, output) -> None:
        if len(output) not in (2, 3):
            raise ValueError(f"output must be (y_pred, y) or (y_pred, y, mask), got {len(output)} items.")
        self.metric_fn(output[0], output[1], mask=output[2] if len(output) == 3 else None)


class ClDice(FieldOfViewMetricHandler):
    """Per-image clDice with a hard skeleton inside the FOV: :class:`scripts.metrics.ClDiceMetric`."""

    def __init__(self, include_background: bool = True, reduction: str = "mean", ignore_empty: bool = True,
                 output_transform=lambda x: x, save_details: bool = True) -> None:
        metric_fn = ClDiceMetric(include_background, reduction, ignore_empty=ignore_empty)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


class ComponentRatio(FieldOfViewMetricHandler):
    """Per-image VCA (components of P over those of G) inside the FOV: :class:`scripts.metrics.ComponentRatioMetric`."""

    def __init__(self, include_background: bool = True, reduction: str = "mean", output_transform=lambda x: x,
                 save_details: bool = True) -> None:
        metric_fn = ComponentRatioMetric(include_background, reduction)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


class BettiError(FieldOfViewMetricHandler):
    """Per-image Betti error of ``dimension`` 0 or 1 inside the FOV: :class:`scripts.metrics.BettiErrorMetric`."""

    def __init__(self, dimension: int = 0, include_background: bool = True, reduction: str = "mean",
                 output_transform=lambda x: x, save_details: bool = True) -> None:
        metric_fn = BettiErrorMetric(dimension, include_background, reduction)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


class FieldOfViewROCAUC(FieldOfViewMetricHandler):
    """
    Per-image AUC of the foreground probability inside the FOV: :class:`scripts.metrics.FieldOfViewROCAUCMetric`.
    ``y_pred`` is the softmax, not the discrete ``pred``: e.g. ``Activationsd(keys='pred', softmax=True)`` and
    ``CopyItemsd(keys='pred', names='prob')`` before ``AsDiscreted`` in the postprocessing, and
    ``from_engine(['prob', 'label', 'pred_fov'])`` with ``include_background=False``.
    """

    def __init__(self, include_background: bool = True, reduction: str = "mean", output_transform=lambda x: x,
                 save_details: bool = True) -> None:
        metric_fn = FieldOfViewROCAUCMetric(include_background, reduction)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


class FieldOfViewConfusionMatrix(FieldOfViewMetricHandler, PerImageConfusionMatrix):
    """
    MONAI's ``ConfusionMatrix`` handler counting only the pixels inside the FOV
    (:class:`scripts.metrics.FieldOfViewConfusionMatrixMetric`), with the per-image details of
    :class:`PerImageConfusionMatrix`: ``<name>_raw.csv`` holds each image's sensitivity, specificity, accuracy, ...

    Takes the arguments of ``monai.handlers.ConfusionMatrix`` (one ``metric_name``).
    """

    def __init__(self, include_background: bool = True, metric_name: str = "hit_rate", compute_sample: bool = False,
                 reduction: str = "mean", output_transform=lambda x: x, save_details: bool = True) -> None:
        metric_fn = FieldOfViewConfusionMatrixMetric(include_background, metric_name, compute_sample, reduction)
        self.metric_name = metric_name
        # past ConfusionMatrix.__init__, which would build MONAI's metric over the whole image
        IgniteMetricHandler.__init__(self, metric_fn=metric_fn, output_transform=output_transform,
                                     save_details=save_details)
