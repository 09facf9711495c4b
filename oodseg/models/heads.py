"""Reusable per-pixel classification heads.

``IsoMaxPlusHead`` — Enhanced Isotropy Maximization (IsoMax+), Macêdo & Ludermir 2021, "Enhanced Isotropy
Maximization Loss: Seamless and High-Performance Out-of-Distribution Detection Simply Replacing the SoftMax Loss"
(arXiv:2105.14399; reference code dlmacedo/entropic-out-of-distribution-detection, ``losses/isomaxplus.py``):

    logits_c(x) = −|s| · ‖ f̂(x) − p̂_c ‖₂,   f̂ = f/‖f‖, p̂_c = p_c/‖p_c‖

with learnable prototypes ``p_c`` (init N(0, 1) as in the reference, or ``init="identity"``: ``p_c = e_c``) and a
learnable distance scale ``s`` (init 1). Applied as a 1×1 per-pixel layer on a feature map ``[B, D, H, W]``. The
identity init is for a head stacked on class logits ``z`` (ERFNet): ``‖ẑ − e_c‖² = 2 − 2·z_c/‖z‖``, so the
untrained head already predicts ``argmax_c z_c`` and fine-tuning starts from the base model's segmentation. The matching loss (entropic scale on the distances) lives in
``oodseg.losses``; this module only produces the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class IsoMaxPlusHead(nn.Module):
    """Per-pixel IsoMax+ logits ``[B, C, H, W]`` = ``−|s|·‖f̂ − p̂_c‖₂`` from features ``[B, D, H, W]``: negative
    scaled distances of the L2-normalised features to learned normalised prototypes (Macêdo & Ludermir 2021)."""

    def __init__(self, in_channels: int, num_classes: int, init: str = "normal") -> None:
        super().__init__()
        if init not in ("normal", "identity"):
            raise ValueError(f"IsoMax+ prototype init must be 'normal' or 'identity', got {init!r}")
        if init == "identity" and in_channels < num_classes:
            raise ValueError(f"identity prototypes need in_channels >= num_classes, got {in_channels} < {num_classes}")
        self.prototypes = nn.Parameter(torch.empty(num_classes, in_channels))
        self.distance_scale = nn.Parameter(torch.empty(1))
        if init == "identity":
            with torch.no_grad():
                self.prototypes.copy_(torch.eye(num_classes, in_channels))
        else:
            nn.init.normal_(self.prototypes, mean=0.0, std=1.0)
        nn.init.constant_(self.distance_scale, 1.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, d, h, w = features.shape
        f = F.normalize(features.float(), dim=1).permute(0, 2, 3, 1).reshape(b, h * w, d)
        p = F.normalize(self.prototypes.float(), dim=1).unsqueeze(0).expand(b, -1, -1)
        # direct differences (not the ‖a‖²+‖b‖²−2ab expansion): exact, and gradient-safe at zero distance
        dist = torch.cdist(f, p, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
        logits = -self.distance_scale.abs().float() * dist
        return logits.reshape(b, h, w, -1).permute(0, 3, 1, 2)
