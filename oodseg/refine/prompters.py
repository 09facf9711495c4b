"""Box prompters: anomaly score map → box prompts for SAM (S2M's first stage), one registry (timm style).

A prompter is built by ``create_prompter(name, **cfg)`` and called as ``prompter(score_map [H,W], image=None,
calibration=None) -> Boxes`` (xyxy in original pixels, scores in [0, 1], sorted by descending score). A new prompter
is one class (or factory function) plus ``@register_prompter(name)``. Prompters declare no Tune space: their settings
act on the refine stage, and no search runs it (the Tune searches fit a scorer's temperature and a loss's
parameters).

Registered here: ``components`` (training-free: thresholded connected components). ``detector`` (S2M's Faster R-CNN
on the score map) is registered in :mod:`oodseg.refine.detector`.

Boxes follow :class:`oodseg.outputs.Boxes`' pixel-edge convention; a prompter's operating point comes from a
:class:`~oodseg.scoring.calibration.ScoreCalibration`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from scipy import ndimage

from oodseg.outputs import Boxes
from oodseg.registry import Registry
from oodseg.scoring.calibration import ScoreCalibration

_STRUCTURE = np.ones((3, 3), dtype=bool)  # 8-connectivity
_MIN_BOX_SCORE = 1e-6  # floor of component box scores: every kept box stays > 0 in the assembled map


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
