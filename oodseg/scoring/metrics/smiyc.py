"""SegmentMeIfYouCan leaderboard pixel metrics: a mergeable re-implementation of the toolkit's ``PixBinaryClass``.

The official toolkit (``SegmentMeIfYouCan/road-anomaly-benchmark``, ``road_anomaly_benchmark/metrics/
pixel_classification.py`` and ``pixel_classification_curves.py``, 2023-08 head) does not evaluate the pooled
exact curve that :class:`~oodseg.scoring.metrics.PixelMetrics` computes. Per frame (``binary_confusion_matrix``,
``bin_strategy='percentiles'``, ``num_bins=768``), on the non-ignored pixels (label < 255; label 1 = anomaly):

* edges = ``unique([vmin − eps, vmax + eps] ∪ quantile(anomaly scores, linspace(0, 1, min(384, n_anomaly)))
  ∪ quantile(inlier scores, linspace(0, 1, min(384, n_inlier))))`` with ``eps = max(0.01·(vmax − vmin), 0.01)``
  (numpy ``'linear'`` quantiles; a class without pixels contributes no quantiles);
* ``np.histogram`` of each class over these edges (bins ``[e_k, e_k+1)``, the last one closed); every bin is
  kept with its LOWER edge ``e_k`` as its threshold.

Pooling (``aggregate_dynamic_bins`` + ``curves_from_cmats``): all frames' (lower edge, anomaly count, inlier count)
entries are sorted by edge, high to low, and cumulated; of each run of equal edges only the last cumulative point
is kept, except that the very first entry is always kept (with tied top edges it is a partial point); (0, 0) is
prepended. Then AP = ``Σ (R_i − R_{i−1})·P_i`` (precision 1 where nothing is predicted), AUROC = trapezoid over
(FPR, TPR), FPR95 = FPR at the first point with TPR ≥ 0.95 (no interpolation), best F1 and its threshold (the
lower edge of that point). Every pixel thus counts as if it scored its bin's lower edge, a per-frame rounding down
that is coarse where a frame has few quantile edges: above its anomaly scores, and above all in frames with few or
no anomaly pixels, whose highest-scoring inliers share one top bin of ~1/383 of the frame. Fewer false positives
at high thresholds overstate AuPRC: measured on synthetic blob maps (8 frames, 3 % anomaly) +4e-3..3e-2 with 1-3
frames anomaly-free, +2e-3..6e-3 with anomalies in every 64×128 frame, while with ≥ 10^4 anomaly pixels in every
frame (512×1024) the gap is a few 1e-4 and of either sign (tests/test_metrics_smiyc.py).

Reproduction details (verified against the toolkit's code and numpy's ``_lerp``): quantiles form the neighbour
difference in the scores' dtype and interpolate in float64; the range ends are float64 (numpy 1.23.3, pinned by
the toolkit, promotes ``float32 scalar * python float`` to float64); frames without any valid pixel are skipped
(the toolkit would fail on ``np.min`` of an empty array). The toolkit stores scores as float16 before evaluating
(``evaluation.py``: ``anomaly_p.astype(np.float16)``); ``fp16=True`` does the same. One choice is ours: with
several frames tied at the top edge, which entry becomes the partial first point depends in the toolkit on
``np.argsort``'s tie order and on its worker pool's frame order (``imap_unordered``), i.e. it is not defined; here
it is the tied entry with the fewest anomaly pixels, then fewest inlier pixels, which makes the result
independent of frame and merge order (everything else pools by exact integer sums).

State: per frame the ≤ 768 bins (float64 lower edge, int32 counts: ≤ 12 KiB) and the frame's pixel counts; memory
grows with frames × bins, never with pixels, and merging concatenates.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from oodseg.labels import ANOMALY, INLIER
from oodseg.scoring.metrics.base import (
    MergeableMetric,
    register_metric,
    scores_and_labels,
    torch_scores_and_labels,
)
from oodseg.scoring.metrics.order import KeyOrder, float32_bounds, float32_keys, float32_keys_torch, keys_to_float32

NUM_BINS = 768  # PixBinaryClass num_bins; num_bins // 2 quantiles per class
QUANTILES_PER_CLASS = NUM_BINS // 2
TPR_TARGET = 0.95
Array = np.ndarray | torch.Tensor
Bins = tuple[np.ndarray, np.ndarray, np.ndarray]
Frame = tuple[np.ndarray, np.ndarray, np.ndarray, int, int]  # a frame's Bins and its anomaly / inlier pixel counts
Sorted = np.ndarray | KeyOrder  # a frame's scores of one class, sorted (or their KeyOrder)


# ------------------------------------------------------------------------------------------------------------------
# One frame
# ------------------------------------------------------------------------------------------------------------------


def _take(sorted_vals: Sorted, idx: np.ndarray) -> np.ndarray:
    """``sorted_vals[idx]`` (a small gather)."""
    return sorted_vals.take(idx) if isinstance(sorted_vals, KeyOrder) else sorted_vals[idx]


def _count_below(sorted_vals: Sorted, edges: np.ndarray) -> np.ndarray:
    """``#{v < e}`` for every edge but the last, ``#{v ≤ e}`` for the last (``np.histogram``'s cumulative counts),
    comparing exactly (scores promoted to float64)."""
    if isinstance(sorted_vals, KeyOrder):
        return sorted_vals.count_below(edges)
    left = np.searchsorted(sorted_vals, edges[:-1], side="left")
    last = np.searchsorted(sorted_vals, edges[-1:], side="right")
    return np.concatenate([left, last]).astype(np.int64)


def quantile_ranks(n: int) -> tuple[np.ndarray, np.ndarray]:
    """What ``np.quantile(x, np.linspace(0, 1, min(384, n)))`` (``'linear'``) reads of ``n`` sorted values: the
    positions ``[lo…, hi…]`` of each quantile's two neighbours, and the weights ``γ``."""
    virtual = (n - 1) * np.linspace(0.0, 1.0, min(QUANTILES_PER_CLASS, n))
    lo = np.floor(virtual).astype(np.int64)
    return np.concatenate([lo, np.minimum(lo + 1, n - 1)]), virtual - lo


