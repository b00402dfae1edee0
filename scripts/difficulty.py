# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Image difficulty from mutual information, its normalisation over a pass, the map to the loss parameter ε
(method.md §3), and the table that holds each training image's ε between passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from monai.metrics import compute_dice

__all__ = [
    "EMPTY_RULES", "SIGNALS", "ASSIGNMENTS", "image_difficulty", "dice_error", "normalise_difficulty",
    "epsilon_from_difficulty", "EpsilonTable",
]

EMPTY_RULES = ("zero", "image_mean")
# the difficulty signal of a pass: the method's mutual information, or a control of method.md §7
SIGNALS = ("mutual_information", "dice_error")
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
    d_norm: torch.Tensor, eps_min: float = 0.0, eps_max: float = 0.5, sensitivity: float = 2.0
) -> torch.Tensor:
    """``ε = ε_min + (ε_max − ε_min) · sigmoid(k · D_norm)``, with k the sensitivity: hard images get a larger ε."""
    if eps_max < eps_min:
        raise ValueError(f"eps_max ({eps_max}) must be >= eps_min ({eps_min}).")
    return eps_min + (eps_max - eps_min) * torch.sigmoid(sensitivity * d_norm)


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
        self.default = float(default)
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
