"""``energy_oe`` (energy-bounded outlier exposure, Liu et al. NeurIPS 2020) against an explicit per-pixel loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oodseg.losses import create_loss, loss_space
from oodseg.outputs import MaskOutputs

IGNORE, OUTLIER = 255, 254


def _logsumexp(v: list[float]) -> float:
    m = max(v)
    return m + math.log(sum(math.exp(x - m) for x in v))


def ref_energy_oe(L: np.ndarray, target: np.ndarray, weight: float, m_in: float, m_out: float,
                  with_ce: bool = True) -> tuple[float, list[float], list[float]]:
    """``CE + weight·(mean_in relu(E − m_in)² + mean_out relu(m_out − E)²)``, ``E = −log Σ_c exp(L_c)``, one pixel
    at a time; also returns the per-pixel hinge values (inlier, outlier)."""
    B, C, H, W = L.shape
    ce, ins, outs = [], [], []
    for b in range(B):
        for i in range(H):
            for j in range(W):
                t = int(target[b, i, j])
                z = [float(L[b, c, i, j]) for c in range(C)]
                e = -_logsumexp(z)
                if t == OUTLIER:
                    outs.append(max(m_out - e, 0.0) ** 2)
                elif t != IGNORE:
                    ins.append(max(e - m_in, 0.0) ** 2)
                    ce.append(_logsumexp(z) - z[t])
    term = (np.mean(ins) if ins else 0.0) + (np.mean(outs) if outs else 0.0)
    return (np.mean(ce) if with_ce and ce else 0.0) + weight * term, ins, outs


def _case(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64) * 2.0
    target = torch.randint(0, 4, (2, 5, 6), generator=g)
    r = torch.rand(2, 5, 6, generator=g)
    target[r < 0.15] = IGNORE
    target[(r >= 0.15) & (r < 0.45)] = OUTLIER
    return logits, target


def test_matches_reference_with_active_and_inactive_hinges():
    logits, target = _case()
    L, t = logits.numpy(), target.numpy()
    m_in, m_out = -3.5, -2.5  # E = −logsumexp over 4 classes of N(0, 2²) logits: about −5.5 … −0.5 here
    _, ins, outs = ref_energy_oe(L, t, 1.0, m_in, m_out)
    assert 0 < sum(v > 0 for v in ins) < len(ins) and 0 < sum(v > 0 for v in outs) < len(outs)
    for weight in (1.0, 0.3):
        got = create_loss("energy_oe", weight=weight, m_in=m_in, m_out=m_out)(logits, target)
        assert float(got) == pytest.approx(ref_energy_oe(L, t, weight, m_in, m_out)[0], rel=1e-10)


def test_mask_outputs_give_the_weighted_term_only():
    g = torch.Generator().manual_seed(5)
    cls, msk = torch.randn(2, 3, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 5, 6, generator=g,
                                                                                     dtype=torch.float64)
    _, target = _case()
    # class scores L[c] = Σ_q softmax(cls_q)[c]·sigmoid(mask_q), the no-object column dropped after the softmax
    probs = torch.softmax(cls, -1)[..., :-1]
    L = torch.einsum("nqc,nqhw->nchw", probs, torch.sigmoid(msk)).numpy()
    want, _, _ = ref_energy_oe(L, target.numpy(), 0.7, -1.6, -1.0, with_ce=False)
    got = create_loss("energy_oe", weight=0.7, m_in=-1.6, m_out=-1.0)(MaskOutputs(cls, msk), target)
    assert want > 0 and float(got) == pytest.approx(want, rel=1e-6)  # the scoring layer combines in float32


def test_one_step_moves_energy_the_right_way():
    """A gradient step lowers E on hinge-active inliers, raises it on hinge-active outliers and leaves void pixels
    and hinge-inactive outliers alone (weight 10 so the hinge dominates CE on inliers)."""
    logits, target = _case(7)
    m_in, m_out = -3.5, -2.5
    z = logits.clone().requires_grad_(True)
    create_loss("energy_oe", weight=10.0, m_in=m_in, m_out=m_out)(z, target).backward()
    with torch.no_grad():
        e0, e1 = -torch.logsumexp(logits, 1), -torch.logsumexp(logits - 0.05 * z.grad, 1)
    inl, out = (target != IGNORE) & (target != OUTLIER), target == OUTLIER
    active_in, active_out = inl & (e0 > m_in + 0.3), out & (e0 < m_out)
    assert active_in.sum() >= 3 and active_out.sum() >= 3 and (out & ~active_out).sum() >= 3
    assert (e1[active_in] < e0[active_in]).all() and (e1[active_out] > e0[active_out]).all()
    assert torch.equal(e1[out & ~active_out], e0[out & ~active_out])
    assert torch.equal(e1[target == IGNORE], e0[target == IGNORE])


def test_space_and_bad_settings():
    space = loss_space("energy_oe")
    assert set(space) == {"weight", "m_in", "m_out"}
    assert max(space["m_in"]["values"]) < min(space["m_out"]["values"])  # every sample is a valid loss
    with pytest.raises(ValueError, match="m_in < m_out"):
        create_loss("energy_oe", m_in=-1.0, m_out=-2.0)
    with pytest.raises(ValueError, match="weight must be >= 0"):
        create_loss("energy_oe", weight=-0.1)


def test_mask_space_lies_in_the_reachable_energy_range():
    """Mask class scores L ∈ [0, 1] bound E = −logsumexp(L) to [−ln C − 1, −ln C]; margins outside it would make
    one hinge always or never active."""
    lo, hi = -math.log(19) - 1, -math.log(19)
    space = loss_space("energy_oe", "mask")
    for key in ("m_in", "m_out"):
        assert all(lo < v < hi for v in space[key]["values"]), key
    assert max(space["m_in"]["values"]) < min(space["m_out"]["values"])
