"""Functional loss kernels on per-pixel tensors (no registry, no output-kind handling).

:func:`mask_dice` (per-mask Dice of mask logits) is shared by SAM's mask losses and TDOS's point losses.

All reductions are means over a boolean pixel set; an empty set gives ``0`` (times the input, so the graph and
the device are kept) instead of the ``0/0 = NaN`` of a plain mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask``; ``0`` when ``mask`` is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def masked_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Pixel cross-entropy averaged over ``mask``: ``Σ_i w_{y_i}·(−log softmax(z_i)[y_i]) / Σ_i w_{y_i}``.

    Same weighted mean as ``torch.nn.functional.cross_entropy(weight=..., ignore_index=...)``, but an empty mask
    gives 0 instead of NaN. ``logits`` ``[B, C, H, W]``, ``target`` ``[B, H, W]`` (any value outside ``mask``).
    """
    safe_target = torch.where(mask, target, torch.zeros_like(target))
    nll = F.cross_entropy(logits, safe_target, reduction="none")
    if weight is None:
        return masked_mean(nll, mask)
    w = weight.to(logits.dtype)[safe_target] * mask.to(logits.dtype)
    return (nll * w).sum() / w.sum().clamp_min(torch.finfo(logits.dtype).tiny)


def rba_squared_hinge(
    score: torch.Tensor, inlier: torch.Tensor, outlier: torch.Tensor, tau_in: float, tau_out: float
) -> torch.Tensor:
    """RbA outlier loss ``½·[mean_{inlier} relu(s − τ_in)² + mean_{outlier} relu(τ_out − s)²]`` for RbA scores
    ``s = −Σ_c tanh(L_c)`` ``[B, H, W]`` (higher = more anomalous) and boolean pixel sets of the same shape.

    Inlier scores are pushed below ``τ_in`` and outlier scores above ``τ_out``; an empty set contributes 0.
    (The reference implementation drops the ½ when a batch has no outlier pixel; here it is always applied so the
    loss scale does not depend on the batch composition.)

    Args:
        inlier, outlier: bool ``[B, H, W]`` inlier / outlier pixels (ignore pixels in neither).
        tau_in, tau_out: margins in the units of ``s`` (RbA's released COCO-OE checkpoint: 0 and 5).
    """
    inlier_term = masked_mean(F.relu(score - tau_in).square(), inlier)
    outlier_term = masked_mean(F.relu(tau_out - score).square(), outlier)
    return 0.5 * (inlier_term + outlier_term)


def rba_bce(score: torch.Tensor, inlier: torch.Tensor, outlier: torch.Tensor) -> torch.Tensor:
    """``½·mean_{inlier ∪ outlier} BCE(sigmoid(s), 1[outlier])`` (the RbA repo's ``binary_cross_entropy`` option).

    Unlike the reference, which also counts ignore pixels as inliers, only labelled pixels (mask 0/1) enter.
    """
    valid = inlier | outlier
    bce = F.binary_cross_entropy_with_logits(score, outlier.to(score.dtype), reduction="none")
    return 0.5 * masked_mean(bce, valid)


def logit_normalize(logits: torch.Tensor, temperature: float, eps: float = 1e-7) -> torch.Tensor:
    """LogitNorm ``z / (τ·(‖z‖₂ + eps))`` with the norm over the class dim 1.

    Wei et al., "Mitigating Neural Network Overconfidence with Logit Normalization", ICML 2022
    (github.com/hongxin001/logitnorm_ood; ``eps = 1e-7`` as there).
    """
    norms = torch.linalg.vector_norm(logits, ord=2, dim=1, keepdim=True)
    return logits / (temperature * (norms + eps))


def mask_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask Dice loss ``[K]`` of logits ``[K, ...]``: ``1 − (2Σpt + 1)/(Σp + Σt + 1)``, p = sigmoid(logits) (the
    "naive" Dice of SAOM's ``misc.py calculate_dice_loss`` before its sum over masks, and of Mask2Former's point
    loss)."""
    p, t = logits.sigmoid().flatten(1), targets.float().flatten(1)
    return 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
