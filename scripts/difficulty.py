# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Image difficulty from mutual information, its normalisation over a pass, the map to the loss parameter ε
(method.md §3), and the table that holds each training image's ε between passes.

A difficulty pass (:class:`scripts.handlers.DifficultyPass`) combines three objects of this module, each its own
config id in ``configs/train.yaml``: a scorer (``difficulty#scorer``: dropout samples and masks of a batch in, one
D per image out), the ε map (``difficulty#eps_map``: the D of every image of the pass in, ε out) and the table
(``epsilon_table``: ε by image id, which the loss reads).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from monai.metrics import compute_dice

from scripts.errors import InputError, check_choice, check_int, check_number
from scripts.uncertainty import uncertainty_maps

__all__ = [
    "EMPTY_RULES", "ASSIGNMENTS", "image_difficulty", "dice_error", "normalise_difficulty", "epsilon_from_difficulty",
    "MutualInformationDifficulty", "DiceErrorDifficulty", "EpsilonMap", "EpsilonTable",
]

EMPTY_RULES = ("zero", "image_mean")
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


class MutualInformationDifficulty:
    """
    The method's difficulty scorer (method.md §3): the mutual information of N dropout samples, averaged over each
    image's ground-truth foreground (:func:`image_difficulty`).

    Args:
        empty: D of an image whose mask is empty, ``"zero"`` or ``"image_mean"`` (the mean over the whole image).

    Call with ``samples`` (N, B, *spatial) foreground probabilities and ``mask`` (B, *spatial) or (B, 1, *spatial);
    returns (B,) float.
    """

    def __init__(self, empty: str = "zero") -> None:
        self.empty = check_choice(empty, "MutualInformationDifficulty empty", EMPTY_RULES)

    def __call__(self, samples: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return image_difficulty(uncertainty_maps(samples)["mutual_information"], mask, self.empty)


class DiceErrorDifficulty:
    """
    A control of method.md §7 in place of :class:`MutualInformationDifficulty`: D is 1 − Dice of the thresholded
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
