"""Pixel-level anomaly metrics (AuPRC, AUROC, FPR95, best-F1 threshold) as an exact mergeable histogram, plus the
SegmentMeIfYouCan leaderboard's binned numbers next to them.

See :class:`PixelMetrics`. The curve math is in :mod:`oodseg.scoring.metrics.functional` (exact) and
:mod:`oodseg.scoring.metrics.smiyc` (leaderboard).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from oodseg.labels import IGNORE_ID
from oodseg.scoring.metrics.base import (
    MergeableMetric,
    register_metric,
    scores_and_labels,
    torch_scores_and_labels,
)
from oodseg.scoring.metrics.functional import curve_metrics
from oodseg.scoring.metrics.order import count_values, float32_keys, float32_keys_torch, keys_to_float32, take_u32
from oodseg.scoring.metrics.smiyc import SmiycPixelMetrics

PAGE_BITS = 12  # PixelMetrics pages hold 2^12 consecutive bins
#: Scores spanning fewer pages than this are counted by one bincount over that span (≤ 16 MiB of int64 counts);
#: wider ones first find the pages present (one more bincount and a gather: ~2× the time on 8 × 512×1024 pixels).
DENSE_PAGES = 256


@register_metric("pixel")
class PixelMetrics(MergeableMetric):
    """Pixel-level AuPRC, AUROC, FPR@95%TPR and best-F1 threshold over labels 0 inlier / 1 anomaly / 255 ignore.

    Design: each float32 score maps to an order-preserving 32-bit key (:func:`float32_keys`); its top ``bits``
    bits are the bin, and the state is per-bin (negative, positive) int64 counts. The binning is fixed and
    data-independent, so it needs no score range (logits, energies, ±1e30 all work), is exact for ties, and merges
    exactly and order-independently by addition. All metrics are then computed exactly as sklearn would on data
    whose scores were rounded down to their bin (AP: ``Σ_n (R_n − R_{n−1}) P_n`` over descending thresholds,
    sklearn ``average_precision_score``; AUROC: trapezoid over the ROC, sklearn ``roc_auc_score``; FPR95: FPR at the
    first threshold, high to low, where TPR ≥ 0.95). The only difference to exact computation comes from distinct
    scores sharing a bin: a bin spans a relative score width of ``2^-(bits-9)`` (the key's top 9 bits are sign and
    exponent), ≈3e-5 at the default 24 bits. Measured on realistic maps (tests, ``benchmarks/metrics.py``) the error
    is ~1e-6–1e-5, within 1e-4. Limitation: resolution is relative to magnitude, so scores whose common offset is
    ≫ 100× their spread (e.g. 1000 ± 1, or MSP saturated within 1e-5 of −1) lose resolution; raise bits (26) or
    feed a better-conditioned equivalent score. Scores are compared as float32 (what models emit).

    Memory: counts are stored in lazily allocated pages of 4096 consecutive bins (64 KiB); only pages that received
    a pixel exist, so memory depends on how many distinct score regions occur, never on the pixel count: a
    standard-normal score map needs ≈ 20 MiB at 24 bits (≈ 6 MiB at 22), an energy map far fewer pages.
    ``bits`` trades memory for resolution (22 is plenty for sweeps with many metric objects).

    Degenerate data: with no positive or no negative pixels AuPRC/AUROC/FPR95 (and best F1) are NaN and a
    ``RuntimeWarning`` is emitted; NaN/inf scores raise ``ValueError``.

    Leaderboard numbers (``smiyc=True``, the default): every ``update`` also feeds a
    :class:`~oodseg.scoring.metrics.smiyc.SmiycPixelMetrics`, which reproduces the SMIYC toolkit's per-frame
    quantile-binned ``PixBinaryClass`` (the numbers on the leaderboard); ``[B, H, W]`` input is B frames, ``[H, W]``
    or 1-D input one frame (any ≥ 3-D input: frames along the leading axis). ``compute()`` then adds
    ``auprc_smiyc``, ``fpr95_smiyc``, ``auroc_smiyc``, ``best_f1_smiyc`` and ``threshold_smiyc`` (the toolkit's
    best-F1 lower bin edge, applied as ``score > threshold`` in the scores' dtype); all NaN when undefined or with
    ``smiyc=False``. ``smiyc_fp16=True`` rounds the scores to float16 first, as the toolkit stores them. The exact
    numbers are the ones to quote; the leaderboard ones are binned per frame (AuPRC mostly overstated, by up to a
    few 1e-2 when frames have few or no anomaly pixels; see the smiyc module). Cost: memory grows with frames ×
    ≤ 768 bins (~18 KiB a frame); ``update`` also ranks each frame's anomaly and inlier scores (host arrays: from
    a histogram of the keys, :class:`~oodseg.scoring.metrics.order.KeyOrder`; accelerator tensors: one sort of all
    frames, :func:`~oodseg.scoring.metrics.smiyc.device_frames`).
    """

    columns = {
        "auprc": "auprc", "fpr95": "fpr95", "auroc": "auroc", "best_f1": "best_f1", "threshold": "best_threshold",
        "n_pixels": "n_pixels", "n_anomaly": "n_anomaly_pixels", "anomaly_fraction": "anomaly_fraction",
        "auprc_smiyc": "auprc_smiyc", "fpr95_smiyc": "fpr95_smiyc", "auroc_smiyc": "auroc_smiyc",
        "fpr95_interp": "fpr95_interp",
    }

    def __init__(self, bits: int = 24, validate: bool = True, *, smiyc: bool = True, smiyc_fp16: bool = False) -> None:
        if not PAGE_BITS <= bits <= 26:
            raise ValueError(f"bits must be in [{PAGE_BITS}, 26], got {bits}")
        if smiyc_fp16 and not smiyc:
            raise ValueError("PixelMetrics: smiyc_fp16=True needs smiyc=True")
        self.bits = bits
        self.validate = validate  # a runtime switch (hot loops may skip input checks), not part of the state
        self._pages: dict[int, np.ndarray] = {}  # page (= bin >> PAGE_BITS) -> int64 [4096, 2] (neg, pos) counts
        self.smiyc, self.smiyc_fp16 = bool(smiyc), bool(smiyc_fp16)
        self._smiyc = SmiycPixelMetrics(fp16=self.smiyc_fp16, validate=False) if self.smiyc else None

    def config(self) -> dict[str, Any]:
        return {"bits": self.bits, "smiyc": self.smiyc, "smiyc_fp16": self.smiyc_fp16}

    # --- accumulation ---------------------------------------------------------------------------------------
    def update(self, scores: Any, labels: Any) -> PixelMetrics:
        """Add one batch of scores and labels (numpy arrays or torch tensors of the same shape, e.g. ``[B, H, W]``):
        finite anomaly scores (higher = more anomalous, any range) and integer labels 0 inlier / 1 anomaly / 255
        ignore. The SMIYC part reads the leading axis of ≥ 3-D input as frames.

        Scores on an accelerator are binned there (:meth:`_update_torch`): only the per-page counts cross to the
        host, not the pixels. CPU input takes the numpy path (faster than the same torch ops on CPU)."""
        if isinstance(scores, torch.Tensor) and scores.device.type != "cpu":
            return self._update_torch(scores, labels)
        s, lab = scores_and_labels(scores, labels, self.validate)
        keys = float32_keys(s)  # once, for both the histogram and the SMIYC frames
        if self._smiyc is not None:  # first: if it raises (fp16 overflow) nothing was added
            self._smiyc.add_frames(s, lab, keys)
        # code = bin · 2 + label, in uint32 (bits ≤ 26: fits), one compress of the valid pixels, one bincount
        code = ((keys >> np.uint32(32 - self.bits)) << np.uint32(1)) | (lab & np.uint8(1))
        valid = lab != IGNORE_ID
        code = code.reshape(-1) if valid.all() else code[valid]
        if code.size == 0:
            return self
        size = 1 << PAGE_BITS
        first, last = int(code.min()) >> (PAGE_BITS + 1), int(code.max()) >> (PAGE_BITS + 1)
        if last - first < DENSE_PAGES:  # one bincount over the pages from the lowest to the highest
            span = (last - first + 1) * size * 2
            counts = count_values(code - np.uint32(first * size * 2), span).reshape(-1, size, 2)
            present = np.flatnonzero(counts.any(axis=(1, 2)))
            return self._add_pages((present + first).tolist(), counts[present])
        page = code >> np.uint32(PAGE_BITS + 1)
        present = count_values(page, 1 << (self.bits - PAGE_BITS)) > 0
        slot = (np.cumsum(present) - 1).astype(np.uint32)  # compact page numbering: the bincount spans present pages
        local = (take_u32(slot, page) << np.uint32(PAGE_BITS + 1)) | (code & np.uint32(2 * size - 1))
        counts = count_values(local, int(present.sum()) * size * 2).reshape(-1, size, 2)
        return self._add_pages(np.flatnonzero(present).tolist(), counts)

    def _update_torch(self, scores: torch.Tensor, labels: Any) -> PixelMetrics:
        """:meth:`update` with torch ops on the scores' device: the same validation (shared with the numpy path),
        keys, bins and counts as the numpy path (the keys once, for the histogram and the SMIYC frames)."""
        s, lab = torch_scores_and_labels(scores, labels, self.validate)
        keys = float32_keys_torch(s)
        if self._smiyc is not None:
            self._smiyc.add_frames(s, lab, keys)
        valid = lab != IGNORE_ID
        keys, lab = keys[valid], lab[valid].long()
        if keys.numel() == 0:
            return self
        bins = keys >> (32 - self.bits)
        size = 1 << PAGE_BITS
        page = bins >> PAGE_BITS
        present = torch.bincount(page, minlength=1 << (self.bits - PAGE_BITS)) > 0
        slot = torch.cumsum(present, 0) - 1
        local = slot[page] * size + (bins & (size - 1))
        n_pages = int(present.sum())
        counts = torch.bincount(local * 2 + lab, minlength=n_pages * size * 2).view(n_pages, size, 2)
        return self._add_pages(torch.nonzero(present).flatten().tolist(), counts.cpu().numpy())

    def _add_pages(self, pages: list[int], counts: Any) -> PixelMetrics:
        """Add ``counts[k]`` (int64 ``[4096, 2]``) to page ``pages[k]``."""
        for k, p in enumerate(pages):
            if p in self._pages:
                self._pages[p] += counts[k]
            else:
                self._pages[p] = counts[k].copy()
        return self

    def _merge(self, other: PixelMetrics) -> None:
        self._add_pages(list(other._pages), list(other._pages.values()))
        if self._smiyc is not None and other._smiyc is not None:  # equal configs: both or neither
            self._smiyc._merge(other._smiyc)

    def _state(self) -> dict[str, Any]:
        """Only the non-empty bins: ``bins``, ``neg``, ``pos``; plus the SMIYC frames as ``smiyc_*``."""
        bins, counts = self._histogram()
        state = {"bins": bins, "neg": counts[:, 0].copy(), "pos": counts[:, 1].copy()}
        if self._smiyc is not None:
            state.update({f"smiyc_{k}": v for k, v in self._smiyc._state().items()})
        return state

    def _load(self, state: Mapping[str, Any]) -> None:
        bins = np.asarray(state["bins"], dtype=np.int64)
        size = 1 << PAGE_BITS
        for p in np.unique(bins >> PAGE_BITS).tolist():
            sel = (bins >> PAGE_BITS) == p
            page = np.zeros((size, 2), dtype=np.int64)
            page[bins[sel] & (size - 1), 0] = np.asarray(state["neg"], dtype=np.int64)[sel]
            page[bins[sel] & (size - 1), 1] = np.asarray(state["pos"], dtype=np.int64)[sel]
            self._pages[int(p)] = page
        if self._smiyc is not None and "smiyc_edges" not in state:  # a state saved before SMIYC frames existed
            self.smiyc, self._smiyc = False, None  # its data has no frames: no SMIYC numbers, and no merge with any
        elif self._smiyc is not None:
            self._smiyc._load({k[len("smiyc_"):]: v for k, v in state.items() if k.startswith("smiyc_")})

    # --- evaluation -----------------------------------------------------------------------------------------
    def _histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """Non-empty bins ascending and their (neg, pos) counts ``[M, 2]``."""
        if not self._pages:
            return np.zeros(0, np.int64), np.zeros((0, 2), np.int64)
        pages = sorted(self._pages)
        size = 1 << PAGE_BITS
        counts = np.concatenate([self._pages[p] for p in pages])
        bins = (np.asarray(pages, dtype=np.int64)[:, None] * size + np.arange(size)).reshape(-1)
        nz = counts.any(axis=1)
        return bins[nz], counts[nz]

    def _bin_floor(self, bins: np.ndarray) -> np.ndarray:
        """Smallest float32 in each bin."""
        return keys_to_float32((bins.astype(np.uint64) << np.uint64(32 - self.bits)).astype(np.uint32))

    def _curve(self) -> dict[str, np.ndarray]:
        """Cumulative counts at each distinct (binned) threshold, from high to low scores."""
        bins, counts = self._histogram()
        bins, counts = bins[::-1], counts[::-1]
        return {"bins": bins, "fp": np.cumsum(counts[:, 0]), "tp": np.cumsum(counts[:, 1])}

    def _compute(self) -> dict[str, float]:
        """``auprc``, ``auroc``, ``fpr95``, ``fpr95_interp``, ``threshold`` (best-F1; predict anomaly where
        ``score > threshold``), ``best_f1``, ``n_pixels``, ``n_anomaly``, ``anomaly_fraction``, and the leaderboard's ``auprc_smiyc``,
        ``auroc_smiyc``, ``fpr95_smiyc``, ``best_f1_smiyc``, ``threshold_smiyc`` (NaN with ``smiyc=False``)."""
        c = self._curve()
        n_pos = int(c["tp"][-1]) if c["tp"].size else 0
        n_neg = int(c["fp"][-1]) if c["fp"].size else 0
        out: dict[str, float] = {
            "n_pixels": n_pos + n_neg,
            "n_anomaly": n_pos,
            "anomaly_fraction": n_pos / (n_pos + n_neg) if n_pos + n_neg else float("nan"),
        }
        if n_pos == 0 or n_neg == 0:
            warnings.warn(
                f"PixelMetrics: {n_pos} anomaly and {n_neg} inlier pixels; AuPRC/AUROC/FPR95 need both, returning NaN",
                RuntimeWarning,
                stacklevel=3,
            )
            nan = float("nan")
            out.update({f"{k}{sfx}": nan for k in ("auprc", "auroc", "fpr95", "threshold", "best_f1")
                        for sfx in ("", "_smiyc")}, fpr95_interp=nan)
            return out
        m = curve_metrics(c["tp"], c["fp"])
        # `score > threshold` selects exactly the bins at or above the best one: the largest float below its floor.
        floor_key = int(c["bins"][m.pop("best_index")]) << (32 - self.bits)
        threshold = float(keys_to_float32(np.array([max(floor_key - 1, 0)], dtype=np.uint32))[0])
        return {**out, **m, "threshold": threshold, **self._compute_smiyc()}

    def _compute_smiyc(self) -> dict[str, float]:
        """The leaderboard numbers under ``*_smiyc`` keys (NaN with ``smiyc=False``)."""
        keys = ("auprc", "auroc", "fpr95", "threshold", "best_f1")
        smiyc = self._smiyc._compute() if self._smiyc is not None else {}
        return {f"{k}_smiyc": float(smiyc.get(k, float("nan"))) for k in keys}

    def curves(self, max_points: int = 1000) -> dict[str, np.ndarray]:
        """PR and ROC curve points for plots (``threshold`` = bin floor, descending), downsampled to ≤ max_points."""
        c = self._curve()
        tp, fp = c["tp"].astype(np.float64), c["fp"].astype(np.float64)
        if tp.size == 0 or tp[-1] == 0 or fp[-1] == 0:
            raise ValueError("PixelMetrics.curves needs both anomaly and inlier pixels")
        idx = np.unique(np.linspace(0, tp.size - 1, min(max_points, tp.size)).round().astype(np.int64))
        return {
            "threshold": self._bin_floor(c["bins"][idx]).astype(np.float64),
            "precision": tp[idx] / (tp[idx] + fp[idx]),
            "recall": tp[idx] / tp[-1],
            "tpr": tp[idx] / tp[-1],
            "fpr": fp[idx] / fp[-1],
        }
