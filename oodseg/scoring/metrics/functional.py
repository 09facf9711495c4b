"""Functional kernels of the pixel-level metrics: exact curve metrics from cumulative counts, and one-shot helpers.

Given per-threshold cumulative counts ordered from high to low scores, ``tp[k]`` anomaly and ``fp[k]`` inlier pixels
scoring at or above threshold ``k`` (one entry per distinct score, ties merged):

* AuPRC = average precision ``Σ_k (R_k − R_{k−1}) · P_k`` (sklearn ``average_precision_score``, step-wise);
* AUROC = trapezoidal area under ``(FPR_k, TPR_k)`` from (0, 0) (sklearn ``roc_auc_score``);
* FPR95 = FPR at the first threshold, scanning from high scores down, where ``TPR ≥ 0.95``;
* best F1 = ``max_k 2·TP_k / (TP_k + FP_k + P)`` and its index.

These are the definitions of the papers (exact pooled curves over all pixels); the SegmentMeIfYouCan leaderboard's
binned variant is in :mod:`oodseg.scoring.metrics.smiyc`.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def curve_metrics(tp: np.ndarray, fp: np.ndarray) -> dict[str, float]:
    """``auprc``, ``auroc``, ``fpr95``, ``best_f1`` and ``best_index`` from cumulative counts (both classes present)."""
    tp, fp = np.asarray(tp, dtype=np.float64), np.asarray(fp, dtype=np.float64)
    n_pos, n_neg = float(tp[-1]), float(fp[-1])
    precision = tp / np.maximum(tp + fp, 1.0)
    recall, fpr = tp / n_pos, fp / n_neg
    f1 = 2 * tp / (tp + fp + n_pos)
    best = int(np.argmax(f1))
    return {
        "auprc": float(np.sum(np.diff(recall, prepend=0.0) * precision)),
        "auroc": float(np.trapezoid(np.concatenate([[0.0], recall]), np.concatenate([[0.0], fpr]))),
        "fpr95": float(fpr[np.argmax(recall >= 0.95)]),
        "best_f1": float(f1[best]),
        "best_index": best,
    }


def cumulative_counts(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct thresholds descending, cumulative TP, cumulative FP) of exact float scores (ties merged)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], positive[order].astype(np.int64)
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last]
    return s[last], tp, (last + 1) - tp


def pixel_metrics(scores: Any, labels: Any, bits: int = 24) -> dict[str, Any]:
    """One-shot :class:`~oodseg.scoring.metrics.PixelMetrics` of one array of scores and 0/1/255 labels."""
    from oodseg.scoring.metrics.pixel import PixelMetrics

    return PixelMetrics(bits=bits).update(scores, labels).compute()
