"""SAOM's evaluation (Khan et al., ICIP 2024; ``mariiak2021/SAOMv1-SAOMv2-and-PanoSAM:eval_miou.py``): per-class
mask quality pooled over GT instances, each paired with the mask its GT-derived prompt produced
(:func:`oodseg.models.saom.saom_predict`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from oodseg.scoring.metrics.base import MergeableMetric, as_numpy, register_metric


@register_metric("saom")
class SaomEval(MergeableMetric):
    """SAOM's per-class pooled mask quality (``SAOM:eval_miou.py``): over all GT instances of class c (each paired
    with its predicted mask, empty if none), ``IoU_c = Σ|P∩G| / Σ|P∪G|`` and ``Acc_c = Σ|P∩G| / Σ|G|`` (pixel
    recall); ``miou`` / ``macc`` average the classes with at least one non-empty GT instance. The predicted class is
    not used (as released)."""

    columns: ClassVar[dict[str, str]] = {"miou": "saom_miou", "macc": "saom_macc"}

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        z = np.zeros(self.num_classes, dtype=np.int64)
        self.inter, self.union, self.gt, self.count = z.copy(), z.copy(), z.copy(), z.copy()

    def config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def update(self, pred_masks: Any, gt_masks: Any, classes: Any) -> SaomEval:
        """Add instances: predicted and GT bool masks ``[K, H, W]`` (paired by index) and GT classes ``[K]``."""
        p, g, c = as_numpy(pred_masks).astype(bool), as_numpy(gt_masks).astype(bool), as_numpy(classes)
        if p.shape != g.shape or p.ndim != 3 or c.shape != (p.shape[0],):
            raise ValueError(f"SaomEval: pred {p.shape} and gt {g.shape} must be [K, H, W], classes {c.shape} [K]")
        c = c.astype(np.int64)
        if c.size and (c.min() < 0 or c.max() >= self.num_classes):
            raise ValueError(f"SaomEval: classes must be in [0, {self.num_classes}), got {sorted(set(c.tolist()))}")
        n = self.num_classes
        area = g.sum((1, 2))
        self.inter += np.bincount(c, (p & g).sum((1, 2)), n).astype(np.int64)
        self.union += np.bincount(c, (p | g).sum((1, 2)), n).astype(np.int64)
        self.gt += np.bincount(c, area, n).astype(np.int64)
        self.count += np.bincount(c[area > 0], minlength=n).astype(np.int64)
        return self

    def _state(self) -> dict[str, Any]:
        return {k: getattr(self, k).copy() for k in ("inter", "union", "gt", "count")}

    def _load(self, state: Mapping[str, Any]) -> None:
        for k in ("inter", "union", "gt", "count"):
            setattr(self, k, np.asarray(state[k], dtype=np.int64).copy())

    def _merge(self, other: SaomEval) -> None:
        for k in ("inter", "union", "gt", "count"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def _compute(self) -> dict[str, Any]:
        """``miou``, ``macc``, ``iou_per_class`` / ``acc_per_class`` (NaN for absent classes), ``n_classes``."""
        present = self.count > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(present, self.inter / self.union, np.nan)
            acc = np.where(present, self.inter / self.gt, np.nan)
        return {
            "miou": float(iou[present].mean()) if present.any() else float("nan"),
            "macc": float(acc[present].mean()) if present.any() else float("nan"),
            "iou_per_class": iou.tolist(),
            "acc_per_class": acc.tolist(),
            "n_classes": int(present.sum()),
        }

