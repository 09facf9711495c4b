"""``mahalanobis``: class-conditional Gaussians of features with a shared covariance (Lee et al., "A Simple Unified
Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018; the facts as in
OpenOOD's ``mds_postprocessor`` / ``mds_tools.sample_estimator``).

Fit: over the training feature pixels labelled with class ``c`` (labels sampled nearest on the feature grid; void and
outlier pixels left out), the class means ``μ_c`` and the shared covariance
``Σ = (1/N) Σ_c Σ_{i∈c} (f_i − μ_c)(f_i − μ_c)ᵀ`` (the biased estimate of sklearn's ``EmpiricalCovariance`` on the
class-centred features), from exact per-class sums and ``Σ f fᵀ`` (:mod:`.exact`); precision ``P = Σ⁺`` (pseudo-
inverse, eigenvalues below ``D · eps · λ_max`` dropped as ``scipy.linalg.pinvh``). Score per feature pixel:
``min_c (f − μ_c)ᵀ P (f − μ_c)`` (Lee's ``M(x) = max_c −(f − μ_c)ᵀ P (f − μ_c)``, negated), computed as squared
distances after whitening ``y = W f`` with ``WᵀW = P``; the feature-resolution map is resized to the label size.
No input pre-processing (Lee's ε) and a single layer: the model's exposed features.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from oodseg.scoring.context import ScoreContext
from oodseg.scoring.posthoc import exact
from oodseg.scoring.posthoc.fit import FitState, feature_pixels, feature_rows, register_fit, valid_classes
from oodseg.scoring.scorers import register_scorer

PIXEL_CHUNK = 1 << 16


@register_fit("class_gaussians", features=True)
class ClassGaussians(FitState):
    """Per-class feature counts and sums, and ``Σ f fᵀ`` over all labelled feature pixels (exact, mergeable)."""

    def __init__(self, num_classes: int = 19) -> None:
        self.num_classes = int(num_classes)
        self.count = np.zeros(self.num_classes, np.int64)
        self.sums = np.zeros((self.num_classes, 0), np.int64)
        self.gram = np.zeros((0, 0), np.int64)

    def config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def _update(self, outputs: Any, labels: torch.Tensor, ids: list[str]) -> None:
        f, y, _ = feature_rows(outputs, labels, ids)
        y = y.flatten()
        keep = valid_classes(y, self.num_classes)
        q = exact.quantise(feature_pixels(f)[keep])
        cls = y[keep]
        self._add(np.bincount(cls.cpu().numpy(), minlength=self.num_classes).astype(np.int64),
                  exact.class_sums(q, cls, self.num_classes), exact.gram_blocks(q))

    def _add(self, count: np.ndarray, sums: np.ndarray, gram: np.ndarray) -> None:
        if self.sums.shape[1] == 0:
            self.sums, self.gram = np.zeros_like(sums), np.zeros_like(gram)
        if sums.shape != self.sums.shape:
            raise ValueError(f"class_gaussians: features of dimension {sums.shape[1]} cannot merge into "
                             f"{self.sums.shape[1]}")
        self.count, self.sums, self.gram = self.count + count, self.sums + sums, self.gram + gram

    def _merge(self, other: ClassGaussians) -> None:
        if other.sums.shape[1]:
            self._add(other.count, other.sums, other.gram)

    def _state(self) -> dict[str, Any]:
        return {"count": self.count.copy(), "sums": self.sums.copy(), "gram": self.gram.copy()}

    def _load(self, state: Any) -> None:
        self.count = np.asarray(state["count"], np.int64)
        self.sums = np.asarray(state["sums"], np.int64).reshape(self.num_classes, -1)
        self.gram = np.asarray(state["gram"], np.int64)

    def means_cov(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(μ [C', D], Σ [D, D], present classes [C'])`` over the classes seen in the fit (float64)."""
        present = np.flatnonzero(self.count > 0)
        if self.sums.shape[1] == 0 or len(present) == 0:
            raise ValueError("class_gaussians: empty fit (no labelled training pixels)")
        n = self.count[present].astype(np.float64)
        mu = self.sums[present] / exact.SCALE / n[:, None]
        cov = (exact.combine_gram(self.gram) - (mu * n[:, None]).T @ mu) / n.sum()
        return mu, cov, present

    def whitening(self) -> tuple[np.ndarray, np.ndarray]:
        """``(W [D, r], μ W [C', r])`` with ``W Wᵀ = Σ⁺`` (eigenvectors of Σ over the square roots of the kept
        eigenvalues, ``pinvh``'s cut-off), so ``(f − μ_c)ᵀ Σ⁺ (f − μ_c) = ‖f W − μ_c W‖²``; cached."""
        return self.cached("whitening", self._whitening)

    def _whitening(self) -> tuple[np.ndarray, np.ndarray]:
        mu, cov, _ = self.means_cov()
        lam, vec = np.linalg.eigh((cov + cov.T) / 2)
        keep = lam > lam.max() * len(lam) * np.finfo(np.float64).eps
        w = vec[:, keep] / np.sqrt(lam[keep])
        return w, mu @ w


def min_sq_distance(y: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``min_c ‖y_i − centres_c‖²`` for ``y [N, r]`` (direct differences, in chunks of pixels)."""
    out = torch.empty(y.shape[0], dtype=y.dtype, device=y.device)
    for s in range(0, y.shape[0], PIXEL_CHUNK):
        d = y[s : s + PIXEL_CHUNK, None, :] - centres[None]
        out[s : s + PIXEL_CHUNK] = (d * d).sum(-1).amin(1)
    return out


@register_scorer("mahalanobis", space={}, reads="map", fit="class_gaussians", needs=("features",))
def mahalanobis(ctx: ScoreContext, temperature: float) -> torch.Tensor:
    """Min class-conditional Mahalanobis distance of each feature pixel."""
    f = ctx.features("mahalanobis")
    w, centres = ctx.fitted("mahalanobis").whitening()
    if w.shape[0] != f.shape[1]:
        raise ValueError(f"mahalanobis: the fit has {w.shape[0]}-dim features, the model {f.shape[1]}")
    y = feature_pixels(f) @ torch.as_tensor(w, dtype=torch.float32, device=f.device)
    d = min_sq_distance(y, torch.as_tensor(centres, dtype=torch.float32, device=f.device))
    b, _, h, wd = f.shape
    return ctx.to_size(d.reshape(b, h, wd))
