"""Mergeable anomaly-segmentation and semantic-segmentation metrics (torchmetrics-like update/merge/compute).

* :class:`PixelMetrics` (``"pixel"``): pixel-level AuPRC (average precision), AUROC and FPR at 95 % TPR, plus the
  best-F1 threshold, from an exact histogram over a fixed order-preserving binning of float32 scores; with
  ``smiyc=True`` also the SegmentMeIfYouCan leaderboard's binned numbers (:class:`SmiycPixelMetrics`,
  ``"smiyc_pixel"``: the toolkit's per-frame quantile-binned ``PixBinaryClass``).
* :class:`ComponentMetrics` (``"components"``): SegmentMeIfYouCan component-level sIoU, PPV and mean F1 (Chan et al.,
  NeurIPS 2021 Datasets & Benchmarks; official ``road_anomaly_benchmark/metrics/instance_segmentation.py``).
* :class:`ConfusionMatrix` (``"confusion"``): mIoU / per-class IoU / pixel accuracy of the closed-set head.
* :class:`BoxMetrics` (``"boxes"``): box recall and AP at IoU 0.5 (S2M's detector validation).
* :class:`S2MMetrics` (``"s2m"``): S2M's IoU / AuIoU / mean F1; :class:`SaomEval` (``"saom"``): SAOM's per-class
  pooled mask IoU and pixel recall over GT instances.

Every metric shares :class:`~oodseg.scoring.metrics.base.MergeableMetric` (``update``, ``merge``, ``compute(warn=)``,
``state_dict`` / ``from_state_dict``, ``reset``, ``row``) and is registered by name (:func:`create_metric`,
:func:`metric_from_state`). Kernels for one-off checks: :mod:`oodseg.scoring.metrics.functional`.
"""

from oodseg.scoring.metrics.base import (
    METRICS,
    MergeableMetric,
    MetricSet,
    create_metric,
    metric_from_state,
    register_metric,
)
from oodseg.scoring.metrics.boxes import BoxMetrics, average_precision, box_recall
from oodseg.scoring.metrics.components import COMPONENT_COLUMNS, SIOU_THRESHOLDS, TRACKS, ComponentMetrics
from oodseg.scoring.metrics.confusion import ConfusionMatrix
from oodseg.scoring.metrics.functional import curve_metrics
from oodseg.scoring.metrics.pixel import PixelMetrics, float32_keys, keys_to_float32
from oodseg.scoring.metrics.s2m import S2MMetrics
from oodseg.scoring.metrics.saom import SaomEval
from oodseg.scoring.metrics.smiyc import SmiycPixelMetrics

__all__ = [
    "COMPONENT_COLUMNS",
    "METRICS",
    "SIOU_THRESHOLDS",
    "TRACKS",
    "BoxMetrics",
    "ComponentMetrics",
    "ConfusionMatrix",
    "MergeableMetric",
    "MetricSet",
    "PixelMetrics",
    "S2MMetrics",
    "SaomEval",
    "SmiycPixelMetrics",
    "average_precision",
    "box_recall",
    "create_metric",
    "curve_metrics",
    "float32_keys",
    "keys_to_float32",
    "metric_from_state",
    "register_metric",
]
