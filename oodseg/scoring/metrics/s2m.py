"""S2M's own evaluation: image-mean IoU and Dice over a threshold sweep (WenjieZhao1/S2M:tools/inference.py,
``get_iou`` + ``calculate_miou``). Meant for maps in [0, 1] such as S2M's refined maps (box scores inside masks).

These are *not* the SegmentMeIfYouCan component metrics (:class:`ComponentMetrics`): per image and threshold
``t ∈ np.arange(0, 1.01, 0.01)``, ``P = map > t``, ``G = label == 1`` over all pixels (void 255 counts as
background, as in S2M), ``IoU = |P∩G| / |P∪G|`` and ``F1 = 2|P∩G| / (|P∩G| + |P∪G|)`` (Dice), both 0 when the union
is empty; both are averaged over images.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from oodseg.labels import ANOMALY, IGNORE_ID
from oodseg.scoring.metrics.base import (
    MergeableMetric,
    as_numpy,
    check_anomaly_labels,
    register_metric,
    scores_and_labels,
)

#: S2M's thresholds, built exactly as ``np.arange(0, 1 + step, step)`` with ``step = 0.01`` (101 values).
S2M_THRESHOLDS = np.arange(0, 1 + 0.01, 0.01)


def _count_above(hist: np.ndarray) -> np.ndarray:
    """``out[j] = Σ_{k > j} hist[k]`` for ``j = 0..len(hist) − 2``, as float64."""
    return np.cumsum(hist[::-1])[::-1][1:].astype(np.float64)


def s2m_image_curves(scores: np.ndarray, labels: np.ndarray, exclude_void: bool = False) -> tuple[np.ndarray, ...]:
    """Per-threshold IoU and F1 of one image (float64 ``[101]`` each, at :data:`S2M_THRESHOLDS` 0, 0.01, …, 1;
    a pixel is predicted anomalous when its score ``> t``); ``labels``: 1 = anomaly, anything else counts as
    background unless ``exclude_void`` drops the 255 pixels.

    Scores arrive as float32 (S2M's assembled maps are float32; a boolean map counts as 0 / 1) and are compared in
    float64, as S2M's float64 arrays vs Python-float thresholds: ``searchsorted(thresholds, v)`` counts the
    thresholds below each pixel value, so ``v > t_j ⇔ j < k(v)``; a histogram of ``k`` then gives
    ``|P_t|`` and ``|P_t ∩ G|`` for every threshold in one pass over the pixels."""
    if scores.dtype == np.bool_:  # a thresholded map: its two values' threshold counts, no float compare per pixel
        k = np.where(scores.reshape(-1), *np.searchsorted(S2M_THRESHOLDS, [1.0, 0.0], side="left"))
    else:
        k = np.searchsorted(S2M_THRESHOLDS, scores.astype(np.float64).reshape(-1), side="left")
    gt = labels.reshape(-1) == ANOMALY
    if exclude_void:
        keep = labels.reshape(-1) != IGNORE_ID
        k, gt = k[keep], gt[keep]
    n_t = S2M_THRESHOLDS.size
    pred = _count_above(np.bincount(k, minlength=n_t + 1))
    inter = _count_above(np.bincount(k[gt], minlength=n_t + 1))
    union = pred + float(gt.sum()) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
        f1 = np.where(union > 0, 2 * inter / (inter + union), 0.0)
    return iou, f1


@register_metric("s2m")
class S2MMetrics(MergeableMetric):
    """S2M's IoU, AuIoU and mean F1 over the 101 thresholds of :data:`S2M_THRESHOLDS`.

    compute(): ``iou`` = the best image-mean IoU over thresholds (S2M ``Best_miou``, an oracle threshold; the first
    threshold reaching it is ``best_threshold``), ``auiou`` = ``np.trapezoid(mean IoU, thresholds)`` (S2M
    ``area``), ``mean_f1`` = image-mean F1 averaged over all thresholds (S2M ``f1_scores``). ``exclude_void=True``
    drops 255 pixels from P and G (S2M keeps them). State: per-threshold sums of per-image IoU and F1 and the image
    count; merging adds them (exact up to float64 rounding of the sums).
    """

    columns: ClassVar[dict[str, str]] = {
        "iou": "s2m_iou", "auiou": "s2m_auiou", "mean_f1": "s2m_mean_f1", "best_threshold": "s2m_threshold",
    }

    def __init__(self, exclude_void: bool = False) -> None:
        self.exclude_void = bool(exclude_void)
        self.iou_sum = np.zeros(S2M_THRESHOLDS.size, dtype=np.float64)
        self.f1_sum = np.zeros(S2M_THRESHOLDS.size, dtype=np.float64)
        self.n_images = 0

    def config(self) -> dict[str, Any]:
        return {"exclude_void": self.exclude_void}

    def update(self, scores: Any, labels: Any) -> S2MMetrics:
        """Add one image ``[H, W]`` or a batch ``[B, H, W]`` (numpy or torch on any device) with 0/1/255 labels."""
        if isinstance(scores, np.ndarray) and scores.dtype == np.bool_:  # a thresholded map, kept boolean
            s, lab = scores, as_numpy(labels).astype(np.uint8, copy=False)
            check_anomaly_labels(lab, s.shape)
        else:
            s, lab = scores_and_labels(scores, labels)
        if s.ndim == 2:
            s, lab = s[None], lab[None]
        if s.ndim != 3:
            raise ValueError(f"S2MMetrics.update expects [H,W] or [B,H,W]; got shape {s.shape}")
        for i in range(s.shape[0]):
            iou, f1 = s2m_image_curves(s[i], lab[i], self.exclude_void)
            self.iou_sum += iou
            self.f1_sum += f1
            self.n_images += 1
        return self

    def _merge(self, other: S2MMetrics) -> None:
        self.iou_sum += other.iou_sum
        self.f1_sum += other.f1_sum
        self.n_images += other.n_images

    def _state(self) -> dict[str, Any]:
        return {"iou_sum": self.iou_sum.copy(), "f1_sum": self.f1_sum.copy(), "n_images": np.int64(self.n_images)}

    def _load(self, state: Mapping[str, Any]) -> None:
        self.iou_sum = np.asarray(state["iou_sum"], dtype=np.float64).copy()
        self.f1_sum = np.asarray(state["f1_sum"], dtype=np.float64).copy()
        self.n_images = int(state["n_images"])
        if self.iou_sum.shape != S2M_THRESHOLDS.shape or self.f1_sum.shape != S2M_THRESHOLDS.shape:
            raise ValueError(f"S2MMetrics state needs {S2M_THRESHOLDS.size} thresholds; got {self.iou_sum.shape}")

    def curves(self) -> dict[str, np.ndarray]:
        """``threshold``, image-mean ``iou`` and ``f1`` per threshold (NaN without images)."""
        n = self.n_images if self.n_images else np.nan
        return {"threshold": S2M_THRESHOLDS.copy(), "iou": self.iou_sum / n, "f1": self.f1_sum / n}

    def _compute(self) -> dict[str, float]:
        """``iou``, ``best_threshold``, ``auiou``, ``mean_f1`` (NaN and a ``RuntimeWarning`` without images)."""
        if self.n_images == 0:
            warnings.warn("S2MMetrics: no images, returning NaN", RuntimeWarning, stacklevel=3)
            nan = float("nan")
            return {"iou": nan, "best_threshold": nan, "auiou": nan, "mean_f1": nan}
        c = self.curves()
        best = int(np.argmax(c["iou"]))  # the first threshold reaching the maximum (S2M: strict ``>`` from 0)
        return {
            "iou": float(c["iou"][best]),
            "best_threshold": float(S2M_THRESHOLDS[best]),
            "auiou": float(np.trapezoid(c["iou"], S2M_THRESHOLDS)),
            "mean_f1": float(np.mean(c["f1"])),
        }
