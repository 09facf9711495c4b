"""Losses against independent references: explicit per-pixel numpy loops, F.cross_entropy with manual masking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oodseg.losses import create_loss, list_losses, loss_space
from oodseg.outputs import MaskOutputs, PixelLogits

IGNORE, OUTLIER = 255, 254


# ----------------------------------------------------------------------------------------------- references
def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max()
    return z - m - math.log(np.exp(z - m).sum())


def ref_ce(logits: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Σ w_y·(−log p_y) / Σ w_y over pixels whose target is a class id (explicit loop)."""
    num = den = 0.0
    B, C, H, W = logits.shape
    for b in range(B):
        for i in range(H):
            for j in range(W):
                t = int(target[b, i, j])
                if t in (IGNORE, OUTLIER):
                    continue
                w = 1.0 if weights is None else float(weights[t])
                num += -w * _log_softmax(logits[b, :, i, j].astype(np.float64))[t]
                den += w
    return num / den if den else 0.0


def ref_sets(target: np.ndarray, outlier_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if outlier_mask is None:
        return (target != OUTLIER) & (target != IGNORE), target == OUTLIER
    return outlier_mask == 0, outlier_mask == 1


def ref_rba_pixels(L: np.ndarray):
    """``(b, i, j, s)`` for every pixel, with the RbA score s = −Σ_c tanh(L_c) summed one class at a time."""
    B, C, H, W = L.shape
    for b in range(B):
        for i in range(H):
            for j in range(W):
                yield b, i, j, -sum(math.tanh(float(L[b, c, i, j])) for c in range(C))


def ref_rba_terms(L: np.ndarray, target, tau_in, tau_out, outlier_mask=None) -> tuple[list[float], list[float]]:
    """Per-pixel squared-hinge values, s = −Σ_c tanh(L_c), split into (inlier, outlier) lists."""
    inl, out = ref_sets(target, outlier_mask)
    ins, outs = [], []
    for b, i, j, s in ref_rba_pixels(L):
        if inl[b, i, j]:
            ins.append(max(s - tau_in, 0.0) ** 2)
        if out[b, i, j]:
            outs.append(max(tau_out - s, 0.0) ** 2)
    return ins, outs


def ref_oe_hinge(L, target, tau_in, tau_out, outlier_mask=None) -> float:
    ins, outs = ref_rba_terms(L, target, tau_in, tau_out, outlier_mask)
    return 0.5 * ((np.mean(ins) if ins else 0.0) + (np.mean(outs) if outs else 0.0))


def ref_oe_bce(L, target, outlier_mask=None) -> float:
    inl, out = ref_sets(target, outlier_mask)
    vals = []
    for b, i, j, s in ref_rba_pixels(L):
        if out[b, i, j]:
            vals.append(np.logaddexp(0.0, -s))  # −log σ(s)
        elif inl[b, i, j]:
            vals.append(np.logaddexp(0.0, s))  # −log(1 − σ(s))
    return 0.5 * float(np.mean(vals)) if vals else 0.0


def ref_mask_class_scores(class_logits: np.ndarray, mask_logits: np.ndarray) -> np.ndarray:
    """L[c] = Σ_q softmax(class_logits_q)[c]·sigmoid(mask_logits_q), no-object column dropped after softmax."""
    e = np.exp(class_logits - class_logits.max(-1, keepdims=True))
    probs = (e / e.sum(-1, keepdims=True))[..., :-1]  # [N, Q, C]
    sig = 1.0 / (1.0 + np.exp(-mask_logits))  # [N, Q, H, W]
    N, Q, C = probs.shape
    L = np.zeros((N, C) + mask_logits.shape[2:])
    for n in range(N):
        for q in range(Q):
            for c in range(C):
                L[n, c] += probs[n, q, c] * sig[n, q]
    return L


# ----------------------------------------------------------------------------------------------- data
def make_batch(seed: int = 0, B: int = 2, C: int = 4, H: int = 5, W: int = 6, scale: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, C, (B, H, W), generator=g)
    r = torch.rand(B, H, W, generator=g)
    target[r < 0.15] = IGNORE
    target[(r >= 0.15) & (r < 0.4)] = OUTLIER
    return logits, target


def _f(x: torch.Tensor) -> float:
    return float(x.detach())


# ----------------------------------------------------------------------------------------------- registry
def test_registry_names_and_spaces_build_losses():
    assert {"ce", "oe", "logitnorm", "eim"} <= set(list_losses())
    for name in list_losses():
        space = loss_space(name)
        sample = {}
        for key, spec in space.items():
            if spec["type"] == "loguniform":
                assert 0 < spec["low"] < spec["high"]
                sample[key] = math.sqrt(spec["low"] * spec["high"])
            else:
                assert spec["type"] == "choice" and len(spec["values"]) > 1
                sample[key] = spec["values"][-1]
        create_loss(name, **sample)  # every space key is a constructor argument
    assert set(loss_space("oe")) == {"weight", "tau_in", "tau_out"}
    # the RbA thresholds live on the scale of the output kind: mask scores s = −Σ tanh(L), L ∈ [0, 1] → s ≤ 0;
    # per-pixel logits of 19 classes → s ∈ [−19, 19] with a confident inlier (one +, 18 − logits) near 17
    assert loss_space("oe", "mask") == loss_space("oe")
    assert max(loss_space("oe", "mask")["tau_out"]["values"]) <= 19 and max(loss_space("oe")["tau_in"]["values"]) <= 0
    pixel = loss_space("oe", "pixel")
    assert min(pixel["tau_out"]["values"]) > max(pixel["tau_in"]["values"]) > 1.0
    assert max(pixel["tau_out"]["values"]) < 19.0  # reachable: s < 19 for finite logits
    create_loss("oe", tau_in=pixel["tau_in"]["values"][0], tau_out=pixel["tau_out"]["values"][0])
    with pytest.raises(ValueError, match="output_kind"):
        loss_space("oe", "pixels")
    assert set(loss_space("logitnorm")) == {"temperature"}
    assert set(loss_space("eim")) == {"entropic_scale"}
    with pytest.raises(KeyError, match="unknown loss"):
        create_loss("nope")


# ----------------------------------------------------------------------------------------------- ce / logitnorm / eim
def test_ce_matches_masked_torch_and_numpy():
    logits, target = make_batch(1)
    got = create_loss("ce")(logits, target)
    assert got.ndim == 0
    keep = (target != IGNORE) & (target != OUTLIER)
    flat = logits.permute(0, 2, 3, 1)[keep]  # [P, C]
    assert _f(got) == pytest.approx(_f(F.cross_entropy(flat, target[keep])), rel=1e-10)
    assert _f(got) == pytest.approx(ref_ce(logits.numpy(), target.numpy()), rel=1e-10)


def test_ce_class_weights():
    logits, target = make_batch(2)
    w = np.array([0.5, 2.0, 1.0, 3.0])
    got = create_loss("ce", class_weights=w.tolist())(logits, target)
    assert _f(got) == pytest.approx(ref_ce(logits.numpy(), target.numpy(), w), rel=1e-10)
    with pytest.raises(ValueError, match="class_weights"):
        create_loss("ce", class_weights=[1.0, 1.0])(logits, target)


@pytest.mark.parametrize("tau", [0.04, 0.5, 1.0])
def test_logitnorm_matches_numpy(tau):
    logits, target = make_batch(3)
    z = logits.numpy()
    normed = z / (tau * (np.sqrt((z**2).sum(axis=1, keepdims=True)) + 1e-7))
    got = create_loss("logitnorm", temperature=tau)(logits, target)
    assert _f(got) == pytest.approx(ref_ce(normed, target.numpy()), rel=1e-9)


def test_logitnorm_public_api_float32():
    logits, target = make_batch(4)
    got = create_loss("logitnorm", temperature=0.5)(logits.float(), target)
    assert got.ndim == 0 and got.dtype == torch.float32
    z = logits.numpy()
    normed = z / (0.5 * (np.sqrt((z**2).sum(axis=1, keepdims=True)) + 1e-7))
    assert _f(got) == pytest.approx(ref_ce(normed, target.numpy()), rel=1e-5)


def test_half_precision_logits_are_upcast():
    logits, target = make_batch(6)
    got = create_loss("ce")(logits.bfloat16(), target)
    assert got.dtype == torch.float32
    want = ref_ce(logits.bfloat16().double().numpy(), target.numpy())  # same rounded inputs, float64 math
    assert _f(got) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("scale", [None, 3.0])
def test_eim_is_ce_of_scaled_logits(scale):
    logits, target = make_batch(5, scale=0.3)  # IsoMax+ logits are −|s|·distance: small, non-positive
    logits = -logits.abs()
    loss = create_loss("eim") if scale is None else create_loss("eim", entropic_scale=scale)
    e_s = 10.0 if scale is None else scale
    assert _f(loss(logits, target)) == pytest.approx(ref_ce(e_s * logits.numpy(), target.numpy()), rel=1e-10)


# ----------------------------------------------------------------------------------------------- oe
def _hinge_case():
    """Logits where each relu is active on some pixels and inactive on others (τ_in = 0, τ_out = 1, C = 3).

    L_c ≈ +2 gives s ≈ −2.9 (inlier hinge off, outlier hinge on); L_c ≈ −2 gives s ≈ +2.9 (inlier on, outlier off).
    """
    g = torch.Generator().manual_seed(7)
    B, C, H, W = 2, 3, 4, 5
    sign = torch.where(torch.rand(B, 1, H, W, generator=g) < 0.5, 1.0, -1.0).double()
    logits = 2.0 * sign + 0.3 * torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    target = torch.randint(0, C, (B, H, W), generator=g)
    r = torch.rand(B, H, W, generator=g)
    target[r < 0.1] = IGNORE
    target[(r >= 0.1) & (r < 0.5)] = OUTLIER
    return logits, target


def test_oe_squared_hinge_matches_numpy_with_active_and_inactive_relu():
    logits, target = _hinge_case()
    L, t = logits.numpy(), target.numpy()
    ins, outs = ref_rba_terms(L, t, 0.0, 1.0)
    assert 0 < sum(v > 0 for v in ins) < len(ins)  # inlier relu both active and inactive
    assert 0 < sum(v > 0 for v in outs) < len(outs)  # outlier relu both active and inactive
    for weight in (1.0, 0.3):
        got = create_loss("oe", weight=weight, tau_in=0.0, tau_out=1.0)(logits, target)
        want = ref_ce(L, t) + weight * ref_oe_hinge(L, t, 0.0, 1.0)
        assert _f(got) == pytest.approx(want, rel=1e-10)


def test_oe_defaults_are_rba_checkpoint_values():
    logits, target = _hinge_case()
    L, t = logits.numpy(), target.numpy()
    got = create_loss("oe")(logits, target)
    assert _f(got) == pytest.approx(ref_ce(L, t) + ref_oe_hinge(L, t, 0.0, 5.0), rel=1e-10)


def test_oe_bce_variant_matches_numpy():
    logits, target = _hinge_case()
    L, t = logits.numpy(), target.numpy()
    got = create_loss("oe", variant="bce", weight=2.0)(logits, target)
    assert _f(got) == pytest.approx(ref_ce(L, t) + 2.0 * ref_oe_bce(L, t), rel=1e-10)
    with pytest.raises(ValueError, match="variant"):
        create_loss("oe", variant="hinge")


def test_oe_explicit_outlier_mask_defines_sets():
    logits, target = _hinge_case()
    # Outlier mask with its own ignore region: some 254 pixels ignored (255) for the OE term.
    mask = (target == OUTLIER).long()
    mask[target == IGNORE] = IGNORE
    mask[:, 0, :] = torch.where(target[:, 0, :] == OUTLIER, IGNORE, mask[:, 0, :])
    L, t, m = logits.numpy(), target.numpy(), mask.numpy()
    assert ref_oe_hinge(L, t, -1.0, 2.0, m) != pytest.approx(ref_oe_hinge(L, t, -1.0, 2.0))
    loss = create_loss("oe", tau_in=-1.0, tau_out=2.0)
    for dtype in (torch.int64, torch.uint8):  # the trainer's collate passes a uint8 mask
        got = loss(logits, target, outlier_mask=mask.to(dtype))
        assert _f(got) == pytest.approx(ref_ce(L, t) + ref_oe_hinge(L, t, -1.0, 2.0, m), rel=1e-10)


@pytest.mark.parametrize("variant", ["squared_hinge", "bce"])
def test_oe_empty_sets_are_zero_not_nan(variant):
    logits, target = _hinge_case()
    L = logits.numpy()
    loss = create_loss("oe", tau_in=0.0, tau_out=1.0, variant=variant)
    no_outliers = target.clone()
    no_outliers[no_outliers == OUTLIER] = 0
    oe = ref_oe_bce if variant == "bce" else lambda L_, t_: ref_oe_hinge(L_, t_, 0.0, 1.0)
    want = ref_ce(L, no_outliers.numpy()) + oe(L, no_outliers.numpy())
    assert _f(loss(logits, no_outliers)) == pytest.approx(want, rel=1e-10)

    only_outliers = torch.where(target == IGNORE, IGNORE, OUTLIER)  # no inlier → CE and inlier term are 0
    z = logits.clone().requires_grad_(True)
    value = loss(z, only_outliers)
    assert _f(value) == pytest.approx(oe(L, only_outliers.numpy()), rel=1e-10) and _f(value) > 0
    value.backward()
    assert torch.isfinite(z.grad).all()

    z = logits.clone().requires_grad_(True)
    value = loss(z, torch.full_like(target, IGNORE))
    value.backward()
    assert _f(value) == 0.0 and torch.isfinite(z.grad).all() and not z.grad.any()


# ----------------------------------------------------------------------------------------------- shared behaviour
@pytest.mark.parametrize("name", ["ce", "logitnorm", "eim"])
def test_ignored_pixels_do_not_matter(name):
    logits, target = make_batch(8)
    loss = create_loss(name)
    base = _f(loss(logits, target))
    ignored = ((target == IGNORE) | (target == OUTLIER)).unsqueeze(1).expand_as(logits)
    assert ignored.any()
    perturbed = logits + 5.0 * torch.randn_like(logits) * ignored
    assert _f(loss(perturbed, target)) == pytest.approx(base, rel=1e-12)
    # while labelled pixels do matter
    assert _f(loss(logits + 5.0 * torch.randn_like(logits) * ~ignored, target)) != pytest.approx(base)


def test_oe_uses_254_but_not_255_pixels():
    logits, target = _hinge_case()
    loss = create_loss("oe", tau_in=0.0, tau_out=1.0)
    base = _f(loss(logits, target))
    void = (target == IGNORE).unsqueeze(1).expand_as(logits)
    outl = (target == OUTLIER).unsqueeze(1).expand_as(logits)
    assert _f(loss(logits + 5.0 * void * torch.randn_like(logits), target)) == pytest.approx(base, rel=1e-12)
    assert _f(loss(logits + 5.0 * outl, target)) != pytest.approx(base)  # all tanh → 1: s drops, hinge grows


@pytest.mark.parametrize("name", ["ce", "oe", "energy_oe", "logitnorm", "eim"])
def test_low_resolution_logits_are_upsampled_bilinearly(name):
    logits, target = make_batch(9, H=8, W=10)
    low = torch.randn(2, 4, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    up = F.interpolate(low, size=(8, 10), mode="bilinear", align_corners=False)
    loss = create_loss(name)
    want = _f(loss(up, target))
    assert _f(loss(low, target)) == pytest.approx(want, rel=1e-12)
    assert _f(loss(PixelLogits(low, size=(8, 10)), target)) == pytest.approx(want, rel=1e-12)
    nearest = F.interpolate(low, size=(8, 10), mode="nearest")
    assert _f(loss(nearest, target)) != pytest.approx(want)  # the check can tell resampling modes apart


@pytest.mark.parametrize("name", ["ce", "oe", "energy_oe", "logitnorm", "eim"])
def test_gradients_flow_only_where_labelled(name):
    logits, target = make_batch(11)
    z = logits.float().requires_grad_(True)
    create_loss(name)(z, target).backward()
    assert torch.isfinite(z.grad).all()
    void = (target == IGNORE).unsqueeze(1).expand_as(z)
    outlier = (target == OUTLIER).unsqueeze(1).expand_as(z)
    labelled = ~void & ~outlier
    assert not z.grad[void].any()
    assert z.grad[labelled].abs().sum() > 0
    assert bool(z.grad[outlier].any()) == (name in ("oe", "energy_oe"))


def test_bad_inputs_raise_clear_errors():
    logits, target = make_batch(12)
    ce = create_loss("ce")
    with pytest.raises(ValueError, match="target must be"):
        ce(logits, target[0])
    with pytest.raises(ValueError, match="outside 0..3"):
        ce(logits, torch.where(target == 0, 7, target))
    with pytest.raises(ValueError, match="outlier_mask shape"):
        create_loss("oe")(logits, target, outlier_mask=target[:, :2])
    with pytest.raises(TypeError, match="PixelLogits or MaskOutputs"):
        ce(logits.numpy(), target)
    masks = MaskOutputs(torch.randn(2, 3, 5), torch.randn(2, 3, 5, 6))
    for name in ("ce", "logitnorm", "eim"):
        with pytest.raises(TypeError, match="MaskOutputs"):
            create_loss(name)(masks, target)
    for bad in ({"temperature": 0.0}, {"temperature": -1.0}):
        with pytest.raises(ValueError, match="temperature"):
            create_loss("logitnorm", **bad)


# ----------------------------------------------------------------------------------------------- mask outputs
def _mask_outputs(seed: int, N=2, Q=5, C=3, h=4, w=5):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(N, Q, C + 1, generator=g, dtype=torch.float64) * 2,
        torch.randn(N, Q, h, w, generator=g, dtype=torch.float64) * 2,
    )


@pytest.mark.parametrize("variant", ["squared_hinge", "bce"])
def test_oe_on_mask_outputs_is_weighted_oe_term_of_reference_combination(variant):
    cls, msk = _mask_outputs(13)
    _, target = _hinge_case()
    L = ref_mask_class_scores(cls.numpy(), msk.numpy())
    t = target.numpy()
    loss = create_loss("oe", weight=0.7, tau_in=-1.5, tau_out=1.0, variant=variant)
    got = loss(MaskOutputs(cls, msk), target)
    oe = ref_oe_bce(L, t) if variant == "bce" else ref_oe_hinge(L, t, -1.5, 1.0)
    assert _f(got) == pytest.approx(0.7 * oe, rel=1e-5)  # no CE term for mask outputs


def test_oe_on_low_resolution_mask_outputs_and_gradients():
    cls, msk = _mask_outputs(14, h=2, w=3)
    target = make_batch(15, C=3, H=4, W=6)[1]
    # the reference order: mask logits upsampled to the target before the sigmoid and the query combination
    msk_up = F.interpolate(msk, size=(4, 6), mode="bilinear", align_corners=False)
    L = ref_mask_class_scores(cls.numpy(), msk_up.numpy())
    cls_p, msk_p = cls.clone().requires_grad_(True), msk.clone().requires_grad_(True)
    got = create_loss("oe", tau_in=-1.5, tau_out=1.0)(MaskOutputs(cls_p, msk_p), target)
    assert _f(got) == pytest.approx(ref_oe_hinge(L, target.numpy(), -1.5, 1.0), rel=1e-5)
    got.backward()
    for p in (cls_p, msk_p):
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def _rba(L: torch.Tensor) -> torch.Tensor:
    return -torch.tanh(L).sum(1)


def test_oe_step_moves_pixel_scores_the_right_way():
    """One SGD step on per-pixel logits: s falls on hinge-active inliers, rises on hinge-active outliers and stays
    put on hinge-inactive outliers and void pixels (weight 10 so the OE term dominates CE on inliers)."""
    logits, target = _hinge_case()
    tau_in, tau_out = 0.0, 1.0
    z = logits.clone().requires_grad_(True)
    create_loss("oe", weight=10.0, tau_in=tau_in, tau_out=tau_out)(z, target).backward()
    with torch.no_grad():
        s0, s1 = _rba(logits), _rba(logits - 0.05 * z.grad)
    inl, out = (target != IGNORE) & (target != OUTLIER), target == OUTLIER
    active_in, active_out = inl & (s0 > tau_in + 0.5), out & (s0 < tau_out)
    assert active_in.sum() >= 3 and active_out.sum() >= 3 and (out & ~active_out).sum() >= 3
    assert (s1[active_in] < s0[active_in]).all()
    assert (s1[active_out] > s0[active_out]).all()
    assert torch.equal(s1[out & ~active_out], s0[out & ~active_out])
    assert torch.equal(s1[target == IGNORE], s0[target == IGNORE])


def test_oe_step_moves_mask_scores_the_right_way():
    """A step on the (per-pixel) mask logits of MaskOutputs, class logits fixed: each pixel's s moves towards its side
    of the hinge; with τ_in = −3 and τ_out = 0 every labelled pixel is active here (asserted: L ≥ 0 so s ≤ 0)."""
    cls, msk = _mask_outputs(17)
    _, target = _hinge_case()
    msk_p = msk.clone().requires_grad_(True)
    create_loss("oe", tau_in=-3.0, tau_out=0.0)(MaskOutputs(cls, msk_p), target).backward()
    s0 = _rba(torch.from_numpy(ref_mask_class_scores(cls.numpy(), msk.numpy())))
    s1 = _rba(torch.from_numpy(ref_mask_class_scores(cls.numpy(), (msk - 0.5 * msk_p.grad).numpy())))
    inl, out = (target != IGNORE) & (target != OUTLIER), target == OUTLIER
    assert (s0[inl] > -3.0).all() and (s0[out] < 0.0).all()
    assert (s1[inl] < s0[inl]).all()
    assert (s1[out] > s0[out]).all()
    assert torch.allclose(s1[target == IGNORE], s0[target == IGNORE], rtol=0, atol=1e-12)
