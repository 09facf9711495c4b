"""``energy_blur``: S2M's anomaly-score generator (Zhao et al., "Segment Every Out-of-Distribution Object", CVPR 2024;
``tools/inference.py``, ``compute_anomaly_score(mode='energy')``): the free energy over the in-distribution logits,
``−T · logsumexp(L / T)``, then a Gaussian blur with kernel 7 and σ = 1 (torchvision's ``GaussianBlur``, reflect
padding), on the label-size map. The same as ``create_scorer("energy", blur=(7, 1.0))``, registered under its own
name so results tell it apart.
"""

from __future__ import annotations

import torch

from oodseg.scoring.scorers import energy, register_scorer

S2M_BLUR = (7, 1.0)


@register_scorer("energy_blur", blur=S2M_BLUR, uses=("logsumexp",))
def energy_blur(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Free energy; the registration's ``blur`` smooths the finished map."""
    return energy(z, temperature)
