"""``gen``: Generalized ENtropy (Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution
Detection", CVPR 2023; OpenOOD's ``gen_postprocessor``).

``G_γ(p) = Σ_{j ∈ top-M} p_j^γ (1 − p_j)^γ`` over the ``M`` largest softmax probabilities ``p = softmax(z)``
(``M`` larger than the class count: all classes); the reference's confidence is ``−G``, so the anomaly score is
``G``. Defaults γ = 0.1, M = 100 (the reference's; every class of a 19-class model).
"""

from __future__ import annotations

import torch

from oodseg.scoring.context import stats
from oodseg.scoring.scorers import TEMPERATURE_SPACE, register_scorer

GEN_SPACE = {**TEMPERATURE_SPACE, "gamma": {"type": "loguniform", "low": 0.01, "high": 1.0},
             "m": {"type": "choice", "values": [1, 3, 5, 10, 19]}}


@register_scorer("gen", space=GEN_SPACE)
def gen(z: torch.Tensor, temperature: float, gamma: float = 0.1, m: int = 100) -> torch.Tensor:
    """``Σ_{top-M} p^γ (1 − p)^γ = Σ (p (1 − p))^γ`` of ``p = softmax(z) = e / S`` (the block's shared
    reductions). At the top class ``1 − p = rest / S``, the mass of the other classes (``1 − p`` in float32 loses the
    digits that matter as ``p → 1``); ``below`` selects between the two exactly (one term is 0)."""
    st = stats(z)
    s = st.sumexp().unsqueeze(1)
    p = st.exp() / s
    below = st.below()
    q = (1.0 - p).mul_(below).add_((1.0 - below).mul_(st.rest().unsqueeze(1) / s))
    top = p.topk(int(m), dim=1).indices if m < p.shape[1] else None  # before p is overwritten by the product
    g = p.mul_(q).pow_(gamma)
    return (g if top is None else g.gather(1, top)).sum(dim=1)
