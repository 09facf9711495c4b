"""SegmentMeIfYouCan component-level metrics (sIoU, PPV, mean F1) at a fixed pixel threshold."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import ndimage

from oodseg.labels import IGNORE_ID
from oodseg.scoring.metrics.base import MergeableMetric, register_metric, scores_and_labels

if TYPE_CHECKING:
    from oodseg.scoring.metrics.pixel import PixelMetrics

TRACKS = {"anomaly": (500, 100), "obstacle": (50, 10)}  # (min predicted segment size, min GT component size)
SIOU_THRESHOLDS = np.linspace(0.25, 0.75, 11)
_STRUCTURE = np.ones((3, 3), dtype=np.uint8)  # 8-connectivity
#: results-table columns per threshold rule (``ComponentMetrics.rule``)
COMPONENT_COLUMNS = {
    "exact": {"siou": "siou", "ppv": "ppv", "mean_f1": "mean_f1"},
    "smiyc": {"siou": "siou_smiyc", "ppv": "ppv_smiyc", "mean_f1": "mean_f1_smiyc"},
}


def _relabel(ids: np.ndarray, n: int, drop: np.ndarray) -> tuple[np.ndarray, int]:
    """Instance ids ``0..n`` with the ids in ``drop`` (bool ``[n + 1]``) set to 0 and the rest renumbered ``1..k`` in
    order, by one lookup table pass; returns (ids, k)."""
    keep = ~drop
    keep[0] = False
    lut = np.cumsum(keep).astype(np.int32)
    lut[~keep] = 0
    return lut[ids], int(keep.sum())


def _component_ious(gt_inst: np.ndarray, n_gt: int, pred_seg: np.ndarray, n_pred: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-GT sIoU, per-prediction sIoU and per-prediction precision from instance maps restricted to the ROI
    (ids ``0..n_gt`` / ``0..n_pred``, 0 = background; ids with no pixel in the ROI are skipped).

    Follows ``segment_metrics`` of the official SMIYC code, via the contingency table ``M[g, s]`` (pixel counts of
    GT component g ∩ predicted segment s, 0 = background). For GT component ``k`` with predicted segments
    ``P(k) = {s > 0 : M[k,s] > 0}``: ``sIoU = |k ∩ ∪P| / |(k ∪ ∪P) \\ A|``, where the adjustment A = pixels of
    other GT components, which reduces to ``Σ_{s∈P} M[k,s] / (|k| + Σ_{s∈P} M[0,s])``. Symmetrically for a
    predicted segment ``s`` (other predicted segments excluded), and PPV(s) = ``Σ_{k∈K(s)} M[k,s] / |s|``.
    """
    n_g, n_s = n_gt + 1, n_pred + 1
    code = gt_inst.astype(np.intp) * n_s + pred_seg
    m = np.bincount(code, minlength=n_g * n_s).reshape(n_g, n_s).astype(np.float64)
    rows, cols = m.sum(axis=1) > 0, m.sum(axis=0) > 0
    rows[0] = cols[0] = True
    m = m[rows][:, cols]
    hit = m[1:, 1:] > 0  # [G, S]: GT component k touches predicted segment s
    gt_size, pred_size = m[1:].sum(axis=1), m[:, 1:].sum(axis=0)
    inter_gt = (m[1:, 1:] * hit).sum(axis=1)
    siou_gt = inter_gt / (gt_size + hit @ m[0, 1:])
    inter_pred = (m[1:, 1:] * hit).sum(axis=0)
    siou_pred = inter_pred / (pred_size + m[1:, 0] @ hit)
    return siou_gt, siou_pred, inter_pred / pred_size


@dataclass(frozen=True)
class GroundTruth:
    """What :class:`ComponentMetrics` reads of one image's labels, the same for every score map of the image (so a
    pass over many scorers computes it once, :meth:`ComponentMetrics.ground_truth`): ``void`` (label 255), the ROI
    (not void, not a GT component below the track's minimum size) and the GT component ids inside it."""

    void: np.ndarray
    roi: np.ndarray
    gt_roi: np.ndarray
    n_gt: int


