# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Image difficulty from Monte Carlo dropout samples (the default: the predictive entropy over the predicted
foreground; the thesis's: the mutual information over the label's foreground), its normalisation over a pass, the
map to the loss parameter ε (method.md §3), the table that holds each training image's ε between passes, and the difficulty pass itself.

The pass (:class:`DifficultyPass`, an Ignite handler on the trainer) combines three objects of this module, each
its own config id in ``configs/train.yaml``: a scorer (``difficulty#scorer``: dropout samples and masks of a batch
in, one D per image out), the ε map (``difficulty#eps_map``: the D of every image of the pass in, ε out) and the
table (``epsilon_table``: ε by image id, which the loss reads). :class:`DifficultyHistory` keeps what each pass
found, for people to look at.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import ignite.distributed as idist
import monai
import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.metrics import compute_dice

from scripts.audit import RANKINGS, label_suspicion, write_label_audit
from scripts.errors import InputError, check_choice, check_int, check_number
from scripts.files import atomic_path, atomic_write
from scripts.uncertainty import check_chunk_size, mc_foreground_samples, uncertainty_maps

__all__ = [
    "EMPTY_RULES", "ASSIGNMENTS", "MEASURES", "REGIONS", "image_difficulty", "boundary_band", "dice_error",
    "normalise_difficulty", "epsilon_from_difficulty", "UncertaintyDifficulty", "MutualInformationDifficulty",
    "DiceErrorDifficulty", "EpsilonMap", "EpsilonTable", "DifficultyPass", "DifficultyHistory",
]

EMPTY_RULES = ("zero", "image_mean")
# the per-pixel maps of scripts.uncertainty.uncertainty_maps a scorer can average: the epistemic part, or the total
MEASURES = ("mutual_information", "entropy")
# where it averages them: the label's foreground (the thesis), the predicted foreground (no label needed) or a band
# around the label's boundary
REGIONS = ("label", "prediction", "boundary")
# how the pass's ε values go to images: by difficulty (the method), or shuffled across images (a control)
ASSIGNMENTS = ("ranked", "shuffled")


def _match_mask(mask: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """``mask`` as (B, *spatial) like the per-pixel map ``like`` (a (B, 1, *spatial) mask loses its channel)."""
    if mask.ndim == like.ndim + 1 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {name} {tuple(like.shape)}.")
    return mask


def image_difficulty(mutual_information: torch.Tensor, mask: torch.Tensor, empty: str = "zero") -> torch.Tensor:
    """
    Per-image difficulty ``D = (1/|P|) Σ_{(i,j)∈P} I_ij``, the mean mutual information over the ground-truth
    foreground pixels P.

    Args:
        mutual_information: (B, *spatial) per-pixel mutual information.
        mask: (B, *spatial) or (B, 1, *spatial) binary ground truth.
        empty: D of an image with no foreground pixel: ``"zero"`` (D = 0) or ``"image_mean"`` (the mean over the
            whole image).

    Returns:
        (B,) float tensor.
    """
    if empty not in EMPTY_RULES:
        raise ValueError(f"empty must be one of {EMPTY_RULES}, got {empty!r}.")
    mask = _match_mask(mask, mutual_information, "mutual_information")
    mi = mutual_information.flatten(1).float()
    fg = (mask.flatten(1) > 0.5).to(mi.dtype)
    count = fg.sum(1)
    d = (mi * fg).sum(1) / count.clamp_min(1.0)
    fallback = mi.mean(1) if empty == "image_mean" else torch.zeros_like(d)
    return torch.where(count > 0, d, fallback)


def boundary_band(mask: torch.Tensor, width: int) -> torch.Tensor:
    """
    The pixels within ``width`` of the boundary of a binary mask, on both sides: ``dilate(M) ∧ ¬erode(M)`` with a
    (2·width + 1)² square (Chebyshev distance). Beyond the image's edge nothing counts, so the frame's edge is no
    boundary.

    Args:
        mask: (B, H, W) binary mask.
        width: the band's half-width in pixels, >= 1.

    Returns:
        (B, H, W) bool; all False for an empty or a full mask.
    """
    if mask.ndim != 3:
        raise ValueError(f"mask must be (B, H, W), got shape {tuple(mask.shape)}.")
    m = (mask > 0.5).float()[:, None]
    k = 2 * width + 1
    # max_pool2d pads with -inf: the neighbours outside the image are never the maximum, of m or of -m
    dilated = F.max_pool2d(m, k, stride=1, padding=width)
    eroded = -F.max_pool2d(-m, k, stride=1, padding=width)
    return ((dilated > 0.5) & (eroded < 0.5))[:, 0]


def dice_error(mean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """
    The control signal of method.md §7: ``1 − Dice`` of the thresholded mean prediction (``mean > 0.5``) against
    the ground truth, per image (MONAI ``compute_dice``; an image where both are empty scores 0).

    Args:
        mean: (B, *spatial) mean foreground probability over the dropout samples.
        mask: (B, *spatial) or (B, 1, *spatial) binary ground truth.

    Returns:
        (B,) float tensor in [0, 1].
    """
    mask = _match_mask(mask, mean, "mean")
    pred = (mean[:, None] > 0.5).float()
    dice = compute_dice(pred, (mask[:, None] > 0.5).float(), include_background=True, ignore_empty=False)
    return 1.0 - dice[:, 0]


def normalise_difficulty(d: torch.Tensor, percentile: float = 25.0, delta: float = 1e-9) -> torch.Tensor:
    """
    ``D_norm = (D − D_p) / (σ_D + δ)`` over all images scored in one pass: ``D_p`` the p-th percentile (linear
    interpolation, as ``numpy.percentile``), ``σ_D`` the population standard deviation (``numpy.std``).

    Args:
        d: (M,) difficulties of every image of the pass (all processes' together).
    """
    if d.ndim != 1 or d.numel() == 0:
        raise ValueError(f"d must be a non-empty 1-D tensor of difficulties, got shape {tuple(d.shape)}.")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}.")
    d = d.double()
    reference = torch.quantile(d, percentile / 100.0)
    return (d - reference) / (d.std(correction=0) + delta)


def epsilon_from_difficulty(
    d_norm: torch.Tensor, eps_min: float = 0.0, eps_max: float = 0.5, slope: float = 2.0
) -> torch.Tensor:
    """``ε = ε_min + (ε_max − ε_min) · sigmoid(k · D_norm)``, with k the slope: hard images get a larger ε."""
    if eps_max < eps_min:
        raise ValueError(f"eps_max ({eps_max}) must be >= eps_min ({eps_min}).")
    return eps_min + (eps_max - eps_min) * torch.sigmoid(slope * d_norm)


class UncertaintyDifficulty:
    """
    A difficulty scorer: one per-pixel uncertainty map of N dropout samples (:func:`uncertainty_maps`), averaged
    over one region of each image,

        D = (1/|R|) Σ_{(i,j)∈R} U_ij

    with U the predictive entropy ``H(ȳ)`` (``measure="entropy"``) or the mutual information
    ``H(ȳ) − (1/N) Σ_n H(ŷ⁽ⁿ⁾)`` (``"mutual_information"``), and R

    - ``"prediction"``: the predicted foreground ``ȳ > 0.5``, so no label is needed;
    - ``"label"``: the ground-truth foreground (the thesis's D, :class:`MutualInformationDifficulty`);
    - ``"boundary"``: the pixels within ``band_width`` of the label's boundary (:func:`boundary_band`).

    The defaults, the entropy over the predicted foreground, are the bundle's since version 0.13: of the signals
    docs/results_difficulty.md compared it ranked images by their error best, stably from N = 4.

    An image with an empty region gets D by ``empty``: ``"zero"`` or ``"image_mean"`` (U's mean over the image:
    where the model predicts nothing, how unsure it is anywhere).

    Call with ``samples`` (N, B, H, W) foreground probabilities and ``mask`` (B, H, W) or (B, 1, H, W) (read only
    for the label and boundary regions); returns (B,) float.
    """

    def __init__(self, measure: str = "entropy", region: str = "prediction", band_width: int = 2,
                 empty: str = "zero") -> None:
        name = type(self).__name__
        self.measure = check_choice(measure, f"{name} measure", MEASURES)
        self.region = check_choice(region, f"{name} region", REGIONS)
        self.band_width = check_int(band_width, f"{name} band_width", 1)
        self.empty = check_choice(empty, f"{name} empty", EMPTY_RULES)

    def __call__(self, samples: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        maps = uncertainty_maps(samples)
        if self.region == "prediction":
            region = maps["mean"] > 0.5
        else:
            region = _match_mask(mask, maps["mean"], "samples[0]") > 0.5
            if self.region == "boundary":
                region = boundary_band(region, self.band_width)
        return image_difficulty(maps[self.measure], region, self.empty)


class MutualInformationDifficulty(UncertaintyDifficulty):
    """
    The thesis's difficulty scorer (method.md §3): the mutual information of N dropout samples, averaged over each
    image's ground-truth foreground (:func:`image_difficulty`); ``configs/difficulty/thesis.yaml``.

    Args:
        empty: D of an image whose mask is empty, ``"zero"`` or ``"image_mean"`` (the mean over the whole image).
    """

    def __init__(self, empty: str = "zero") -> None:
        super().__init__("mutual_information", "label", empty=empty)


class DiceErrorDifficulty:
    """
    A control of method.md §7 in place of an uncertainty scorer: D is 1 − Dice of the thresholded
    mean of the samples against the mask (:func:`dice_error`), an error signal with no uncertainty in it.

    Call with ``samples`` (N, B, *spatial) and ``mask`` (B, *spatial) or (B, 1, *spatial); returns (B,) float.
    """

    def __call__(self, samples: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return dice_error(samples.float().mean(0), mask)


class EpsilonMap:
    """
    The map from the difficulties of one pass to the images' ε (method.md §3):
    ``D_norm = (D − D_p) / (σ_D + δ)`` (:func:`normalise_difficulty`), then
    ``ε = ε_min + (ε_max − ε_min) · sigmoid(k · D_norm)`` (:func:`epsilon_from_difficulty`).

    Args:
        eps_min, eps_max: the range of ε, ``eps_min <= eps_max``.
        slope: k, how sharply ε rises with the normalised difficulty (>= 0).
        percentile: p of the reference difficulty D_p, in [0, 100].
        delta: δ, which keeps the normalisation finite when every D is the same.
        assignment: ``"ranked"`` (the method: each image's ε from its own D) or ``"shuffled"`` (control of
            method.md §7: the same ε values handed to the images in a random order, seeded by ``seed`` and the
            epoch, the same in every process).
        seed: seed of the shuffled assignment.

    Call with ``d`` (M,), the difficulties of every image of the pass, and the epoch; returns ε, (M,) float64.
    """

    def __init__(self, eps_min: float = 0.0, eps_max: float = 0.5, slope: float = 2.0, percentile: float = 25.0,
                 delta: float = 1e-9, assignment: str = "ranked", seed: int = 0) -> None:
        self.eps_min = check_number(eps_min, "EpsilonMap eps_min (--eps_min)", low=-0.5)
        self.eps_max = check_number(eps_max, "EpsilonMap eps_max (--eps_max)", low=-0.5)
        if self.eps_min > self.eps_max:
            raise InputError(f"--eps_min ({eps_min}) must not exceed --eps_max ({eps_max}).")
        self.slope = check_number(slope, "EpsilonMap slope", low=0.0)
        self.percentile = check_number(percentile, "EpsilonMap percentile", 0.0, 100.0)
        self.delta = check_number(delta, "EpsilonMap delta", low=0.0)
        self.assignment = check_choice(assignment, "EpsilonMap assignment", ASSIGNMENTS)
        self.seed = check_int(seed, "EpsilonMap seed")

    def normalise(self, d: torch.Tensor) -> torch.Tensor:
        """D_norm of every image of the pass, (M,) float64."""
        return normalise_difficulty(d, self.percentile, self.delta)

    def __call__(self, d: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        eps = epsilon_from_difficulty(self.normalise(d), self.eps_min, self.eps_max, self.slope)
        if self.assignment == "shuffled":
            generator = torch.Generator().manual_seed(self.seed + 100_003 * epoch)
            eps = eps[torch.randperm(len(eps), generator=generator)]
        return eps


class EpsilonTable:
    """
    Each training image's ε, keyed by a stable image id (its file path), and the number of difficulty passes
    run so far. The adaptive handler writes it after every pass and the loss reads it for every batch; it is
    saved in the training checkpoints (``state_dict``/``load_state_dict``) so that a resumed run continues
    with the same values.

    Args:
        default: ε of an image no pass has scored yet (every image, before the first pass).
    """

    def __init__(self, default: float = 0.0) -> None:
        self.default = check_number(default, "EpsilonTable default (--eps_initial)", low=-0.5)
        self.values: dict[str, float] = {}
        self.num_passes = 0

    def lookup(self, ids: Iterable[str], device: torch.device | str | None = None) -> torch.Tensor:
        """(len(ids),) float32 tensor of the ids' ε, ``default`` for ids not scored yet."""
        return torch.tensor([self.values.get(str(i), self.default) for i in ids], dtype=torch.float32,
                            device=device)

    def update(self, ids: Sequence[str], eps: torch.Tensor | Sequence[float]) -> None:
        """Set the ε of ``ids`` after a pass and count the pass."""
        eps = torch.as_tensor(eps, dtype=torch.float64).flatten().tolist()
        if len(eps) != len(ids):
            raise ValueError(f"got {len(eps)} ε values for {len(ids)} image ids.")
        self.values.update({str(i): float(e) for i, e in zip(ids, eps)})
        self.num_passes += 1

    def __len__(self) -> int:
        return len(self.values)

    def state_dict(self) -> dict:
        # a list of pairs, not a dict keyed by paths: torch.load(weights_only=True) restores it as saved
        return {"default": self.default, "num_passes": self.num_passes, "values": sorted(self.values.items())}

    def load_state_dict(self, state: Mapping) -> None:
        self.default = float(state["default"])
        self.num_passes = int(state["num_passes"])
        self.values = {str(k): float(v) for k, v in state["values"]}


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
    the ``num_audit_images`` most suspect labels (sampled again: a few images, not the set), ranked by
    ``audit_ranking`` (:data:`scripts.audit.RANKINGS`).
    """

    def __init__(self, dataset, scorer, eps_map, table, start: int = 0, interval: int = 10, num_samples: int = 4,
                 batch_size: int = 8, num_workers: int = 0, chunk_size: int | str = "auto", seed: int = 0,
                 history: DifficultyHistory | None = None, num_map_images: int = 8, num_audit_images: int = 8,
                 audit_ranking: str = "dice_error") -> None:
        self.dataset, self.scorer, self.eps_map, self.table, self.history = dataset, scorer, eps_map, table, history
        self.start = check_int(start, "DifficultyPass start (--mc_start)")
        self.interval = check_int(interval, "DifficultyPass interval (--mc_interval)", 1)
        self.num_samples = check_int(num_samples, "DifficultyPass num_samples (--mc_samples)", 2)
        self.batch_size, self.num_workers = check_int(batch_size, "batch_size", 1), num_workers
        self.chunk_size, self.seed = check_chunk_size(chunk_size), seed
        self.num_map_images, self.num_audit_images = num_map_images, num_audit_images
        self.audit_ranking = check_choice(audit_ranking, "DifficultyPass audit_ranking", RANKINGS)

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

    def audit(self, network: torch.nn.Module, output_dir: str | Path) -> list[Path]:
        """
        The label audit of a trained ``network`` on demand (``configs/audit.yaml``): one :meth:`score` (the ε table
        untouched), then ``label_audit.csv`` and ``figures/label_audit.png`` in ``output_dir``. Returns both paths.
        """
        from scripts.figures import plot_label_audit  # matplotlib only where a figure is drawn

        output_dir = Path(output_dir)
        result = self.score(network, epoch=0)
        table = write_label_audit(output_dir, result, self.suspect_maps(network, result))
        return [table, plot_label_audit(output_dir / "mc_maps" / "label_audit.npz", table,
                                        output_dir / "figures" / "label_audit.png")]

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
                "dice_error": error, "suspicion": label_suspicion(d, error, self.audit_ranking),
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
        from scripts.figures import plot_label_audit, write_figures  # matplotlib only where a figure is drawn

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
