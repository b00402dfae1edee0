# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Ignite metric handlers of the bundle's metrics (:mod:`scripts.metrics`), as ``monai.handlers`` wraps
``monai.metrics``: per-image confusion-matrix details for ``MetricsSaver``, and the vessel task's metrics inside
the field of view (tubular.md §1). The other handlers live with their concept: the difficulty pass in
:mod:`scripts.difficulty`, checkpoints in :mod:`scripts.checkpoints`, report savers in :mod:`scripts.reports`.
"""

from __future__ import annotations

from ignite.engine import Engine
from ignite.metrics.metric import reinit__is_reduced
from monai.handlers import ConfusionMatrix, IgniteMetricHandler
from monai.metrics import compute_confusion_matrix_metric

from scripts.metrics import (BettiErrorMetric, ClDiceMetric, ComponentRatioMetric, FieldOfViewConfusionMatrixMetric,
                             FieldOfViewROCAUCMetric)

__all__ = ["PerImageConfusionMatrix", "FieldOfViewMetricHandler", "ClDice", "ComponentRatio", "BettiError",
           "FieldOfViewROCAUC", "FieldOfViewConfusionMatrix"]


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
