# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
The vessel metrics of docs/tubular.md §1 as MONAI metrics: per image, inside the field of view (FOV); and, at the
end, the metrics of annotated colonoscopy clips (SUN-SEG's S-α and E-φ of a frame, the temporal stability of a
clip), plain functions of numpy arrays that ``scripts.reports.ClipMetricsSaver`` applies.

Inputs, as MONAI's ``DiceMetric`` takes them: ``y_pred`` and ``y`` batch-first (B, C, H, W) tensors or lists of
channel-first (C, H, W) ones (2-D only), binary (0/1) one-hot masks (C = 2: background, foreground, as the bundle's
``AsDiscreted(argmax, to_onehot=2)`` makes them) or single-channel foreground masks. ``include_background=False``
drops channel 0 of an input with C > 1 (``monai.metrics.utils.ignore_background``), so a one-hot input can meet a
single-channel one. ``mask`` is the FOV, (B, 1, H, W) or a list of (1, H, W), inside where > 0.5; None: the whole
image. Each metric buffers a (B, C) float64 tensor, one value per image and class, NaN where undefined, and
``aggregate`` reduces the non-NaN values as ``DiceMetric`` does (``reduction``, ``get_not_nans``).

How the FOV restricts a metric:

- Topology (clDice, component ratio, Betti errors): both masks are cut to the FOV (pixels outside it are
  background) before skeletons and components are taken; skimage's 8-connected foreground, 4-connected background.
- Confusion-matrix metrics and AUC count only the pixels inside the FOV: specificity, accuracy and AUC would move
  with the number of outside pixels if these were only zeroed. Dice inside the FOV is Dice of the masks zeroed
  outside it (outside pixels add nothing to |P ∩ G|, |P| or |G|): ``"f1 score"`` here, or MONAI's ``DiceMetric``
  on zeroed masks, which differ only when the label is empty (f1: NaN if P is empty too, else 0).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import ConfusionMatrixMetric, CumulativeIterationMetric, get_confusion_matrix
from monai.metrics.confusion_matrix import check_confusion_matrix_metric_name
from monai.metrics.utils import do_metric_reduction, ignore_background
from monai.utils import MetricReduction, convert_to_numpy, ensure_tuple
from scipy import ndimage

from scripts.errors import InputError, check_choice, check_int

__all__ = ["betti_numbers", "count_components", "topology_defects", "roc_auc", "FieldOfViewMetric", "ClDiceMetric",
           "ComponentRatioMetric", "BettiErrorMetric", "FieldOfViewConfusionMatrixMetric", "FieldOfViewROCAUCMetric",
           "structure_measure", "enhanced_alignment", "mask_iou", "temporal_stability"]

REDUCTIONS = tuple(r.value for r in MetricReduction)
EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity, as skimage's connectivity=2


def betti_numbers(x: np.ndarray) -> tuple[int, int]:
    """
    (β0, β1) of the 2-D binary image ``x``: its 8-connected foreground components and its holes (4-connected
    background components not reaching the border). skimage's Euler number with ``connectivity=2`` is β0 − β1 for
    exactly this pair of connectivities (it pads with background, so the border encloses no hole).
    """
    from skimage.measure import euler_number

    b0 = count_components(x)
    return b0, b0 - int(euler_number(x, connectivity=2))


def count_components(x: np.ndarray) -> int:
    """The number of 8-connected foreground components of the 2-D binary image ``x``."""
    # scikit-image, optional to MONAI, only where a topology metric runs: every evaluation imports this module
    from skimage.measure import label

    return int(label(x, connectivity=2, return_num=True)[1])


