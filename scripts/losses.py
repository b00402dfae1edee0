# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""PolyDice loss (method.md §2): Dice loss as scale and angle, with a re-weighted Taylor polynomial in the angle."""

from __future__ import annotations

import math

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from scripts.errors import is_int

__all__ = ["PolyDiceLoss", "AdaptivePolyDiceLoss", "WeightedSumLoss", "theta_squared"]

# Below this x the closed form loses nothing but its derivative, (d/dx)asin(sqrt(x/2)), is infinite at x = 0.
_SERIES_X0 = 0.05
# theta^2 = acos(1 - x)^2 = 2 * sum_{n>=1} (2x)^n / (n^2 C(2n, n)) = 2x + x^2/3 + 4x^3/45 + x^4/35 + ...
# (method.md writes 8/45 for the x^3 coefficient; 4/45 is correct: x = 0.1 gives acos(0.9)^2 = 0.2034252...).
# Nine terms leave a relative truncation error of ~1e-16 at x = _SERIES_X0.
_SERIES_COEFFS = tuple(2.0 * 2.0**n / (n * n * math.comb(2 * n, n)) for n in range(1, 10))


def theta_squared(x: torch.Tensor) -> torch.Tensor:
    """
    Return ``theta**2`` where ``theta = acos(1 - x)``, for ``x = 1 - cos(theta)`` in ``[0, 2]``, without the
    cancellation of ``acos(1 - x)`` and with a finite derivative (``2``) at ``x = 0``.
    """
    small = x < _SERIES_X0
    # Double-where: each branch only ever sees inputs where it is finite, so the unselected one
    # cannot put inf/NaN into the gradient.
    xs = torch.where(small, x, torch.zeros_like(x))
    series = torch.zeros_like(xs)
    for c in reversed(_SERIES_COEFFS):
        series = (series + c) * xs
    xl = torch.where(small, torch.full_like(x, _SERIES_X0), x)
    closed = (2.0 * torch.asin(torch.sqrt(xl / 2.0))) ** 2
    return torch.where(small, series, closed)


