# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""Ignite handlers of the bundle: atomic checkpoints, the difficulty pass, the evaluation and uncertainty reports."""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from pathlib import Path

import ignite.distributed as idist
import monai
import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointSaver
from monai.metrics import compute_confusion_matrix_metric
from PIL import Image

from scripts.difficulty import (
    ASSIGNMENTS,
    EMPTY_RULES,
    SIGNALS,
    EpsilonTable,
    dice_error,
    epsilon_from_difficulty,
    image_difficulty,
    normalise_difficulty,
)
from scripts.files import atomic_path, atomic_write
from scripts.settings import is_int
from scripts.uncertainty import (
    check_chunk_size,
    mc_foreground_samples,
    uncertainty_maps,
)

__all__ = ["AtomicCheckpointSaver", "DifficultyPass", "SegmentationReport", "UncertaintyReport"]


class _ReplacingDiskSaver(DiskSaver):
    """
    Ignite's ``DiskSaver(atomic=True)`` (a temporary file, renamed over the target; since Ignite 0.5 it also
    grants the group and others read permission, the reason MONAI chose ``atomic=False``), with MONAI's fixed
    file names. Ignite removes a checkpoint's predecessor *before* writing it; under a fixed name (``model.pt``,
    ``checkpoint_final.pt``) the rename replaces it anyway, so the old file is kept until the new one is whole.
    """

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
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
    The Monte Carlo dropout difficulty pass of method.md §3-4, as an Ignite handler on the trainer.

    At the start of epoch e (counted from 1) with e >= ``start`` and (e - ``start``) mod ``interval`` = 0, the
    trainer's network, frozen, makes ``num_samples`` dropout samples of every training image (only dropout
    stochastic, BatchNorm in eval mode, no gradients; encoder once, decoder N times). From the samples' mutual
    information it scores each image's difficulty D (mean MI over the ground-truth foreground), normalises D over
    all images of the pass, ``D_norm = (D - D_p) / (σ_D + δ)``, maps it to
    ``ε = ε_min + (ε_max - ε_min) sigmoid(k D_norm)`` and writes ε to ``table``, which the loss reads until the
    next pass. The pass runs inside ``torch.random.fork_rng`` with its own seed (``seed``, epoch and rank), so the
    training's random stream, and with it every batch and augmentation, is the same as without the pass.

    Two controls of method.md §7 replace parts of this: ``signal="dice_error"`` scores D as 1 − Dice of the mean
    prediction instead of the mutual information, and ``assignment="shuffled"`` hands the pass's ε values to the
    images in a random order (the same values, the same level, no relation to the image's difficulty).

    Under ``torch.distributed`` each process scores every ``world_size``-th image from its rank on and the
    scores are gathered before the normalisation, so every process ends with the same table.

    Each pass adds one row per image to ``output_dir/difficulty_history.csv`` (``pass, epoch, image, label,
    D, D_norm, eps, seconds``, the last the pass's wall time; rows of that pass number or later, left by a crashed
    or older run, are replaced), saves the uncertainty maps of ``num_map_images`` fixed images to
    ``output_dir/mc_maps/pass_NNN.npz``, logs a one-line summary and, with a ``summary_writer``, TensorBoard
    scalars and histograms. When training completes it draws the figures of ``scripts.figures``.

    Args:
        dataset: the training images and labels with deterministic preprocessing only (no augmentation).
        table: the ε table the loss reads.
        start: E₀, the first epoch a pass may run at.
        interval: τ, the number of epochs between passes.
        num_samples: N, dropout samples per image.
        percentile, delta: of the normalisation.
        eps_min, eps_max, sensitivity: of the map from D_norm to ε (k = sensitivity).
        empty: D of an image with an empty mask, ``"zero"`` or ``"image_mean"``.
        signal: ``"mutual_information"`` (the method) or ``"dice_error"`` (control: 1 − Dice of the mean prediction).
        assignment: ``"ranked"`` (the method: ε from the image's own D) or ``"shuffled"`` (control: the pass's
            ε values permuted across images, with a seed of ``seed`` and the epoch, the same in every process).
        batch_size, num_workers: of the pass's data loader.
        chunk_size: at most this many (sample, image) pairs per decoder call, which bounds memory; ``"auto"``:
            :func:`scripts.uncertainty.auto_chunk_size`.
        output_dir: where history, maps and figures go (rank 0 only); None writes nothing.
        num_map_images: how many fixed training images get their maps saved at every pass.
        seed: seed of the pass's dropout masks.
        summary_writer: a TensorBoard ``SummaryWriter``, or None.
    """

    def __init__(
        self,
        dataset,
        table: EpsilonTable,
        start: int = 0,
        interval: int = 10,
        num_samples: int = 10,
        percentile: float = 25.0,
        eps_min: float = 0.0,
        eps_max: float = 0.5,
        sensitivity: float = 2.0,
        empty: str = "zero",
        signal: str = "mutual_information",
        assignment: str = "ranked",
        delta: float = 1e-9,
        batch_size: int = 8,
        num_workers: int = 0,
        chunk_size: int | str = "auto",
        output_dir: str | Path | None = None,
        num_map_images: int = 8,
        seed: int = 0,
        summary_writer=None,
    ) -> None:
        for name, value, low in (("start", start, 0), ("interval", interval, 1), ("num_samples", num_samples, 2),
                                 ("batch_size", batch_size, 1)):
            if not is_int(value, low):
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        for name, value, allowed in (("empty", empty, EMPTY_RULES), ("signal", signal, SIGNALS),
                                     ("assignment", assignment, ASSIGNMENTS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
        if not eps_min <= eps_max:
            raise ValueError(f"eps_min ({eps_min}) must be <= eps_max ({eps_max}).")
        self.dataset, self.table = dataset, table
        self.start, self.interval, self.num_samples = start, interval, num_samples
        self.percentile, self.delta, self.empty = float(percentile), float(delta), empty
        self.signal, self.assignment = signal, assignment
        self.eps_min, self.eps_max, self.sensitivity = float(eps_min), float(eps_max), float(sensitivity)
        check_chunk_size(chunk_size)
        self.batch_size, self.num_workers, self.chunk_size = batch_size, num_workers, chunk_size
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.num_map_images, self.seed, self.writer = num_map_images, seed, summary_writer
        self.logger = logging.getLogger(__name__)

    def is_due(self, epoch: int) -> bool:
        """Algorithm 1's schedule (``Events.EPOCH_STARTED(every=τ)`` would never fire at epoch 1)."""
        return epoch >= self.start and (epoch - self.start) % self.interval == 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED(event_filter=lambda _, epoch: self.is_due(epoch)), self)
        engine.add_event_handler(Events.COMPLETED, self.write_figures)

    def __call__(self, engine: Engine) -> None:
        self.run_pass(engine.network, engine.state.epoch)

    def run_pass(self, network: torch.nn.Module, epoch: int) -> dict:
        """Score every training image with ``network`` and update the table. Returns the pass's image and label
        ids, D, D_norm and ε (all processes' together, in dataset order) and how many images this process scored."""
        began = time.perf_counter()
        rank, world = idist.get_rank(), idist.get_world_size()
        device = next(network.parameters()).device
        shard = list(range(rank, len(self.dataset), world))
        map_positions = set(np.random.default_rng(self.seed).permutation(len(shard))[: self.num_map_images].tolist())
        rows, maps = [], []
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.seed + 100_003 * epoch + rank)
            loader = monai.data.DataLoader(torch.utils.data.Subset(self.dataset, shard), batch_size=self.batch_size,
                                           shuffle=False, num_workers=self.num_workers)
            position = 0
            for batch in loader:
                images = batch["image"].as_tensor().to(device)
                labels = batch["label"].as_tensor().to(device)
                samples = mc_foreground_samples(network, images, self.num_samples, self.chunk_size)
                unc = uncertainty_maps(samples)
                if self.signal == "dice_error":
                    d = dice_error(unc["mean"], labels).cpu()
                else:
                    d = image_difficulty(unc["mutual_information"], labels, self.empty).cpu()
                for b in range(len(images)):
                    rows.append((shard[position], str(batch["image"].meta["filename_or_obj"][b]),
                                 str(batch["label"].meta["filename_or_obj"][b]), float(d[b])))
                    if position in map_positions:
                        maps.append({"id": rows[-1][1], "image": images[b].cpu(), "label": labels[b, 0].cpu(),
                                     **{k: v[b].float().cpu() for k, v in unc.items()}})
                    position += 1
        rows = [r for part in idist.all_gather(rows) for r in part]  # every process's rows (one part without DDP)
        rows.sort()  # dataset order, whatever the sharding
        _, images, labels, d = zip(*rows)
        d = torch.tensor(d, dtype=torch.float64)
        d_norm = normalise_difficulty(d, self.percentile, self.delta)
        eps = epsilon_from_difficulty(d_norm, self.eps_min, self.eps_max, self.sensitivity)
        if self.assignment == "shuffled":
            generator = torch.Generator().manual_seed(self.seed + 100_003 * epoch)
            eps = eps[torch.randperm(len(eps), generator=generator)]
        self.table.update(labels, eps)
        seconds = time.perf_counter() - began
        self.logger.info(
            f"difficulty pass {self.table.num_passes} at epoch {epoch}: {len(d)} images in {seconds:.1f} s; "
            f"D min/median/max {d.min():.4g}/{d.median():.4g}/{d.max():.4g}; "
            f"eps min/median/max {eps.min():.3f}/{eps.median():.3f}/{eps.max():.3f}"
        )
        if rank == 0:
            self._record(epoch, images, labels, d, d_norm, eps, maps, seconds)
        return {"images": list(images), "labels": list(labels), "D": d, "D_norm": d_norm, "eps": eps,
                "scored_here": len(shard)}

    def _record(self, epoch, images, labels, d, d_norm, eps, maps, seconds) -> None:
        k = self.table.num_passes
        if self.writer is not None:
            for name, values in (("D", d), ("eps", eps)):
                self.writer.add_histogram(f"difficulty_pass/{name}", values, epoch)
                self.writer.add_scalar(f"difficulty_pass/{name}_median", float(values.median()), epoch)
            self.writer.add_scalar("difficulty_pass/seconds", seconds, epoch)
            self.writer.flush()
        if self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        history = self.output_dir / "difficulty_history.csv"
        # rows of this pass or later come from a run that crashed after them, or from an older run: drop them
        kept = []
        if history.exists():
            with open(history, newline="") as f:
                kept = [r for r in csv.reader(f)][1:]
            kept = [r for r in kept if int(r[0]) < k]
        with atomic_write(history, newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["pass", "epoch", "image", "label", "D", "D_norm", "eps", "seconds"])
            writer.writerows(kept)
            for row in zip(images, labels, d.tolist(), d_norm.tolist(), eps.tolist()):
                writer.writerow([k, epoch, row[0], row[1], f"{row[2]:.6g}", f"{row[3]:.6g}", f"{row[4]:.6g}",
                                 f"{seconds:.3f}"])
        if maps:
            with atomic_path(self.output_dir / "mc_maps" / f"pass_{k:03d}.npz") as tmp:
                np.savez_compressed(
                    tmp, ids=np.array([m["id"] for m in maps]), epoch=epoch,
                    **{key: torch.stack([m[key] for m in maps]).numpy().astype(np.float32)
                       for key in ("image", "label", "mean", "variance", "entropy", "mutual_information")})

    def write_figures(self, engine: Engine | None = None) -> list[Path]:
        """The uncertainty-evolution grids of the easiest and hardest mapped image (by the Dice of their last
        mean prediction) and the ε distribution over the passes; rank 0, when a pass has run."""
        if self.output_dir is None or not (self.output_dir / "difficulty_history.csv").exists():
            return []
        if idist.get_rank() != 0:
            return []
        from scripts.figures import write_figures

        scores = None
        last = sorted((self.output_dir / "mc_maps").glob("pass_*.npz"))
        if last:
            with np.load(last[-1]) as z:
                dice = 1.0 - dice_error(torch.as_tensor(z["mean"]), torch.as_tensor(z["label"]))  # both empty: 1
                scores = {str(i): float(v) for i, v in zip(z["ids"], dice)}
        return write_figures(self.output_dir, scores=scores)


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

    Under ``torch.distributed`` (``configs/multi_gpu_evaluate.yaml``) every process must attach it: the image names
    are gathered to match the metric details, which MONAI gathers, and rank 0 writes the files.
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
        # MONAI gathers the details of all processes in rank order; gather the names the same way
        images = [name for part in idist.all_gather(self._images) for name in part]
        if idist.get_rank() != 0:
            return
        n = len(next(iter(columns.values())))
        if len(images) != n:
            raise RuntimeError(f"collected {len(images)} image names for {n} metric rows.")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.output_dir / "metrics.csv", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", *columns])
            for i, image in enumerate(images):
                writer.writerow([image, *(f"{columns[c][i]:.6f}" for c in columns)])
        summary = {
            c: {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v)), "median": float(np.nanmedian(v))}
            for c, v in columns.items()
        }
        summary["num_images"] = n
        with atomic_write(self.output_dir / "metrics.json") as f:
            f.write(json.dumps(summary, indent=2) + "\n")
        engine.logger.info(
            "test metrics over %d images: %s", n, ", ".join(f"{c} {s['mean']:.4f}" for c, s in summary.items()
                                                             if isinstance(s, dict))
        )


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
        self._write_csv()

    def _write_csv(self) -> None:
        with atomic_write(self.csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.COLUMNS)
            writer.writerows(self._rows)

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
        self._write_csv()