def topology_defects(pred: np.ndarray, label: np.ndarray | None = None, fragment_size: int = 100) -> dict:
    """
    Where a 2-D binary vessel mask ``pred`` is broken, as masks of its shape (bool):

    - ``fragments``: the pixels of the 8-connected components of ``pred`` smaller than ``fragment_size`` pixels,
      the specks a thin structure ends in when its prediction falls apart;
    - ``breaks`` (needs ``label``): the runs of the label's hard centreline (``skeletonize``) that ``pred`` misses
      *between two pieces of pred*: an 8-connected run of missed centreline pixels whose 8-neighbours on the
      covered centreline belong to two or more components of ``pred``. Each run is one break: there the
      prediction splits a vessel that the label keeps whole. A missed tip, or a vessel missed along its whole
      length, is missed but not broken;
    - ``missed``: the label's pixels not in ``pred`` (None without a label).

    ``count``: {"breaks": runs, "fragments": components}.
    """
    from skimage.morphology import skeletonize

    p = np.asarray(pred, dtype=bool)
    pieces, n_pieces = ndimage.label(p, EIGHT)
    sizes = np.bincount(pieces.ravel(), minlength=n_pieces + 1)
    fragments = (sizes < fragment_size)[pieces] & p
    out = {"fragments": fragments, "breaks": np.zeros_like(p), "missed": None,
           "count": {"breaks": 0, "fragments": int(np.count_nonzero(sizes[1:] < fragment_size))}}
    if label is None:
        return out
    g = np.asarray(label, dtype=bool)
    if g.shape != p.shape:
        raise ValueError(f"pred and label must have the same shape, got {p.shape} and {g.shape}.")
    centreline = skeletonize(g)
    covered = np.where(centreline & p, pieces, 0)
    runs, _ = ndimage.label(centreline & ~p, EIGHT)
    for i, box in enumerate(ndimage.find_objects(runs), 1):
        box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)  # one pixel more: the run's neighbours
        run = runs[box] == i
        ends = covered[box][ndimage.binary_dilation(run, EIGHT) & ~run]
        if len(np.unique(ends[ends > 0])) >= 2:
            out["breaks"][box] |= run
            out["count"]["breaks"] += 1
    out["missed"] = g & ~p
    return out


def _fov_inputs(y_pred: torch.Tensor, y: torch.Tensor, mask, include_background: bool):
    """``y_pred``, ``y`` without background (if so asked) and the FOV as a (B, 1, H, W) bool tensor."""
    if y_pred.ndim != 4 or y.ndim != 4:
        raise ValueError(f"y_pred and y must be (B, C, H, W), got {tuple(y_pred.shape)} and {tuple(y.shape)}.")
    if not include_background:
        y_pred, y = ignore_background(y_pred, y)
    if y_pred.shape != y.shape:
        raise ValueError(f"y_pred and y must have the same shape, got {tuple(y_pred.shape)} and {tuple(y.shape)}.")
    if mask is None:
        return y_pred, y, torch.ones_like(y[:, :1], dtype=torch.bool)
    mask = torch.stack(list(mask)) if isinstance(mask, (list, tuple)) else torch.as_tensor(mask)
    if mask.shape != (y.shape[0], 1, *y.shape[2:]):
        raise ValueError(f"the FOV mask must be (B, 1, H, W) = {(y.shape[0], 1, *y.shape[2:])}, got "
                         f"{tuple(mask.shape)}.")
    return y_pred, y, mask.to(y.device) > 0.5


def _check_binary(x: torch.Tensor, name: str, metric: str) -> None:
    # a probability map passed by mistake (the pred before AsDiscreted) would otherwise give plausible numbers
    if not ((x == 0) | (x == 1)).all():
        raise InputError(f"{metric}: {name} must be a binary (0/1) mask, got other values; give the handler's "
                         "output_transform the discrete masks (after AsDiscreted), not probabilities.")


def _each_image(self, y_pred, y=None, mask=None) -> torch.Tensor:
    """``_compute_list`` of the FOV metrics: MONAI hands every item of a list the same kwargs, so the mask too."""
    masks = [None] * len(y_pred) if mask is None else list(mask)
    if y is None or not len(y_pred) == len(y) == len(masks):
        raise ValueError("y_pred, y and the FOV mask must be lists of the same length.")
    return torch.cat([self._compute_tensor(p.detach()[None], g.detach()[None], None if m is None else m[None])
                      for p, g, m in zip(y_pred, y, masks)])


