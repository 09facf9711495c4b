"""Functional kernels of the pixel-level metrics: exact curve metrics from cumulative counts, and one-shot helpers.

Given per-threshold cumulative counts ordered from high to low scores, ``tp[k]`` anomaly and ``fp[k]`` inlier pixels
scoring at or above threshold ``k`` (one entry per distinct score, ties merged):

* AuPRC = average precision ``Σ_k (R_k − R_{k−1}) · P_k`` (sklearn ``average_precision_score``, step-wise);
* AUROC = trapezoidal area under ``(FPR_k, TPR_k)`` from (0, 0) (sklearn ``roc_auc_score``);
* FPR95 = FPR at the first threshold, scanning from high scores down, where ``TPR ≥ 0.95``;
* best F1 = ``max_k 2·TP_k / (TP_k + FP_k + P)`` and its index;
* ``fpr95_interp`` = the FPR at TPR 0.95 linearly interpolated on sklearn's ``roc_curve`` (collinear points dropped,
  (0, 0) prepended), the definition of ``ood_metrics.fpr_at_95_tpr`` (github.com/tayden/ood-metrics) that the ERFNet
  course evaluation code reports.

These are the definitions of the papers (exact pooled curves over all pixels); the SegmentMeIfYouCan leaderboard's
binned variant is in :mod:`oodseg.scoring.metrics.smiyc`.
"""

from __future__ import annotations

import numpy as np


def curve_metrics(tp: np.ndarray, fp: np.ndarray) -> dict[str, float]:
    """The exact pooled curve metrics (definitions: module docstring) from cumulative counts.

    Args:
        tp, fp: ``[K]`` cumulative anomaly / inlier pixel counts at or above each distinct threshold, ordered from
            the highest score down, so ``tp[-1]`` / ``fp[-1]`` are the class totals; both must be > 0.

    Returns:
        ``auprc``, ``auroc``, ``fpr95``, ``fpr95_interp``, ``best_f1`` (all fractions in [0, 1]) and ``best_index``,
        the threshold index ``k`` of the best F1.
    """
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
        "fpr95_interp": fpr95_interp(tp, fp),
        "best_f1": float(f1[best]),
        "best_index": best,
    }


def fpr95_interp(tp: np.ndarray, fp: np.ndarray) -> float:
    """FPR at TPR 0.95 linearly interpolated between ROC points (``ood_metrics.fpr_at_95_tpr``) on the curve of the
    cumulative counts ``tp`` / ``fp`` (same convention as :func:`curve_metrics`)."""
    keep = np.arange(tp.size) if tp.size < 3 else \
        np.flatnonzero(np.r_[True, np.logical_or(np.diff(fp, 2), np.diff(tp, 2)), True])
    tpr = np.r_[0.0, tp[keep]] / tp[-1]
    fpr = np.r_[0.0, fp[keep]] / fp[-1]
    if (tpr < 0.95).all():
        return 0.0
    if (tpr >= 0.95).all():
        return float(fpr[tpr >= 0.95].min())
    return float(np.interp(0.95, tpr, fpr))