@register_metric("components")
class ComponentMetrics(MergeableMetric):
    """SegmentMeIfYouCan component-level metrics at a fixed pixel threshold (Chan et al., NeurIPS 2021 D&B).

    Per image, as in the official ``default_instancer`` + ``segment_metrics``: predict anomaly where
    ``score > threshold``; drop predictions on void (255) pixels; 8-connected components of GT (label 1) and
    prediction; predicted segments smaller than the track's minimum are removed (anomaly 500 px, obstacle 50 px);
    GT components smaller than the minimum (anomaly 100 px, obstacle 10 px) become void; then everything is
    restricted to the ROI = non-void pixels (for the obstacle track void is everything off the road, so the ROI is
    the road). Per GT component the adjusted sIoU (see :func:`_component_ious`), per predicted segment its PPV.
    compute(): ``siou`` = mean sIoU over all GT components, ``ppv`` = mean PPV over all predicted segments,
    ``f1`` per τ ∈ linspace(0.25, 0.75, 11) with TP = #GT(sIoU ≥ τ), FN = #GT(sIoU < τ), FP = #pred(PPV < τ),
    ``F1 = 2TP / (2TP + FN + FP)``, and ``mean_f1`` over τ. Empty sets give NaN. One deliberate deviation: the
    official size filter also loops over label 0, so an image whose background is smaller than the minimum GT size
    would be voided entirely; here only real components are filtered.

    Threshold rules (:meth:`at_threshold`): ``rule="exact"`` uses :class:`PixelMetrics`' exact best-F1
    threshold, the largest float32 below the best bin, so ``score > threshold`` predicts exactly the pixel set whose
    F1 was best. ``rule="smiyc"`` reproduces the leaderboard: the toolkit reads ``best_f1_threshold`` (a lower bin
    edge of its binned pooled curve, :mod:`oodseg.scoring.metrics.smiyc`) back and applies ``score > threshold``
    in the stored scores' dtype (``instance_segmentation.py``: ``default_instancer``; on its float16 maps numpy
    1.23, the toolkit's pin, rounds the float64 threshold to float16: ``fp16=True``; on float32 maps to float32, the
    default; numpy ≥ 2 would compare in float64). Its F1 counted the pixels
    AT that edge as predicted, ``>`` drops them, so with tied scores the predicted set differs from the one whose
    F1 was best; with binary scores the best edge is 1.0 and nothing is predicted (sIoU 0). ``rule`` also selects
    the results-table columns (:data:`COMPONENT_COLUMNS`).
    """

    columns = COMPONENT_COLUMNS["exact"]

    def __init__(self, threshold: float, track: str = "anomaly", rule: str = "exact", fp16: bool = False) -> None:
        if track not in TRACKS:
            raise ValueError(f"track must be one of {sorted(TRACKS)}, got {track!r}")
        if rule not in COMPONENT_COLUMNS:
            raise ValueError(f"rule must be one of {sorted(COMPONENT_COLUMNS)}, got {rule!r}")
        if not np.isfinite(threshold):
            raise ValueError(f"ComponentMetrics needs a finite threshold, got {threshold}")
        self.threshold = float(threshold)
        self.track = track
        self.rule = rule
        self.fp16 = bool(fp16)  # compare float16(score) > float16(threshold), as the toolkit on its float16 maps
        self.min_pred, self.min_gt = TRACKS[track]
        self.siou_gt: list[float] = []
        self.siou_pred: list[float] = []
        self.ppv: list[float] = []

    @classmethod
    def at_threshold(cls, pixel: PixelMetrics, track: str = "anomaly", rule: str = "exact") -> ComponentMetrics:
        """Components at ``pixel``'s best-F1 threshold by ``rule`` (see the class docstring): ``"exact"`` →
        ``threshold``; ``"smiyc"`` → ``threshold_smiyc``, compared in float16 if ``pixel.smiyc_fp16``. A NaN
        threshold (degenerate data, or ``smiyc=False`` for ``"smiyc"``) raises ``ValueError``."""
        if rule not in COMPONENT_COLUMNS:
            raise ValueError(f"rule must be one of {sorted(COMPONENT_COLUMNS)}, got {rule!r}")
        values = pixel.compute(warn=False)
        if rule == "exact":
            return cls(values["threshold"], track)
        return cls(values["threshold_smiyc"], track, rule="smiyc", fp16=pixel.smiyc_fp16)

    def config(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "track": self.track, "rule": self.rule, "fp16": self.fp16}

    def row(self, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``compute()`` values under this rule's results-table columns (:data:`COMPONENT_COLUMNS`)."""
        values = self.compute(warn=False) if values is None else values
        return {col: values.get(key) for key, col in COMPONENT_COLUMNS[self.rule].items()}

    def update(self, scores: Any, labels: Any) -> ComponentMetrics:
        """Add one image ``[H, W]`` (or a batch ``[B, H, W]``) of scores and 0/1/255 labels.

        Scores stored in float16 (the benchmark's score shards) are compared as the float32 scores they were rounded
        from would be: ``score > t`` ⟺ ``score ≥ k`` with ``k`` the next float32 above ``t`` (the best bin's lower edge),
        and rounding to float16 is monotone, so ``f16(score) ≥ f16(k)`` keeps every such pixel and adds only those
        within half a float16 step below ``k``; ``f16(score) > t`` would drop a whole object whose score is not a
        float16 value (a refined map's box score, say) when ``t`` sits just below it."""
        half = getattr(scores, "dtype", None) in (np.float16, torch.float16)
        s, lab = scores_and_labels(scores, labels)
        if s.ndim == 3:
            for i in range(s.shape[0]):
                self._update_image(s[i], lab[i], half)
        elif s.ndim == 2:
            self._update_image(s, lab, half)
        else:
            raise ValueError(f"ComponentMetrics.update expects [H,W] or [B,H,W]; got shape {s.shape}")
        return self

    def ground_truth(self, labels: np.ndarray) -> GroundTruth:
        """The image's :class:`GroundTruth` under this metric's track: 8-connected GT components (label 1), those
        below the minimum size voided."""
        void = labels == IGNORE_ID
        gt_inst, n_gt = ndimage.label(labels == 1, structure=_STRUCTURE)
        roi = ~void
        if n_gt:
            small = np.bincount(gt_inst.reshape(-1), minlength=n_gt + 1) < self.min_gt
            small[0] = False
            if small.any():
                roi &= ~small[gt_inst]
        return GroundTruth(void, roi, gt_inst[roi], n_gt)

    def update_image(self, scores: np.ndarray, labels: np.ndarray, gt: GroundTruth | None = None) -> ComponentMetrics:
        """Add one image ``[H, W]`` (float32 or float16 scores, uint8 labels, unchecked) with its :meth:`ground_truth`
        when the caller has it."""
        self._update_image(scores.astype(np.float32, copy=False) if scores.dtype != np.float16 else scores,
                           labels, scores.dtype == np.float16, gt)
        return self

    def _update_image(self, scores: np.ndarray, labels: np.ndarray, half: bool = False,
                      gt: GroundTruth | None = None) -> None:
        gt = self.ground_truth(labels) if gt is None else gt
        if self.fp16:
            pred = scores.astype(np.float16, copy=False) > np.float16(self.threshold)
        elif half:  # float16-stored scores (the component pass's shards) under a float32 threshold: see update()
            key = np.nextafter(np.float32(self.threshold), np.float32(np.inf))
            pred = scores >= np.asarray(np.float16(key), scores.dtype)  # exact: float16(key) is a value of both
        else:
            pred = scores > np.float32(self.threshold)
        pred &= ~gt.void
        pred_seg, n_pred = ndimage.label(pred, structure=_STRUCTURE)
        if n_pred:
            pred_seg, n_pred = _relabel(pred_seg, n_pred,
                                        np.bincount(pred_seg.reshape(-1), minlength=n_pred + 1) < self.min_pred)
        siou_gt, siou_pred, ppv = _component_ious(gt.gt_roi, gt.n_gt, pred_seg[gt.roi], n_pred)
        self.siou_gt.extend(siou_gt.tolist())
        self.siou_pred.extend(siou_pred.tolist())
        self.ppv.extend(ppv.tolist())

    def _merge(self, other: ComponentMetrics) -> None:
        self.siou_gt.extend(other.siou_gt)
        self.siou_pred.extend(other.siou_pred)
        self.ppv.extend(other.ppv)

    def _state(self) -> dict[str, Any]:
        return {name: np.asarray(getattr(self, name), dtype=np.float64) for name in ("siou_gt", "siou_pred", "ppv")}

    def _load(self, state: Mapping[str, Any]) -> None:
        for name in ("siou_gt", "siou_pred", "ppv"):
            setattr(self, name, np.asarray(state[name], dtype=np.float64).tolist())

    def _compute(self) -> dict[str, Any]:
        """``siou``, ``ppv``, ``mean_f1``, ``f1`` (list over ``tau``), ``tau``, ``n_gt``, ``n_pred``."""
        siou = np.sort(np.asarray(self.siou_gt))  # sorted: merge order cannot change float sums
        ppv = np.sort(np.asarray(self.ppv))
        nan = float("nan")
        f1 = []
        for tau in SIOU_THRESHOLDS:
            tp = int((siou >= tau).sum())
            fn = siou.size - tp
            fp = int((ppv < tau).sum())
            f1.append(2 * tp / (2 * tp + fn + fp) if 2 * tp + fn + fp else nan)
        return {
            "siou": float(siou.mean()) if siou.size else nan,
            "ppv": float(ppv.mean()) if ppv.size else nan,
            "mean_f1": float(np.mean(f1)),
            "f1": f1,
            "tau": SIOU_THRESHOLDS.tolist(),
            "n_gt": int(siou.size),
            "n_pred": int(ppv.size),
        }


