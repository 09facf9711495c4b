"""``energy_oe``: outlier exposure on the free energy (Liu et al., "Energy-based Out-of-distribution Detection",
NeurIPS 2020, eq. 6; github.com/wetliu/energy_ood), the OE objective of the energy score the benchmark ranks by.

With the energy ``E = −logsumexp_c(L_c)`` of the per-pixel class scores ``L`` (logits, or for ``MaskOutputs`` the
class scores of ``oodseg.scoring.pixel_class_scores``; higher = more anomalous, the ``energy`` scorer at T = 1)::

    OE = mean_in relu(E − m_in)² + mean_out relu(m_out − E)²

Inlier pixels are pushed below ``m_in`` and pasted-outlier pixels above ``m_out``. Total: per-pixel logits →
``CE(inlier pixels) + weight·OE``; ``MaskOutputs`` → ``weight·OE`` (the model adds its own loss).
The paper's CIFAR margins (m_in −25, m_out −7, weight 0.1) are for its logit scale; the defaults here were set on
the former demo ERFNet's (energy quartiles on the synthetic RoadAnomaly21: inliers −6.4 / −5.7 / −4.8, anomalies
−5.0 / −4.4 / −3.9; the current demo's: −8.3 / −7.1 / −5.7 and −6.0 / −5.1 / −4.6): inliers above −5, outliers
below −2 are penalised. Mask models' class scores lie in [0, 1], which
confines E to [−ln C − 1, −ln C]; their margins (``kind_space["mask"]``) sit inside that range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from oodseg.losses.base import LossOutputs, pixel_batch, register_loss
from oodseg.losses.functional import masked_cross_entropy, masked_mean


def energy_hinge(energy: torch.Tensor, inlier: torch.Tensor, outlier: torch.Tensor, m_in: float,
                 m_out: float) -> torch.Tensor:
    """``mean_in relu(E − m_in)² + mean_out relu(m_out − E)²``; an empty pixel set contributes 0.

    Args:
        energy: per-pixel free energy ``E = −logsumexp_c(L_c)`` ``[B, H, W]`` (higher = more anomalous).
        inlier, outlier: bool ``[B, H, W]`` inlier / pasted-outlier pixels (:func:`~oodseg.losses.base.pixel_batch`).
        m_in, m_out: energy margins (``m_in < m_out``): inliers above ``m_in``, outliers below ``m_out`` are penalised.
    """
    return masked_mean(F.relu(energy - m_in).square(), inlier) + masked_mean(F.relu(m_out - energy).square(), outlier)


@register_loss(
    "energy_oe",
    space={
        "weight": {"type": "loguniform", "low": 0.01, "high": 1.0},
        "m_in": {"type": "choice", "values": [-7.0, -6.0, -5.0]},
        "m_out": {"type": "choice", "values": [-3.0, -2.0, -1.0]},
    },
    # mask models: L ∈ [0, 1], so E ∈ [−ln C − 1, −ln C] = [−3.94, −2.94] for 19 classes
    kind_space={"mask": {"m_in": {"type": "choice", "values": [-3.8, -3.6]},
                         "m_out": {"type": "choice", "values": [-3.2, -3.0]}}},
)
class EnergyOutlierExposureLoss(nn.Module):
    """Energy-bounded OE: ``CE(inliers) + weight · OE`` on per-pixel logits, ``weight · OE`` on mask outputs, with
    ``OE = mean_in relu(E − m_in)² + mean_out relu(m_out − E)²`` of the free energy ``E``."""

    def __init__(self, weight: float = 0.1, m_in: float = -5.0, m_out: float = -2.0) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"energy_oe weight must be >= 0, got {weight}")
        if m_in >= m_out:
            raise ValueError(f"energy_oe needs m_in < m_out, got m_in={m_in}, m_out={m_out}")
        self.weight, self.m_in, self.m_out = float(weight), float(m_in), float(m_out)

    def forward(self, outputs: LossOutputs, target: torch.Tensor,
                outlier_mask: torch.Tensor | None = None) -> torch.Tensor:
        b = pixel_batch(outputs, target, outlier_mask)
        energy = -torch.logsumexp(b.scores, dim=1)
        oe = self.weight * energy_hinge(energy, b.inlier, b.outlier, self.m_in, self.m_out)
        return oe if b.from_masks else masked_cross_entropy(b.scores, b.target, b.labeled) + oe

    def extra_repr(self) -> str:
        return f"weight={self.weight}, m_in={self.m_in}, m_out={self.m_out}"
