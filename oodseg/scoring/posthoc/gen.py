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


@register_scorer("gen", space=GEN_SPACE, uses=("sumexp", "below", "exp_below", "rest"))
def gen(z: torch.Tensor, temperature: float, gamma: float = 0.1, m: int = 100) -> torch.Tensor:
    """``Σ_{top-M} (p (1 − p))^γ`` of ``p = softmax(z) = e / S`` from the block's shared reductions.

    Off the top class ``p (1 − p)`` is formed directly; at a maximal class ``p = 1 / S`` and ``1 − p = rest / S``,
    the mass of the other classes (``1 − p`` in float32 loses the digits that matter as ``p → 1``). ``x^γ`` is
    :func:`power_`."""
    st = stats(z)
    s = st.sumexp().unsqueeze(1)
    top = torch.rsub(st.below(), 1.0)  # 1 at the maxima, 0 elsewhere
    p = st.exp_below().div(s)  # softmax off the maxima, 0 at them
    at_max = st.rest().unsqueeze(1).div(s).div_(s)  # p (1 − p) at a maximum: (1 / S) · (rest / S)
    top_m = m < z.shape[1]  # only the M largest probabilities count
    # p (1 − p) at every class, in p's place when p is not read again
    x = (torch.addcmul(p, p, p, value=-1.0) if top_m else p.addcmul_(p, p, value=-1.0)).addcmul_(top, at_max)
    if top_m:
        x = x.gather(1, p.addcmul_(top, s.reciprocal()).topk(int(m), dim=1).indices)
    return power_(x, gamma).sum(dim=1)


def power_(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """``x^γ`` in place for ``x ≥ 0``, ``γ > 0``, as ``2^(γ·log2 x)`` (``0^γ = 0``): within 4e-7 relative of ``pow``,
    and on the CPU ~1.8× faster than its vectorised kernel for ``x > 0`` (GEN's cost over a 19-class map is mostly
    this); in place, as each fresh [C, P] result would push the block's working set out of the L2 cache."""
    return x.log2_().mul_(gamma).exp2_()
