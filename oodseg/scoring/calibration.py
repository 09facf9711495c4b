"""A scorer's operating point and in-distribution spread on a calibration split (:class:`ScoreCalibration`).

The refine stage's ``components`` prompter thresholds and scales with it, and S2M's detector we train normalises its
input with it (:class:`~oodseg.models.detector.DetectorConfig` ``location`` / ``scale``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from oodseg.scoring.metrics.pixel import PixelMetrics, keys_to_float32

_IQR_TO_SIGMA = 1.349  # IQR of a normal distribution in standard deviations


@dataclass(frozen=True)
class ScoreCalibration:
    """A scorer's statistics on a calibration split (in-distribution images with anomaly labels).

    ``threshold``: the pixel best-F1 threshold (anomaly where ``score > threshold``, as
    :class:`~oodseg.scoring.metrics.PixelMetrics` reports it). ``location`` / ``scale``: the median and the
    normal-consistent IQR (``(Q75 − Q25) / 1.349``) of the *inlier* pixel scores: robust to the anomaly tail and to
    a few extreme pixels, and in the scorer's own units, so ``(s − location) / scale`` is comparable across scorers
    (msp in [0, 1], energies around −20, logit sums in the hundreds).
    """

    threshold: float
    location: float
    scale: float

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) for v in (self.threshold, self.location, self.scale)) or self.scale <= 0:
            raise ValueError(f"ScoreCalibration needs finite values and scale > 0; got {self}")

    @classmethod
    def from_pixel_metrics(cls, metrics: PixelMetrics) -> ScoreCalibration:
        """From a calibration split's :class:`PixelMetrics`: its best-F1 threshold, plus the median and IQR of its
        inlier histogram (bin floors, relative resolution ``2^-(bits-9)``)."""
        threshold = float(metrics.compute(warn=False)["threshold"])
        state = metrics.state_dict()["state"]
        neg = np.asarray(state["neg"], dtype=np.int64)
        if not math.isfinite(threshold) or neg.sum() == 0:
            raise ValueError("ScoreCalibration needs a calibration split with both inlier and anomaly pixels")
        bins = np.asarray(state["bins"], dtype=np.uint64)
        values = keys_to_float32((bins << np.uint64(32 - metrics.bits)).astype(np.uint32)).astype(np.float64)
        cdf = np.cumsum(neg) / neg.sum()
        q25, q50, q75 = (float(values[np.searchsorted(cdf, q)]) for q in (0.25, 0.5, 0.75))
        if q75 <= q25:
            raise ValueError(f"inlier scores of the calibration split have zero IQR (Q25 = Q75 = {q25}): "
                             "no robust scale; use a scorer with a continuous score")
        return cls(threshold=threshold, location=q50, scale=(q75 - q25) / _IQR_TO_SIGMA)

    @classmethod
    def from_scores(cls, scores: Any, labels: Any) -> ScoreCalibration:
        """From score maps and 0/1/255 anomaly labels (numpy or torch, any matching shape)."""
        return cls.from_pixel_metrics(PixelMetrics(smiyc=False).update(scores, labels))
