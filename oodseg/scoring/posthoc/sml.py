"""``sml``: Standardized Max Logits (Jung et al., "Standardized Max Logits: A Simple yet Effective Approach for
Identifying Unexpected Road Obstacles in Urban-Scene Segmentation", ICCV 2021; shjung13/Standardized-max-logits).

Fit (``calculate_statistics.py``): over the training pixels, the max logit ``m = max_c L_c`` grouped by the
predicted class ``ĉ = argmax_c L_c``; per class its mean ``μ_c`` and unbiased variance ``σ²_c`` (``torch.var``).
Score (``network/deepv3.py``): ``SML = (m − μ_ĉ) / σ_ĉ`` on the label-size class scores, then optionally the
iterative boundary suppression and the dilated smoothing (:mod:`oodseg.scoring.spatial`; reference defaults:
width 4, 4 iterations, 7×7 Gaussian σ = 1 at dilation 6); the anomaly score is ``−SML``. A class never predicted
on the training split keeps ``μ = 0, σ = 1`` (its max logit unstandardised). SML ignores the temperature.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from oodseg.outputs import inlier_channels
from oodseg.scoring.class_scores import pixel_class_scores
from oodseg.scoring.context import ScoreContext
from oodseg.scoring.posthoc import exact
from oodseg.scoring.posthoc.fit import FitState, register_fit
from oodseg.scoring.scorers import register_scorer
from oodseg.scoring.spatial import boundary_suppression, dilated_smoothing


@register_fit("max_logit_stats")
class MaxLogitStats(FitState):
    """Per predicted class: count, ``Σ m`` and ``Σ m²`` of the max logit ``m`` (exact integer sums, :mod:`.exact`)."""

    def __init__(self) -> None:
        self.count = np.zeros(0, np.int64)
        self.sums = np.zeros(0, np.int64)
        self.squares = np.zeros((0, 3), np.int64)

    def config(self) -> dict[str, Any]:
        return {}

    def _update(self, outputs: Any, labels: torch.Tensor, ids: list[str]) -> None:
        z = pixel_class_scores(outputs, 1.0, tuple(labels.shape[-2:]))
        if getattr(outputs, "ood_channels", ()):
            z = z[:, inlier_channels(outputs)]
        m, pred = z.max(dim=1)
        c = z.shape[1]
        q, cls = exact.quantise(m.flatten()), pred.flatten()
        self._add(np.bincount(cls.cpu().numpy(), minlength=c).astype(np.int64),
                  exact.class_sums(q[:, None], cls, c)[:, 0], exact.class_squares(q, cls, c))

    def _add(self, count: np.ndarray, sums: np.ndarray, squares: np.ndarray) -> None:
        if len(self.count) == 0:
            self.count, self.sums, self.squares = (np.zeros_like(count), np.zeros_like(sums),
                                                   np.zeros_like(squares))
        if len(count) != len(self.count):
            raise ValueError(f"max_logit_stats: {len(count)} classes cannot merge into {len(self.count)}")
        self.count, self.sums, self.squares = self.count + count, self.sums + sums, self.squares + squares

    def _merge(self, other: MaxLogitStats) -> None:
        if len(other.count):
            self._add(other.count, other.sums, other.squares)

    def _state(self) -> dict[str, Any]:
        return {"count": self.count.copy(), "sums": self.sums.copy(), "squares": self.squares.copy()}

    def _load(self, state: Any) -> None:
        self.count = np.asarray(state["count"], np.int64)
        self.sums = np.asarray(state["sums"], np.int64)
        self.squares = np.asarray(state["squares"], np.int64).reshape(-1, 3)

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """Per class ``μ_c`` and ``σ_c`` (unbiased; 0 and 1 for classes with fewer than two pixels)."""
        return self.cached("mean_std", self._mean_std)

    def _mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self.count) == 0:
            raise ValueError("max_logit_stats: empty fit (no training pixels)")
        n = self.count.astype(np.float64)
        total = self.sums / exact.SCALE
        ok = n > 1
        mean = np.where(n > 0, total / np.maximum(n, 1), 0.0)
        var = (exact.combine_squares(self.squares) - n * mean * mean) / np.maximum(n - 1, 1)
        std = np.where(ok, np.sqrt(np.maximum(var, 0.0)), 1.0)
        return np.where(ok, mean, 0.0), np.where(std > 0, std, 1.0)


SML_SPACE = {
    "boundary_width": {"type": "choice", "values": [0, 2, 4, 8]},
    "dilation": {"type": "choice", "values": [0, 2, 4, 6, 8]},
}


@register_scorer("sml", space=SML_SPACE, reads="map", fit="max_logit_stats")
def sml(ctx: ScoreContext, temperature: float, boundary_width: int = 4, boundary_iterations: int = 4,
        dilation: int = 6) -> torch.Tensor:
    """``−SML``; ``boundary_width=0`` turns boundary suppression off, ``dilation=0`` the dilated
    smoothing (the reference applies both: width 4 in 4 iterations, dilation 6)."""
    stats: MaxLogitStats = ctx.fitted("sml")
    z = ctx.class_scores(1.0)
    mean, std = (torch.as_tensor(a, dtype=torch.float32, device=z.device) for a in stats.mean_std())
    if len(mean) != z.shape[1]:
        raise ValueError(f"sml: the fit has {len(mean)} classes, the outputs {z.shape[1]}")
    m, pred = z.max(dim=1)
    out = (m - mean[pred]) / std[pred]
    if boundary_width > 0:
        out = boundary_suppression(out, pred, boundary_width, min(boundary_iterations, boundary_width))
    if dilation > 0:
        out = dilated_smoothing(out, dilation)
    return -out