class FieldOfViewMetric(CumulativeIterationMetric):
    """
    A score of each image and class of binary (or, with ``binary_pred = False``, probability) ``y_pred`` against
    binary ``y`` inside the FOV, (B, C) float64, aggregated over the non-NaN scores as ``DiceMetric`` aggregates.
    Subclasses give ``_score(p, g, inside)`` of one image and class, numpy (H, W) arrays (``g``, ``inside`` bool).

    Args:
        include_background: whether to score channel 0 of a multi-channel input.
        reduction: ``monai.utils.MetricReduction`` of :meth:`aggregate`, over the non-NaN scores.
        get_not_nans: whether :meth:`aggregate` also returns the count of non-NaN scores.
    """

    binary_pred = True

    def __init__(self, include_background: bool = True, reduction: MetricReduction | str = MetricReduction.MEAN,
                 get_not_nans: bool = False) -> None:
        super().__init__()
        self.include_background, self.get_not_nans = include_background, get_not_nans
        self.reduction = check_choice(reduction, f"{type(self).__name__} reduction", REDUCTIONS)

    _compute_list = _each_image

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, mask=None) -> torch.Tensor:
        y_pred, y, inside = _fov_inputs(y_pred, y, mask, self.include_background)
        _check_binary(y, "y", type(self).__name__)
        if self.binary_pred:
            _check_binary(y_pred, "y_pred", type(self).__name__)
        p = (y_pred > 0.5).cpu().numpy() if self.binary_pred else y_pred.cpu().numpy().astype(np.float64)
        g, inside = (y > 0.5).cpu().numpy(), inside.cpu().numpy()
        scores = [[self._score(p[b, c], g[b, c], inside[b, 0]) for c in range(p.shape[1])] for b in range(len(p))]
        return torch.tensor(scores, dtype=torch.float64, device=y.device).reshape(p.shape[:2])

    def _score(self, p: np.ndarray, g: np.ndarray, inside: np.ndarray) -> float:
        raise NotImplementedError

    def aggregate(self, reduction: MetricReduction | str | None = None):
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"the data to aggregate must be a PyTorch Tensor, got {type(data)}.")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


class ClDiceMetric(FieldOfViewMetric):
    """
    clDice (Shit et al., CVPR 2021) with the hard one-pixel skeleton S of ``skimage.morphology.skeletonize`` (the
    paper's definition; MONAI's ``SoftclDiceLoss`` and seed 003's numbers use a soft max-pool skeleton), masks cut
    to the FOV::

        Tprec = |S(P) ∩ G| / |S(P)|,  Tsens = |S(G) ∩ P| / |S(G)|,  clDice = 2 Tprec Tsens / (Tprec + Tsens)

    Empty cases as ``DiceMetric``'s: G empty gives NaN with ``ignore_empty`` (skipped by :meth:`aggregate`), else
    1 if P is empty too and 0 if not. G not empty and P empty, or Tprec = Tsens = 0: 0. (A skeleton is empty only
    for an empty mask: skeletonize keeps a pixel of every component.)

    Args:
        ignore_empty: NaN for an image with an empty label (inside the FOV), as ``DiceMetric``'s default.
        include_background, reduction, get_not_nans: as :class:`FieldOfViewMetric`.
    """

    def __init__(self, include_background: bool = True, reduction: MetricReduction | str = MetricReduction.MEAN,
                 get_not_nans: bool = False, ignore_empty: bool = True) -> None:
        super().__init__(include_background, reduction, get_not_nans)
        self.ignore_empty = ignore_empty

    def _score(self, p: np.ndarray, g: np.ndarray, inside: np.ndarray) -> float:
        p, g = p & inside, g & inside
        if not g.any():
            return float("nan") if self.ignore_empty else float(not p.any())
        if not p.any():
            return 0.0
        from skimage.morphology import skeletonize

        sp, sg = skeletonize(p), skeletonize(g)
        t_prec, t_sens = (sp & g).sum() / sp.sum(), (sg & p).sum() / sg.sum()
        return 0.0 if t_prec + t_sens == 0 else float(2 * t_prec * t_sens / (t_prec + t_sens))


class ComponentRatioMetric(FieldOfViewMetric):
    """
    VCA, seed 003's continuity score (lower is better; 1 when P has as many pieces as G): the number of
    8-connected components of P over that of G, masks cut to the FOV. NaN when G has no component (the ratio is
    undefined; :meth:`aggregate` skips it). An empty P scores 0: read it next to Dice or clDice.

    Args: as :class:`FieldOfViewMetric`.
    """

    def _score(self, p: np.ndarray, g: np.ndarray, inside: np.ndarray) -> float:
        count_g = count_components(g & inside)
        return float("nan") if count_g == 0 else count_components(p & inside) / count_g


