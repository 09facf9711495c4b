"""Box detection metrics: box recall and average precision at one IoU, and their mergeable :class:`BoxMetrics`
(the validation metric of S2M's detector training task)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from oodseg.outputs import Boxes
from oodseg.scoring.metrics.base import MergeableMetric, register_metric


def _iou_matrix(pred: Boxes, gt: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou

    return box_iou(pred.xyxy, torch.as_tensor(gt, dtype=torch.float32).reshape(-1, 4))


def box_recall(preds: Sequence[Boxes], gts: Sequence[Any], iou: float = 0.5) -> float:
    """Fraction of ground-truth boxes overlapped by some predicted box with IoU ≥ ``iou`` (NaN without GT).

    Args:
        preds: per image, its :class:`Boxes` (pixel-edge xyxy, scores).
        gts: per image, its ground-truth boxes as anything reshapeable to ``[G, 4]`` pixel-edge xyxy.
    """
    hit = total = 0
    for pred, gt in zip(preds, gts, strict=True):
        m = _iou_matrix(pred, gt)
        total += m.shape[1]
        hit += int((m >= iou).any(dim=0).sum()) if m.numel() else 0
    return hit / total if total else float("nan")


def average_precision(preds: Sequence[Boxes], gts: Sequence[Any], iou: float = 0.5) -> float:
    """AP at IoU ``iou`` over a set of images (PASCAL VOC 2010+ / COCO matching, all-point interpolation).

    All detections are ranked by score; each is a TP if it matches a not-yet-matched GT box of its image with
    IoU ≥ ``iou`` (its best-IoU such box), else an FP. ``AP = Σ (R_n − R_{n−1}) · P̂_n`` with ``P̂`` the precision
    envelope (max precision at recall ≥ R_n). NaN without GT boxes.
    """
    records: list[tuple[float, bool]] = []
    n_gt = 0
    for pred, gt in zip(preds, gts, strict=True):
        m = _iou_matrix(pred, gt)
        n_gt += m.shape[1]
        used = torch.zeros(m.shape[1], dtype=torch.bool)
        for k in range(len(pred)):  # Boxes are sorted by descending score
            cand = m[k].masked_fill(used, -1.0) if m.shape[1] else m[k]
            j = int(cand.argmax()) if cand.numel() else -1
            tp = j >= 0 and float(cand[j]) >= iou
            if tp:
                used[j] = True
            records.append((float(pred.scores[k]), tp))
    if n_gt == 0:
        return float("nan")
    records.sort(key=lambda r: -r[0])
    tp = np.cumsum([r[1] for r in records], dtype=np.float64)
    precision = tp / np.arange(1, len(records) + 1)
    recall = tp / n_gt
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * envelope))


@register_metric("boxes")
class BoxMetrics(MergeableMetric):
    """Box recall and AP at IoU 0.5 over images (state: every image's predicted and GT boxes; merge = concat)."""

    columns = {"recall": "box_recall", "ap": "box_ap"}

    def __init__(self, iou: float = 0.5) -> None:
        self.iou = float(iou)
        self.preds: list[Boxes] = []
        self.gts: list[np.ndarray] = []

    def config(self) -> dict[str, Any]:
        return {"iou": self.iou}

    def update(self, pred: Boxes, gt: Any) -> BoxMetrics:
        """Add one image: its predicted :class:`Boxes` and GT boxes ``[G, 4]`` (pixel-edge xyxy, G may be 0)."""
        self.preds.append(pred)
        self.gts.append(np.asarray(gt, dtype=np.float32).reshape(-1, 4))
        return self

    def _merge(self, other: BoxMetrics) -> None:
        self.preds += other.preds
        self.gts += other.gts

    def _state(self) -> dict[str, Any]:
        return {"xyxy": [p.xyxy.numpy() for p in self.preds], "scores": [p.scores.numpy() for p in self.preds],
                "gts": list(self.gts)}

    def _load(self, state: Mapping[str, Any]) -> None:
        self.preds = [Boxes(torch.as_tensor(x), torch.as_tensor(s)) for x, s in zip(state["xyxy"], state["scores"])]
        self.gts = [np.asarray(g, dtype=np.float32) for g in state["gts"]]

    def _compute(self) -> dict[str, Any]:
        return {"recall": box_recall(self.preds, self.gts, self.iou), "ap": average_precision(self.preds, self.gts,
                                                                                            self.iou),
                "n_images": len(self.gts)}