class PolyDiceLoss(_Loss):
    """
    Poly-Dice loss for binary segmentation: the (squared-denominator) Dice loss written as ``1 - s cos(theta)``
    with ``cos(theta)`` replaced by a truncated, re-weighted Taylor polynomial in ``theta``.

    Per image, with ``p`` the flattened foreground probabilities and ``y`` the flattened binary mask (length H*W...):

        s      = (2 |p| |y| + smooth_nr) / (|p|^2 + |y|^2 + smooth_dr)      (scale, 0 <= s <= 1)
        theta  = acos(<p, y> / (|p| |y|))                                  (angle, in [0, pi/2])
        L(K, eps) = (1 - s) + s * [ (1/2 + eps) theta^2 + sum_{k=2..K} (-1)^(k-1) theta^(2k) / (2k)! ]

    ``order=None`` does not truncate: ``L = (1 - s) + s * [(1 - cos(theta)) + eps * theta^2]``, which for
    ``eps = 0`` and zero smoothing is exactly ``DiceLoss(squared_pred=True)`` on the foreground channel.

    Empty masks: when ``|y| = 0`` or ``|p| = 0`` the angle is undefined; ``theta = 0`` is used, so the loss is
    ``1 - s``. For ``y = 0`` this is ``1 - smooth_nr / (|p|^2 + smooth_dr)``, exactly MONAI's
    ``DiceLoss(squared_pred=True)`` with the same smoothing, which still pushes ``p`` towards 0.

    ``1 - cos(theta)`` is computed as ``|p/|p| - y/|y||^2 / 2`` and ``theta^2`` by :func:`theta_squared`, so
    near-perfect predictions neither cancel nor produce non-finite gradients.
    """

    def __init__(
        self,
        eps: float = 0.0,
        order: int | None = 1,
        softmax: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        """
        Args:
            eps: default shift of the leading (``theta^2``) coefficient, ``1/2 + eps``; overridable in ``forward``.
            order: number ``K >= 1`` of Taylor terms kept, or None for the untruncated ``1 - cos(theta)``.
            softmax: if True, ``input`` are logits of shape (B, 2, *spatial) and channel 1 after a softmax over
                channels is the foreground. If False, ``input`` are probabilities: channel 1 of (B, 2, *spatial)
                or channel 0 of (B, 1, *spatial) is the foreground.
            smooth_nr: a small constant added to the numerator of ``s``.
            smooth_dr: a small constant added to the denominator of ``s``.
            reduction: {``"none"``, ``"mean"``, ``"sum"``} over the batch; ``"none"`` returns shape (B,).

        Raises:
            ValueError: When ``order`` is neither None nor an int >= 1, or a smoothing term is negative.
        """
        super().__init__(reduction=LossReduction(reduction).value)
        if order is not None and not is_int(order, 1):
            raise ValueError(f"order must be None or an int >= 1, got {order!r}.")
        if smooth_nr < 0 or smooth_dr < 0:
            raise ValueError(f"smooth_nr and smooth_dr must be >= 0, got {smooth_nr} and {smooth_dr}.")
        self.eps = float(eps)
        self.order = order
        self.softmax = softmax
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        # alpha_k = (-1)^(k-1) / (2k)! for k = 2..K; the k = 1 coefficient is 1/2 + eps.
        self._alphas = tuple((-1) ** (k - 1) / math.factorial(2 * k) for k in range(2, (order or 1) + 1))

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, eps: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            input: logits or probabilities, shape (B, C, *spatial), see ``softmax``.
            target: binary foreground mask, shape (B, 1, *spatial).
            eps: overrides the constructor ``eps``; a float or a tensor of shape (B,) (one value per image).

        Raises:
            ValueError: When ``input``, ``target`` or ``eps`` have unexpected shapes.
        """
        if input.ndim < 3:
            raise ValueError(f"input must have shape (B, C, *spatial), got {tuple(input.shape)}.")
        n_ch = input.shape[1]
        if n_ch not in ((2,) if self.softmax else (1, 2)):
            need = "2 channels (logits) with softmax=True" if self.softmax else "1 or 2 channels with softmax=False"
            raise ValueError(f"input must have {need}, got shape {tuple(input.shape)}.")
        b = input.shape[0]
        if tuple(target.shape) != (b, 1, *input.shape[2:]):
            raise ValueError(
                f"target must have shape (B, 1, *spatial) = {(b, 1, *input.shape[2:])}, got {tuple(target.shape)}."
            )
        # Half precision overflows the sums of squares of a full image; accumulate in float32 at least.
        dtype = torch.promote_types(input.dtype, torch.float32)
        if self.softmax:
            input = torch.softmax(input.to(dtype), dim=1)
        p = input[:, n_ch - 1].to(dtype).reshape(b, -1)
        y = target.to(dtype).reshape(b, -1)

        eps_t = torch.as_tensor(self.eps if eps is None else eps, dtype=dtype, device=p.device)
        if eps_t.ndim != 0 and tuple(eps_t.shape) != (b,):
            raise ValueError(f"eps must be a float or a tensor of shape (B,) = ({b},), got {tuple(eps_t.shape)}.")

        tiny = torch.finfo(dtype).tiny
        pp, yy = (p * p).sum(1), (y * y).sum(1)
        # Clamped sums keep sqrt (and its gradient) finite at p = 0 or y = 0; those images are masked below.
        norm_p, norm_y = pp.clamp_min(tiny).sqrt(), yy.clamp_min(tiny).sqrt()
        valid = (pp > tiny) & (yy > tiny)
        s = (2.0 * torch.where(valid, norm_p * norm_y, 0.0) + self.smooth_nr) / (pp + yy + self.smooth_dr)

        # 1 - cos(theta) from unit vectors: no cancellation as p -> y, unlike 1 - <p, y> / (|p| |y|).
        x = 0.5 * (p / norm_p[:, None] - y / norm_y[:, None]).square().sum(1)
        x = torch.where(valid, x.clamp(0.0, 2.0), 0.0)
        t2 = theta_squared(x)
        if self.order is None:
            poly = x + eps_t * t2
        else:
            higher = torch.zeros_like(t2)
            for a in reversed(self._alphas):  # Horner in theta^2 for sum_{k>=2} alpha_k theta^(2k-2)
                higher = (higher + a) * t2
            poly = t2 * (0.5 + eps_t + higher)
        loss = (1.0 - s) + s * poly

        if self.reduction == LossReduction.MEAN.value:
            return loss.mean()
        if self.reduction == LossReduction.SUM.value:
            return loss.sum()
        return loss


class AdaptivePolyDiceLoss(PolyDiceLoss):
    """
    :class:`PolyDiceLoss` whose ε is each image's own, read from an :class:`~scripts.difficulty.EpsilonTable`
    that the difficulty pass keeps up to date (method.md §3-4).

    The image of each batch item is identified by its ground-truth file path, ``target.meta["filename_or_obj"]``,
    which MONAI keeps on the label through collation, so neither the position of the item in a shuffled batch
    nor any iteration hook is involved. Images the table does not hold yet get the table's default ε.

    Args:
        table: the ε table, shared with the difficulty pass handler.
        kwargs: the other :class:`PolyDiceLoss` arguments (``order``, ``softmax``, smoothing, ``reduction``).
    """

    def __init__(self, table, **kwargs) -> None:
        if "eps" in kwargs:
            raise ValueError("AdaptivePolyDiceLoss takes its eps from the table; use PolyDiceLoss for a fixed eps.")
        super().__init__(**kwargs)
        self.table = table

    def forward(self, input: torch.Tensor, target: torch.Tensor, eps=None) -> torch.Tensor:
        if eps is None:
            ids = getattr(target, "meta", {}).get("filename_or_obj")
            if ids is None:
                raise ValueError("target carries no meta['filename_or_obj'] (a MONAI MetaTensor label with its file "
                                 "path is needed to look up each image's eps).")
            ids = [ids] if isinstance(ids, str) else list(ids)
            if len(ids) != input.shape[0]:
                raise ValueError(f"target meta names {len(ids)} images for a batch of {input.shape[0]}.")
            eps = self.table.lookup(ids, device=input.device)
        return super().forward(input, target, eps)


class WeightedSumLoss(_Loss):
    """
    ``L = Σ_i w_i L_i(input, target)``: a weighted sum of losses that each take the same ``(input, target)``, so
    that a config can combine MONAI losses, e.g. Dice with a distance term (Karimi and Salcudean's Hausdorff
    loss is used beside Dice, not alone). Each term keeps its own reduction; they must give tensors of one shape.

    Args:
        losses: the terms, e.g. ``[DiceLoss(...), LogHausdorffDTLoss(...)]``.
        weights: one non-negative weight per term (default: all 1).
    """

    def __init__(self, losses, weights=None) -> None:
        super().__init__()
        losses = list(losses)
        weights = [1.0] * len(losses) if weights is None else [float(w) for w in weights]
        if not losses or len(weights) != len(losses):
            raise ValueError(f"need at least one loss and one weight per loss, got {len(losses)} losses and "
                             f"{len(weights)} weights.")
        if any(w < 0 for w in weights):
            raise ValueError(f"weights must be non-negative, got {weights}.")
        self.losses = torch.nn.ModuleList(losses)
        self.weights = weights

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(w * loss(input, target) for w, loss in zip(self.weights, self.losses))