class BettiErrorMetric(FieldOfViewMetric):
    """
    The Betti error of one dimension, ``|βk(P) − βk(G)|``, masks cut to the FOV (:func:`betti_numbers`): k = 0
    counts 8-connected components, k = 1 holes (4-connected background). Always defined (0 for two empty masks).
    One dimension per metric, as a handler records one number and ``MetricsSaver`` one (images, classes) table.

    Args:
        dimension: k, 0 or 1.
        include_background, reduction, get_not_nans: as :class:`FieldOfViewMetric`.
    """

    def __init__(self, dimension: int = 0, include_background: bool = True,
                 reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False) -> None:
        super().__init__(include_background, reduction, get_not_nans)
        self.dimension = check_choice(check_int(dimension, "BettiErrorMetric dimension"), "BettiErrorMetric dimension",
                                      (0, 1))

    def _score(self, p: np.ndarray, g: np.ndarray, inside: np.ndarray) -> float:
        return float(abs(betti_numbers(p & inside)[self.dimension] - betti_numbers(g & inside)[self.dimension]))


def roc_auc(y_pred: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """
    Area under the ROC curve of the scores ``y_pred`` against the binary labels ``y``, both 1-D of the same length
    n (tensors, on any device, or arrays): the number MONAI's ``monai.metrics.compute_roc_auc`` gives for 1-D
    inputs (its ``_calculate``), ties included, in O(n log n) array operations instead of its Python loop over the
    n sorted scores: 20-30x faster (a CHASE_DB1 image's 0.67M FOV pixels: about 0.25 s against 8-12 ms on one core,
    ``benchmarks/auc.py``).

    The Mann–Whitney statistic, tied scores given their average rank (ranks 1..n in ascending score)::

        AUC = (Σ_{i: y_i = 1} rank_i − n1 (n1 + 1) / 2) / (n1 n0),   n1 = #{y = 1}, n0 = #{y = 0}

    equivalently U / (n1 n0) with U = Σ over the positives of #{negatives scored lower} + ½ #{negatives scored the
    same}: the probability that a random positive outscores a random negative, a tie counting one half. MONAI's
    loop accumulates exactly this (a run of tied scores adds its positives times the negatives below it plus half
    its own negatives). Here each class's scores are sorted once and the negatives counted below and at each
    positive's score by binary search, ``2U = Σ_pos (searchsorted_left + searchsorted_right)``, in int64. 2U and
    2 n1 n0 are exact integers (MONAI's float64 sums of halves are exact too, below 2^52), so both divide the same
    rational once and agree to the last bit. All scores equal give 0.5.

    As MONAI: NaN, with its warning, when ``y`` holds one value only (``"y values can not be all ..."``) or values
    other than 0 and 1 (``"y values must be 0 or 1 ..."``, also for n = 0). NaN scores, which MONAI ranks in sort
    order (its result then depends on that order), here tie with each other above every number.

    Raises:
        ValueError: when ``y_pred`` and ``y`` are not 1-D of the same length.
    """
    if isinstance(y_pred, torch.Tensor):
        # numpy has no bfloat16; float32 holds every half-precision value exactly, so ties stay ties
        if y_pred.dtype in (torch.float16, torch.bfloat16):
            y_pred = y_pred.float()
        y_pred = y_pred.detach().cpu().numpy()
    y_pred = np.asarray(y_pred)
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if not (y_pred.ndim == y.ndim == 1 and len(y_pred) == len(y)):
        raise ValueError(f"y_pred and y must be 1-D of the same length, got shapes {y_pred.shape} and {y.shape}.")
    # the labels checked and counted in one pass each, not with MONAI's unique() (a sort of y)
    positive = y if y.dtype == bool else y == 1
    n1 = int(np.count_nonzero(positive))
    n0 = len(y) - n1 if y.dtype == bool else int(np.count_nonzero(y == 0))
    if n1 == 0 or n0 == 0 or n1 + n0 != len(y):
        # the rare case: MONAI's checks and messages, verbatim
        y_unique = torch.as_tensor(y).unique()
        if len(y_unique) == 1:
            warnings.warn(f"y values can not be all {y_unique.item()}, skip AUC computation and return `Nan`.",
                          stacklevel=2)
        else:
            warnings.warn(f"y values must be 0 or 1, but in {y_unique.tolist()}, skip AUC computation and return "
                          "`Nan`.", stacklevel=2)
        return float("nan")
    # sorting values only (no permutation to gather through) is numpy's fastest sort; sorted queries keep the
    # binary searches in cache
    pos, neg = np.sort(y_pred[positive]), np.sort(y_pred[~positive])
    u2 = int(np.searchsorted(neg, pos, side="left").sum()) + int(np.searchsorted(neg, pos, side="right").sum())
    return u2 / (2 * n1 * n0)  # Python ints: one correctly rounded division


class FieldOfViewROCAUCMetric(FieldOfViewMetric):
    """
    Area under the ROC curve of each image and class over the pixels inside the FOV: :func:`roc_auc` (MONAI's
    ``compute_roc_auc``, to the last bit, without its per-pixel Python loop; ties count one half: the Mann–Whitney
    U over |pos|·|neg|) on those pixels. NaN, with MONAI's warning, when they hold one class only (an empty label).

    ``y_pred`` is a score that ranks pixels as the foreground probability does: the softmax (B, 2, H, W) with
    ``include_background=False``, or its foreground channel (B, 1, H, W) -- not the logits of one channel, nor the
    discrete ``pred``. ``y`` is binary, one-hot or single-channel, as for the other metrics.

    Args: as :class:`FieldOfViewMetric`.
    """

    binary_pred = False

    def _score(self, p: np.ndarray, g: np.ndarray, inside: np.ndarray) -> float:
        # g as float64, as MONAI was given it: the one-class warning names the value 0.0, not False
        return roc_auc(p[inside], g[inside].astype(np.float64))


class FieldOfViewConfusionMatrixMetric(ConfusionMatrixMetric):
    """
    MONAI's ``ConfusionMatrixMetric`` counting only the pixels inside the FOV: (B, C, 4) counts ``[tp, fp, tn,
    fn]`` of ``get_confusion_matrix`` on each image's FOV pixels, with MONAI's ``aggregate`` (``compute_sample``
    for the mean of per-image values). Sensitivity tp / (tp + fn), specificity tn / (tn + fp), accuracy
    (tp + tn) / |FOV|, f1 (= Dice inside the FOV) 2 tp / (2 tp + fp + fn); NaN where a denominator is 0.

    Args: those of ``monai.metrics.ConfusionMatrixMetric``; binary ``y_pred`` and ``y`` as the module says.
    """

    def __init__(self, include_background: bool = True, metric_name: Sequence[str] | str = "hit_rate",
                 compute_sample: bool = False, reduction: MetricReduction | str = MetricReduction.MEAN,
                 get_not_nans: bool = False) -> None:
        for name in ensure_tuple(metric_name):
            try:
                check_confusion_matrix_metric_name(str(name))
            except NotImplementedError:
                raise InputError(f"FieldOfViewConfusionMatrixMetric metric_name {name!r} is none of MONAI's "
                                 "confusion-matrix metrics (sensitivity, specificity, accuracy, f1 score, ...)."
                                 ) from None
        check_choice(reduction, "FieldOfViewConfusionMatrixMetric reduction", REDUCTIONS)
        super().__init__(include_background, metric_name, compute_sample, reduction, get_not_nans)

    _compute_list = _each_image

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, mask=None) -> torch.Tensor:
        y_pred, y, inside = _fov_inputs(y_pred, y, mask, self.include_background)
        _check_binary(y_pred, "y_pred", type(self).__name__)
        _check_binary(y, "y", type(self).__name__)
        # (1, C, pixels inside) per image: the FOVs of a batch differ in size
        return torch.cat([get_confusion_matrix(p[:, m[0]][None], g[:, m[0]][None])
                          for p, g, m in zip(y_pred, y, inside)])


