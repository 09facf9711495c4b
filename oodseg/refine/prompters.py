"""Box prompters: anomaly score map → box prompts for SAM (S2M's first stage), one registry (timm style).

A prompter is built by ``create_prompter(name, **cfg)`` and called as ``prompter(score_map [H,W], image=None,
calibration=None) -> Boxes`` (xyxy in original pixels, scores in [0, 1], sorted by descending score). A new prompter
is one class (or factory function) plus ``@register_prompter(name)``. Prompters declare no Tune space: their settings
act on the refine stage, and no search runs it (the Tune searches fit a scorer's temperature and a loss's
parameters).

Registered here: ``components`` (training-free: thresholded connected components). ``detector`` (S2M's Faster R-CNN
on the score map) is registered in :mod:`oodseg.refine.detector`.

Box convention: continuous pixel-edge xyxy, i.e. a component covering columns ``x0..x1`` and rows ``y0..y1``
(inclusive) has the box ``[x0, y0, x1 + 1, y1 + 1]``, as detectron2's ``BitMasks.get_bounding_boxes``
(facebookresearch/detectron2:detectron2/structures/masks.py); torchvision's ``masks_to_boxes`` gives x1, y1 one less.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from scipy import ndimage

from oodseg.registry import Registry
from oodseg.scoring.metrics.pixel import PixelMetrics, keys_to_float32

_STRUCTURE = np.ones((3, 3), dtype=bool)  # 8-connectivity
_MIN_BOX_SCORE = 1e-6  # floor of component box scores: every kept box stays > 0 in the assembled map
_IQR_TO_SIGMA = 1.349  # IQR of a normal distribution in standard deviations


@dataclass(frozen=True)
class Boxes:
    """``xyxy`` float32 ``[K, 4]`` (original pixels) and ``scores`` float32 ``[K]``, on the CPU."""

    xyxy: torch.Tensor
    scores: torch.Tensor

    def __post_init__(self) -> None:
        if self.xyxy.ndim != 2 or self.xyxy.shape[1] != 4 or self.scores.shape != (self.xyxy.shape[0],):
            raise ValueError(f"Boxes needs xyxy [K,4] and scores [K]; got {tuple(self.xyxy.shape)} and "
                             f"{tuple(self.scores.shape)}")

    @classmethod
    def empty(cls) -> Boxes:
        return cls(torch.zeros((0, 4), dtype=torch.float32), torch.zeros(0, dtype=torch.float32))

    @classmethod
    def ranked(cls, xyxy: Any, scores: Any, max_boxes: int | None = None) -> Boxes:
        """Boxes sorted by descending score (stable: ties keep their input order), at most ``max_boxes``."""
        xyxy = torch.as_tensor(xyxy, dtype=torch.float32).detach().cpu().reshape(-1, 4)
        scores = torch.as_tensor(scores, dtype=torch.float32).detach().cpu().reshape(-1)
        order = torch.sort(scores, descending=True, stable=True).indices[:max_boxes]
        return cls(xyxy[order].contiguous(), scores[order].contiguous())

    def __len__(self) -> int:
        return int(self.scores.shape[0])


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


class Prompter(Protocol):
    def __call__(self, score_map: Any, image: Any = None, calibration: ScoreCalibration | None = None) -> Boxes: ...


PROMPTERS: Registry[Prompter] = Registry("prompter")


def register_prompter(name: str | None = None, **meta: Any) -> Callable:
    """Decorator registering a prompter factory (class or function), with optional metadata."""
    return PROMPTERS.register(name, **meta)


def create_prompter(name: str, **cfg: Any) -> Prompter:
    return PROMPTERS.create(name, **cfg)


def list_prompters() -> list[str]:
    return PROMPTERS.list()


def score_map_array(score_map: Any) -> np.ndarray:
    """A float32 ``[H, W]`` numpy copy of a score map; ``ValueError`` for another shape, NaN/inf or a constant map
    (nothing in it can be told apart, so no prompt is meaningful)."""
    if isinstance(score_map, torch.Tensor):
        score_map = score_map.detach().float().cpu().numpy()
    s = np.asarray(score_map, dtype=np.float32)
    if s.ndim != 2 or s.size == 0:
        raise ValueError(f"score map must be a non-empty [H, W] array; got shape {s.shape}")
    finite = np.isfinite(s)
    if not finite.any():
        raise ValueError(f"score map {s.shape} is all NaN/inf")
    if not finite.all():
        raise ValueError(f"score map {s.shape} has {int((~finite).sum())} NaN/inf pixels")
    if s.min() == s.max():
        raise ValueError(f"score map {s.shape} is constant (every pixel = {float(s.flat[0])}): nothing to prompt")
    return s


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """xyxy box of a bool mask ``[H, W]`` (pixel-edge convention, see the module docstring); None if empty.

    (S2M's released generator takes ``np.argwhere`` (row, col) min/max as (x, y): its boxes are transposed.)"""
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return None
    y0, y1 = np.flatnonzero(rows)[[0, -1]]
    x0, x1 = np.flatnonzero(cols)[[0, -1]]
    return np.array([x0, y0, x1 + 1, y1 + 1], dtype=np.float32)


@register_prompter("components")
class ComponentPrompter:
    """Training-free prompts: one box per 8-connected component of ``score > threshold``.

    ``threshold`` (else the calibration's best-F1 threshold) binarises the map; components smaller than
    ``min_area`` pixels are dropped (default 16 = 4×4 px, the footprint of one low-res SAM mask pixel at 1024 input).
    A component's raw score ``v`` is the ``mean`` (default) or ``max`` of its pixel scores; since every pixel of it
    exceeds ``threshold``, ``v > threshold``, and its box score is

        ``p = 2·σ((v − threshold) / scale) − 1 = tanh((v − threshold) / (2·scale))``  ∈ (0, 1],

    strictly increasing in ``v`` (floored at 1e-6 so a kept box stays > 0 in the assembled map). ``scale`` (else the
    calibration's inlier IQR scale) makes ``p`` unit-free: S2M thresholds ``t ∈ [0, 1]`` then mean "so many
    in-distribution spreads above the operating point" for every scorer (p = 0.46 at one spread, 0.91 at three),
    where a fraction of the raw score range would depend on each scorer's outliers.
    """

    def __init__(self, threshold: float | None = None, scale: float | None = None, min_area: int = 16,
                 reduce: str = "mean", max_boxes: int = 100) -> None:
        if reduce not in ("mean", "max"):
            raise ValueError(f"components prompter: reduce must be 'mean' or 'max', got {reduce!r}")
        if min_area < 1 or max_boxes < 0:
            raise ValueError(f"components prompter: min_area must be ≥ 1 and max_boxes ≥ 0; got {min_area}, "
                             f"{max_boxes}")
        if scale is not None and not scale > 0:
            raise ValueError(f"components prompter: scale must be > 0, got {scale}")
        self.threshold, self.scale, self.min_area = threshold, scale, int(min_area)
        self.reduce, self.max_boxes = reduce, int(max_boxes)

    def _operating_point(self, calibration: ScoreCalibration | None) -> tuple[float, float]:
        threshold = self.threshold if self.threshold is not None else getattr(calibration, "threshold", None)
        scale = self.scale if self.scale is not None else getattr(calibration, "scale", None)
        if threshold is None or scale is None:
            raise ValueError("components prompter needs threshold= and scale= or a ScoreCalibration "
                             f"(got threshold={threshold}, scale={scale})")
        return float(threshold), float(scale)

    def __call__(self, score_map: Any, image: Any = None, calibration: ScoreCalibration | None = None) -> Boxes:
        s = score_map_array(score_map)
        threshold, scale = self._operating_point(calibration)
        labels, n = ndimage.label(s > np.float32(threshold), structure=_STRUCTURE)
        if n == 0:
            return Boxes.empty()
        index = np.arange(1, n + 1)
        area = np.bincount(labels.reshape(-1), minlength=n + 1)[1:]
        keep = index[area >= self.min_area]
        if keep.size == 0:
            return Boxes.empty()
        slices = ndimage.find_objects(labels)
        xyxy = np.array([[slices[i - 1][1].start, slices[i - 1][0].start, slices[i - 1][1].stop,
                          slices[i - 1][0].stop] for i in keep], dtype=np.float32)
        s64 = s.astype(np.float64)
        raw = ndimage.mean(s64, labels, keep) if self.reduce == "mean" else ndimage.maximum(s64, labels, keep)
        score = np.maximum(np.tanh((np.asarray(raw) - threshold) / (2.0 * scale)), _MIN_BOX_SCORE)
        return Boxes.ranked(xyxy, score, self.max_boxes)