def quantiles_at(vals: np.ndarray, gamma: np.ndarray, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The quantiles (float64) from the values at :func:`quantile_ranks`, rounding exactly as numpy's ``'linear'``
    method (``_lerp``): the neighbour difference ``b − a`` in the scores' dtype, then ``a + (b − a)·γ`` in float64,
    or ``b − (b − a)·(1 − γ)`` when ``γ ≥ 0.5``; and ``[min, max]`` in the scores' dtype ``dtype`` (float16 scores
    may be held as float32: numpy sorts float16 ~6x slower)."""
    vals = vals.astype(dtype, copy=False)
    a, b = vals[: gamma.size], vals[gamma.size :]  # lo[0] = 0, hi[-1] = n − 1
    diff = b - a  # in the scores' dtype, as numpy
    out = a + diff * gamma
    upper = gamma >= 0.5
    out[upper] = b[upper] - diff[upper] * (1 - gamma[upper])
    return out, np.array([a[0], b[-1]])


def linear_quantiles(sorted_vals: Sorted, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """``np.quantile(x, np.linspace(0, 1, min(384, n)))`` (float64) and ``[min, max]`` from ``x`` sorted ascending
    (:func:`quantile_ranks`, :func:`quantiles_at`)."""
    idx, gamma = quantile_ranks(int(sorted_vals.shape[0]))
    return quantiles_at(_take(sorted_vals, idx), gamma, dtype)


def bin_edges(quantiles: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """A frame's ascending bin edges (float64) from the :func:`linear_quantiles` of its classes that have pixels:
    ``unique([vmin − eps, vmax + eps] ∪ quantiles)``, ``eps = max(0.01·(vmax − vmin), 0.01)``."""
    vmin, vmax = min(q[1][0] for q in quantiles), max(q[1][1] for q in quantiles)  # in the scores' dtype
    with np.errstate(over="ignore"):  # vmax − vmin in the scores' dtype (may overflow to inf, as in the toolkit)
        vrange = float(vmax - vmin)
    eps = max(vrange * 1e-2, 1e-2)  # float64: numpy 1.23 (the toolkit's pin) promotes float32 scalar * float
    return np.unique(np.concatenate([np.array([float(vmin) - eps, float(vmax) + eps]), *(q[0] for q in quantiles)]))


def frame_bins(pos_sorted: Sorted, neg_sorted: Sorted, dtype: type = np.float32) -> Bins:
    """One frame's ``binary_confusion_matrix(..., bin_strategy='percentiles', num_bins=768)``: (ascending lower bin
    edges float64, anomaly counts, inlier counts) from the frame's sorted anomaly and inlier scores (not both empty)
    whose values are of dtype ``dtype``.
    """
    edges = bin_edges([linear_quantiles(v, dtype) for v in (pos_sorted, neg_sorted) if v.shape[0]])
    counts = [np.diff(_count_below(v, edges)).astype(np.int32) if v.shape[0] else np.zeros(edges.size - 1, np.int32)
              for v in (pos_sorted, neg_sorted)]
    return edges[:-1], counts[0], counts[1]


def device_frames(keys: torch.Tensor, lab: torch.Tensor, dtype: type = np.float32) -> list[Frame | None]:
    """:func:`frame_bins` and pixel counts of every frame of ``[F, P]`` score keys (int64
    :func:`~oodseg.scoring.metrics.order.float32_keys_torch`) and labels on their device (``None`` for a frame
    without valid pixels), in three host round trips for the whole batch instead of several per frame:
    one sort of every frame's (frame, class, score key) as int64 (class segments in frame order, ignored pixels
    last), one gather of the values at every segment's :func:`quantile_ranks`, one search of every segment's bin
    edges (:func:`~oodseg.scoring.metrics.order.float32_bounds`: exact float32 comparisons on the keys)."""
    f = keys.shape[0]
    frame = torch.arange(f, device=keys.device).unsqueeze(1)
    seg = torch.where(lab == ANOMALY, 2 * frame, torch.where(lab == INLIER, 2 * frame + 1, 2 * f)).reshape(-1)
    ordered = torch.sort((seg << 32) + keys.reshape(-1)).values
    n = torch.bincount(seg, minlength=2 * f + 1)[: 2 * f].cpu().numpy()
    start = np.cumsum(n) - n
    ranks = {g: quantile_ranks(int(n[g])) for g in range(2 * f) if n[g]}
    idx = np.concatenate([start[g] + r[0] for g, r in ranks.items()]) if ranks else np.zeros(0, np.int64)
    taken = (ordered[torch.from_numpy(idx).to(keys.device)] & 0xFFFFFFFF).cpu().numpy().astype(np.uint32)
    vals = dict(zip(ranks, np.split(keys_to_float32(taken), np.cumsum([r[0].size for r in ranks.values()])[:-1])))
    edges = {i: bin_edges([quantiles_at(vals[g], ranks[g][1], dtype) for g in (2 * i, 2 * i + 1) if g in ranks])
             for i in range(f) if n[2 * i] + n[2 * i + 1]}
    bounds = {g: float32_bounds(edges[g // 2], last_inclusive=True) + (g << 32) for g in ranks}
    flat = np.concatenate(list(bounds.values())) if bounds else np.zeros(0, np.int64)
    found = torch.searchsorted(ordered, torch.from_numpy(flat).to(keys.device)).cpu().numpy()
    below = dict(zip(bounds, np.split(found, np.cumsum([b.size for b in bounds.values()])[:-1])))
    out: list[Frame | None] = []
    for i in range(f):
        if i not in edges:
            out.append(None)
            continue
        counts = [np.diff(below[g] - start[g]).astype(np.int32) if g in below else
                  np.zeros(edges[i].size - 1, np.int32) for g in (2 * i, 2 * i + 1)]
        out.append((edges[i][:-1], counts[0], counts[1], int(n[2 * i]), int(n[2 * i + 1])))
    return out


# ------------------------------------------------------------------------------------------------------------------
# Pooled curve
# ------------------------------------------------------------------------------------------------------------------


def pooled_curve(edges: np.ndarray, tp: np.ndarray, fp: np.ndarray, n_pos: int, n_neg: int) -> dict[str, np.ndarray]:
    """The toolkit's curve points (after ``curves_from_cmats``' de-duplication and end points) from all frames'
    bin entries: ``threshold``, ``tp``, ``fp`` (float64), high to low thresholds. Order-independent: groups of equal
    edges are summed, and the partial first point is the tied top entry with the fewest (anomaly, inlier) pixels.

    Args:
        edges: ``[N]`` float64 lower bin edges of every frame's :func:`frame_bins`, concatenated.
        tp, fp: ``[N]`` anomaly / inlier pixel counts of those bins.
        n_pos, n_neg: total anomaly / inlier pixels over all frames (both > 0).
    """
    thr, inv = np.unique(edges, return_inverse=True)
    g_tp = np.bincount(inv, weights=tp, minlength=thr.size)[::-1]
    g_fp = np.bincount(inv, weights=fp, minlength=thr.size)[::-1]
    top = np.flatnonzero(inv == thr.size - 1)
    first = top[np.lexsort((fp[top], tp[top]))[0]]
    t = np.concatenate([[thr[-1]], thr[::-1]])
    c_tp = np.concatenate([[float(tp[first])], np.cumsum(g_tp)])
    c_fp = np.concatenate([[float(fp[first])], np.cumsum(g_fp)])
    if c_tp[0] != 0 or c_fp[0] != 0:  # the curve starts at (0, 0)
        t, c_tp, c_fp = np.r_[t.max() + 1, t], np.r_[0.0, c_tp], np.r_[0.0, c_fp]
    if c_tp[-1] != n_pos or c_fp[-1] != n_neg:  # ... and ends with every pixel predicted
        t, c_tp, c_fp = np.r_[t, t.max() - 1], np.r_[c_tp, n_pos], np.r_[c_fp, n_neg]
    return {"threshold": t, "tp": c_tp, "fp": c_fp}


def leaderboard_metrics(curve: Mapping[str, np.ndarray], n_pos: int, n_neg: int) -> dict[str, float]:
    """``auprc``, ``auroc``, ``fpr95``, ``best_f1``, ``threshold`` from :func:`pooled_curve`, by the toolkit's
    ``curves_from_cmats`` rules (both classes present)."""
    tp, fp = curve["tp"], curve["fp"]
    tpr, fpr = tp / n_pos, fp / n_neg
    n_pred = tp + fp
    precision = np.ones_like(tp)
    np.divide(tp, n_pred, out=precision, where=n_pred > 0)
    f1 = 2 * tp / (2 * tp + fp + (n_pos - tp))
    k95 = int(np.searchsorted(tpr, TPR_TARGET))
    best = int(np.nanargmax(f1))
    return {
        "auprc": float(np.sum(np.diff(tpr) * precision[1:])),
        "auroc": float(np.trapezoid(tpr, fpr)),
        "fpr95": float(fpr[k95]) if k95 < tpr.size else 1.0,
        "best_f1": float(f1[best]),
        "threshold": float(curve["threshold"][best]),
    }


# ------------------------------------------------------------------------------------------------------------------
# The mergeable metric
# ------------------------------------------------------------------------------------------------------------------


def key_order(keys: np.ndarray) -> KeyOrder | np.ndarray:
    """A class's scores for :func:`frame_bins` from their keys: a :class:`KeyOrder` for ≥ 2^15 values, else the
    sorted values (a small sort is cheaper than the key histogram; measured in CPU time on 1e4 / 5e5 values)."""
    return KeyOrder(keys) if keys.size >= 1 << 15 else keys_to_float32(np.sort(keys))


def _concat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def split_frames(x: Array) -> list[Array]:
    """Frames of an input: ``[B, H, W]`` (any ≥ 3-D array: the leading axis) → B frames; ``[H, W]`` or 1-D → one."""
    return [x[i] for i in range(x.shape[0])] if x.ndim >= 3 else [x]


@register_metric("smiyc_pixel")
class SmiycPixelMetrics(MergeableMetric):
    """The SMIYC toolkit's leaderboard pixel numbers (``PixBinaryClass``: ≤ 768 quantile bins per frame, pooled
    by bin lower edge), reproduced as a mergeable state of per-frame bins; not the exact pooled curve.

    ``update(scores, labels)`` takes numpy arrays or torch tensors (on any device: sorting, quantile gathers and
    counting run there, only ≤ 768 bins per frame cross to the host); ``[B, H, W]`` is B frames, ``[H, W]`` (or a
    1-D array) one frame. ``fp16=True`` rounds scores to float16 first, as the toolkit stores them (|score| ≥ 65520
    would become inf and raises ``ValueError``). ``compute()``: ``auprc``, ``auroc``, ``fpr95``, ``best_f1``,
    ``threshold`` (the toolkit's ``best_f1_threshold``, a lower bin edge that it applies as ``score > threshold``
    in the scores' dtype), ``n_frames``; NaN (with a ``RuntimeWarning``) without both anomaly and inlier pixels.
    """

    columns = {"auprc": "auprc_smiyc", "fpr95": "fpr95_smiyc", "auroc": "auroc_smiyc"}

    def __init__(self, fp16: bool = False, validate: bool = True) -> None:
        self.fp16 = bool(fp16)
        self.validate = validate  # runtime switch, not part of the state
        self._edges: list[np.ndarray] = []
        self._tp: list[np.ndarray] = []
        self._fp: list[np.ndarray] = []
        self._n_pos: list[int] = []
        self._n_neg: list[int] = []

    def config(self) -> dict[str, Any]:
        return {"fp16": self.fp16}

    def update(self, scores: Any, labels: Any) -> SmiycPixelMetrics:
        """Add the frame(s) of one batch (see the class docstring); accelerator tensors go to :meth:`_update_torch`."""
        if isinstance(scores, torch.Tensor) and scores.device.type != "cpu":
            return self._update_torch(scores, labels)
        return self.add_frames(*scores_and_labels(scores, labels, self.validate))

    def _update_torch(self, scores: torch.Tensor, labels: Any) -> SmiycPixelMetrics:
        """:meth:`update` with torch ops on the scores' device (same validation as the numpy path)."""
        s, lab = torch_scores_and_labels(scores, labels, self.validate)
        return self.add_frames(s, lab)

    def add_frames(self, scores: Array, labels: Array, keys: np.ndarray | None = None) -> SmiycPixelMetrics:
        """Add already validated float32 scores and 0/1/255 labels (numpy, or torch on any device) of one or more
        frames (:func:`split_frames`); all frames are binned before any is added, so a failing batch adds nothing.
        ``keys``: the scores' :func:`float32_keys` (numpy) or ``float32_keys_torch`` (torch) when the caller has
        them. Torch input is binned batch-wise on its device (:func:`device_frames`)."""
        dtype = np.float16 if self.fp16 else np.float32
        given = keys is not None and not self.fp16  # fp16 rounding changes the keys
        if isinstance(scores, torch.Tensor):
            rows = scores.shape[0] if scores.ndim >= 3 else 1
            k = keys if given else float32_keys_torch(self._rounded(scores))
            frames = device_frames(k.reshape(rows, -1), labels.reshape(rows, -1), dtype)
        else:
            key_frames = split_frames(keys) if given else [None] * len(split_frames(labels))
            frames = [self._frame(s, lab, k, dtype) for s, lab, k in zip(split_frames(self._rounded(scores)),
                                                                         split_frames(labels), key_frames)]
        for f in frames:
            if f is not None:
                self._add(*f)
        return self

    def _rounded(self, s: Array) -> Array:
        """With ``fp16``: the scores rounded to float16, kept in float32 storage (exact; numpy sorts float16 slowly);
        a score that overflows float16 raises ``ValueError``."""
        if not self.fp16:
            return s
        with np.errstate(over="ignore"):  # overflow is reported just below
            s = s.half().float() if isinstance(s, torch.Tensor) else s.astype(np.float16).astype(np.float32)
        n_inf = int((s.isinf() if isinstance(s, torch.Tensor) else np.isinf(s)).sum())
        if n_inf:
            raise ValueError(f"SMIYC fp16: {n_inf} scores overflow float16 (|score| >= 65520; the toolkit would "
                             "store inf); rescale or clip the scores, or use smiyc_fp16=False")
        return s

    @staticmethod
    def _frame(s: np.ndarray, lab: np.ndarray, keys: np.ndarray | None, dtype: type) -> Frame | None:
        """One host frame's bins and pixel counts (``None`` if it has no valid pixel). The scores are not sorted: their
        :class:`~oodseg.scoring.metrics.order.KeyOrder` answers the few ranks and counts the binning reads."""
        k = float32_keys(s) if keys is None else keys
        pos, neg = key_order(k[lab == ANOMALY]), key_order(k[lab == INLIER])
        if pos.shape[0] + neg.shape[0] == 0:
            return None
        return (*frame_bins(pos, neg, dtype), int(pos.shape[0]), int(neg.shape[0]))

    def _add(self, edges: np.ndarray, tp: np.ndarray, fp: np.ndarray, n_pos: int, n_neg: int) -> None:
        self._edges.append(edges)
        self._tp.append(tp)
        self._fp.append(fp)
        self._n_pos.append(n_pos)
        self._n_neg.append(n_neg)

    def _merge(self, other: SmiycPixelMetrics) -> None:
        for f in zip(other._edges, other._tp, other._fp, other._n_pos, other._n_neg):
            self._add(*f)

    def _state(self) -> dict[str, Any]:
        """Concatenated bins (``edges``, ``tp``, ``fp``), ``n_bins`` / ``n_pos`` / ``n_neg`` per frame."""
        return {
            "edges": _concat(self._edges, np.float64), "tp": _concat(self._tp, np.int32),
            "fp": _concat(self._fp, np.int32),
            "n_bins": np.array([e.size for e in self._edges], np.int64),
            "n_pos": np.array(self._n_pos, np.int64), "n_neg": np.array(self._n_neg, np.int64),
        }

    def _load(self, state: Mapping[str, Any]) -> None:
        bounds = np.cumsum(np.asarray(state["n_bins"], np.int64))[:-1]
        per = [np.split(np.asarray(state[k], dt), bounds) for k, dt in (("edges", np.float64), ("tp", np.int32),
                                                                        ("fp", np.int32))]
        for e, tp, fp, n_pos, n_neg in zip(*per, state["n_pos"], state["n_neg"]):
            self._add(e, tp, fp, int(n_pos), int(n_neg))

    def _compute(self) -> dict[str, Any]:
        n_pos, n_neg = sum(self._n_pos), sum(self._n_neg)
        out: dict[str, Any] = {"n_frames": len(self._edges)}
        nan = float("nan")
        if n_pos == 0 or n_neg == 0:
            warnings.warn(f"SmiycPixelMetrics: {n_pos} anomaly and {n_neg} inlier pixels; the curve needs both, "
                          "returning NaN", RuntimeWarning, stacklevel=3)
            return {**out, "auprc": nan, "auroc": nan, "fpr95": nan, "best_f1": nan, "threshold": nan}
        state = self._state()
        curve = pooled_curve(state["edges"], state["tp"], state["fp"], n_pos, n_neg)
        return {**out, **leaderboard_metrics(curve, n_pos, n_neg)}