# ---- metrics of annotated colonoscopy clips (SUN-SEG's protocol): one frame's map, and one clip's masks ----------

EPS = np.spacing(1)  # PySODMetrics' eps, MATLAB's: the reference implementations add it to every denominator


def _map_and_mask(pred, gt, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``pred`` as a float64 (H, W) map in [0, 1] and ``gt`` as a bool (H, W) mask, checked; tensors or arrays."""
    pred = convert_to_numpy(pred, dtype=np.float64, wrap_sequence=True)
    gt = convert_to_numpy(gt, wrap_sequence=True)
    if pred.ndim != 2 or pred.shape != gt.shape:
        raise ValueError(f"{name}: pred and gt must be 2-D (H, W) of the same shape, got {pred.shape} and {gt.shape}.")
    if pred.size < 2 or not (pred.min() >= 0 and pred.max() <= 1):  # also catches NaN
        raise ValueError(f"{name}: pred must be a foreground probability map in [0, 1] of at least 2 pixels, got "
                         f"values in [{pred.min()}, {pred.max()}] over {pred.size} pixel(s).")
    if gt.dtype != bool:
        if not np.isin(gt, (0, 1)).all():
            raise ValueError(f"{name}: gt must be a binary (0/1 or bool) mask, got other values.")
        gt = gt.astype(bool)
    return pred, gt


def structure_measure(pred, gt, alpha: float = 0.5) -> float:
    """
    S-α, the structure measure of Fan et al., "Structure-measure: A new way to evaluate foreground maps", ICCV 2017,
    computed as PySODMetrics' ``Smeasure`` (``cal_sm``, the implementation behind SUN-SEG's evaluation) computes it
    for an already normalised map (its ``step(..., normalize=False)``).

    ``pred``: the foreground probability, (H, W) in [0, 1]; ``gt``: the binary mask, (H, W). With ȳ the mean of gt:

    - ȳ = 0: S = 1 − mean(pred); ȳ = 1: S = mean(pred);
    - otherwise S = max(0, α S_o + (1 − α) S_r), where
      S_o = ȳ O(pred[gt]) + (1 − ȳ) O((1 − pred)[~gt]), the object term, with O(x) = 2 x̄ / (x̄² + 1 + σ_x + eps)
      (σ_x the standard deviation with ddof 1, 0 for one pixel), and
      S_r = Σ_q w_q ssim_q, the region term: the images split in four at the gt's centroid (row and column means of
      its pixels, rounded half to even, plus one: the split index of MATLAB's ``1:X``), w_q the quadrant's share of
      the pixels and ssim_q = 4 x̄ ȳ σ_xy / ((x̄² + ȳ²)(σ_x² + σ_y²) + eps) over the quadrant (variances with
      N − 1 + eps; 1 when numerator and denominator are 0, 0 when only the numerator is).

    One departure: when the gt's centroid falls in its last row or column, a quadrant is empty, with weight 0; the
    reference multiplies that weight by the NaN of an empty mean and returns NaN, here the quadrant adds 0.

    Returns: S-α in [0, 1], a float. Raises ValueError for maps outside [0, 1], non-binary gt or other shapes.
    """
    pred, gt = _map_and_mask(pred, gt, "structure_measure")
    if not 0 <= alpha <= 1:
        raise ValueError(f"structure_measure: alpha must be in [0, 1], got {alpha}.")
    y = gt.mean()
    if y == 0:
        return float(1 - pred.mean())
    if y == 1:
        return float(pred.mean())
    return float(max(0.0, _object_score(pred, gt) * alpha + _region_score(pred, gt) * (1 - alpha)))


def _object_similarity(x: np.ndarray) -> float:
    mean = x.mean()
    std = x.std(ddof=1) if x.size > 1 else 0.0
    return 2 * mean / (mean**2 + 1 + std + EPS)


def _object_score(pred: np.ndarray, gt: np.ndarray) -> float:
    y = gt.mean()
    return _object_similarity(pred[gt]) * y + _object_similarity((1 - pred)[~gt]) * (1 - y)


def _region_score(pred: np.ndarray, gt: np.ndarray) -> float:
    h, w = gt.shape
    cy, cx = (int(c) + 1 for c in np.argwhere(gt).mean(axis=0).round())
    w_lt, w_rt, w_lb = cx * cy / (h * w), cy * (w - cx) / (h * w), (h - cy) * cx / (h * w)
    weights = (w_lt, w_rt, w_lb, 1 - w_lt - w_rt - w_lb)  # the reference's order of operations, to the last bit
    quadrants = ((slice(0, cy), slice(0, cx)), (slice(0, cy), slice(cx, w)), (slice(cy, h), slice(0, cx)),
                 (slice(cy, h), slice(cx, w)))
    return sum(_ssim(pred[q], gt[q]) * wq if pred[q].size else 0.0 for q, wq in zip(quadrants, weights))


def _ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    n = pred.size
    x, y = pred.mean(), gt.mean()
    sigma_x = np.sum((pred - x) ** 2) / (n - 1 + EPS)
    sigma_y = np.sum((gt - y) ** 2) / (n - 1 + EPS)
    sigma_xy = np.sum((pred - x) * (gt - y)) / (n - 1 + EPS)
    num, den = 4 * x * y * sigma_xy, (x**2 + y**2) * (sigma_x + sigma_y)
    if num != 0:
        return num / (den + EPS)
    return 1.0 if den == 0 else 0.0


def enhanced_alignment(pred, gt, adaptive: bool = False) -> float:
    """
    E-φ, the enhanced-alignment measure of Fan et al., "Enhanced-alignment Measure for Binary Foreground Map
    Evaluation", IJCAI 2018, computed as PySODMetrics' ``Emeasure`` computes it (for an already normalised map, its
    ``step(..., normalize=False)``): by default the mean over its 256 thresholds, SUN-SEG's E^mn_φ; with
    ``adaptive`` the adaptive E-φ, at the threshold min(2 mean(pred), 1).

    ``pred``: the foreground probability, (H, W) in [0, 1]; ``gt``: the binary mask, (H, W); n = H W pixels.
    For a binary map B (the pixels of pred ≥ t), with the means b̄ of B and ḡ of gt::

        ξ = 2 (B − b̄)(gt − ḡ) / ((B − b̄)² + (gt − ḡ)² + eps),   φ = (1 + ξ)² / 4,   E = Σ φ / (n − 1 + eps)

    summed over the pixels in the four cases (B, gt) ∈ {0, 1}², where ξ is constant. When gt is all zero Σ φ is the
    number of pixels B leaves out, when gt is all one the number B takes in (as the reference). The mean E-φ uses the
    reference's thresholds: pred quantised as ``uint8(255 pred)`` (truncated) and B = (q ≥ k) for k = 255, ..., 0.

    Returns: E-φ, a float in [0, n / (n − 1)] (the reference divides by n − 1: a perfect map scores slightly over 1).
    Raises ValueError for maps outside [0, 1], non-binary gt or other shapes.
    """
    pred, gt = _map_and_mask(pred, gt, "enhanced_alignment")
    if adaptive:
        taken = pred >= min(2 * pred.mean(), 1)
        fg_fg = np.array([np.count_nonzero(taken & gt)])
        fg_bg = np.array([np.count_nonzero(taken & ~gt)])
    else:  # pixels at or above each threshold, from the histograms of the quantised map (highest threshold first)
        levels = (pred * 255).astype(np.uint8)
        bins = np.linspace(0, 256, 257)
        fg_fg = np.cumsum(np.flip(np.histogram(levels[gt], bins=bins)[0]))
        fg_bg = np.cumsum(np.flip(np.histogram(levels[~gt], bins=bins)[0]))
    n, n_gt = gt.size, np.count_nonzero(gt)
    taken = fg_fg + fg_bg
    if n_gt == 0:
        total = n - taken
    elif n_gt == n:
        total = taken
    else:
        # the four (B, gt) cases: their pixel counts and demeaned values, in the reference's order
        counts = (fg_fg, fg_bg, n_gt - fg_fg, n - taken - (n_gt - fg_fg))
        b, g = taken / n, n_gt / n
        values = ((1 - b, 1 - g), (1 - b, -g), (-b, 1 - g), (-b, -g))
        total = np.zeros(len(taken))
        for count, (pb, pg) in zip(counts, values):
            total = total + ((2 * pb * pg / (pb**2 + pg**2 + EPS) + 1) ** 2 / 4) * count
    return float(np.mean(total / (n - 1 + EPS)))


def mask_iou(a, b) -> float:
    """|a ∩ b| / |a ∪ b| of two binary masks of one shape (arrays or tensors); 1 when both are empty."""
    a, b = (convert_to_numpy(x, dtype=bool, wrap_sequence=True) for x in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"mask_iou: the masks must have the same shape, got {a.shape} and {b.shape}.")
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def temporal_stability(masks) -> tuple[np.ndarray, int]:
    """
    The temporal stability of one clip's predicted masks, T binary (H, W) masks in frame order:

    - the IoU of each pair of consecutive masks, :func:`mask_iou` (two empty masks count 1), shape (T − 1,);
    - the number of presence flips: frames t ≥ 1 whose presence decision (mask non-empty) differs from frame t − 1's.

    A stable segmentation of a polyp in view has consecutive IoU near 1 and no flips; flicker shows in both.
    """
    masks = [convert_to_numpy(m, dtype=bool, wrap_sequence=True) for m in masks]
    ious = np.array([mask_iou(a, b) for a, b in zip(masks[:-1], masks[1:])], dtype=np.float64)
    present = np.array([m.any() for m in masks], dtype=bool)
    return ious, int(np.count_nonzero(present[1:] != present[:-1]))
