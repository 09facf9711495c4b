"""Closed-set confusion matrix → per-class IoU, mIoU and pixel accuracy (mergeable)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from oodseg.labels import IGNORE_ID
from oodseg.scoring.metrics.base import MergeableMetric, as_numpy, register_metric


@register_metric("confusion")
class ConfusionMatrix(MergeableMetric):
    """Closed-set confusion matrix (rows = ground truth, columns = prediction) → IoU per class, mIoU, accuracy.

    ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``. Classes with neither GT nor predicted pixels have IoU NaN and are left
    out of ``miou`` (nanmean over classes present in GT or prediction). The official Cityscapes script averages
    over all 19 classes; on full validation sets every class occurs so both agree.
    """

    columns = {"miou": "miou", "pixel_accuracy": "pixel_acc"}

    def __init__(self, num_classes: int = 19, ignore_index: int = IGNORE_ID) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: Any, target: Any) -> ConfusionMatrix:
        """Add predicted and target class ids: integer arrays / tensors of the same shape (e.g. ``[B, H, W]``), ids in
        ``[0, num_classes)``; target pixels equal to ``ignore_index`` (255 = void) are skipped."""
        p, t = as_numpy(pred), as_numpy(target)
        if p.shape != t.shape:
            raise ValueError(f"pred shape {p.shape} and target shape {t.shape} differ")
        for name, a in (("pred", p), ("target", t)):
            if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
                raise ValueError(f"{name} must hold integer class ids; got dtype {a.dtype}")
        keep = t != self.ignore_index
        p, t = p[keep].astype(np.int64), t[keep].astype(np.int64)
        k = self.num_classes
        for name, a in (("target", t), ("pred", p)):
            if a.size and (a.min() < 0 or a.max() >= k):
                raise ValueError(f"{name} class ids must be in [0, {k}) (or {self.ignore_index} = ignore in target)")
        self.matrix += np.bincount(t * k + p, minlength=k * k).reshape(k, k)
        return self

    def config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index}

    def _merge(self, other: ConfusionMatrix) -> None:
        self.matrix += other.matrix

    def _state(self) -> dict[str, Any]:
        return {"matrix": self.matrix.copy()}

    def _load(self, state: Mapping[str, Any]) -> None:
        self.matrix = np.asarray(state["matrix"], dtype=np.int64).copy()

    def _compute(self) -> dict[str, Any]:
        """``miou``, ``iou_per_class`` (list, NaN for absent classes), ``pixel_accuracy``."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(axis=0) + self.matrix.sum(axis=1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
        total = self.matrix.sum()
        present = ~np.isnan(iou)
        return {
            "miou": float(iou[present].mean()) if present.any() else float("nan"),
            "iou_per_class": iou.tolist(),
            "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        }
