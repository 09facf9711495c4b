"""Post-hoc scorers (GEN, S2M's blurred energy, SML, Mahalanobis, kNN, ReAct, ODIN) against independent
transcriptions of their reference code's formulas (numpy / scipy / sklearn / torchvision, float64), ≤ 1e-5.

References (facts read, not code copied): GEN — OpenOOD ``gen_postprocessor``; SML — shjung13/Standardized-max-logits
(``calculate_statistics.py``, ``network/deepv3.py``); Mahalanobis — OpenOOD ``mds_tools`` (sklearn
``EmpiricalCovariance`` on class-centred features); kNN — deeplearning-wisc/knn-ood (normalised features, faiss
``IndexFlatL2`` squared distances); ReAct — deeplearning-wisc/react (percentile of the flattened activations,
energy of the clipped logits); ODIN — OpenOOD ``odin_postprocessor``; S2M — ``compute_anomaly_score(mode='energy')``.
Features and logits are multiples of 2^-10, so the fit states' rounding (``posthoc.exact``) changes nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.covariance import EmpiricalCovariance

from oodseg.models import create_model
from oodseg.outputs import PixelLogits
from oodseg.scoring import create_fit, create_scorer, score_many

TOL = {"rtol": 1e-5, "atol": 1e-5}


def grid(shape: tuple[int, ...], seed: int, scale: float = 3.0, relu: bool = False) -> torch.Tensor:
    """Random values rounded to multiples of 2^-10 (exactly representable by the fit states)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    x = torch.round(x * 1024) / 1024
    return (x.clamp(min=0) if relu else x).float()


def np_softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_energy(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    m = (z / t).max(1, keepdims=True)
    return -t * (np.log(np.exp(z / t - m).sum(1)) + m[:, 0])


# ---------------------------------------------------------------- GEN ------------------------------------------
@pytest.mark.parametrize("gamma,m,t", [(0.1, 100, 1.0), (0.5, 3, 2.0), (0.02, 1, 0.5)])
def test_gen_matches_generalized_entropy(gamma, m, t):
    z = grid((2, 7, 5, 6), 0)
    got = create_scorer("gen", t, gamma=gamma, m=m)(z).numpy()
    p = np.sort(np_softmax(z.double().numpy() / t), axis=1)[:, -m:]
    ref = (p**gamma * (1 - p) ** gamma).sum(1)
    np.testing.assert_allclose(got, ref, **TOL)


# ---------------------------------------------------------------- S2M energy + Gaussian blur -------------------
def test_energy_blur_is_s2m_energy_with_torchvision_and_scipy_blur():
    from torchvision.transforms.functional import gaussian_blur

    z = grid((2, 19, 20, 24), 1)
    e = np_energy(z.double().numpy())
    got = create_scorer("energy_blur")(z)
    tv = gaussian_blur(torch.from_numpy(e)[:, None], kernel_size=[7, 7], sigma=[1.0, 1.0])[:, 0].numpy()
    sp = np.stack([ndimage.gaussian_filter(m, sigma=1.0, mode="mirror", truncate=3.0) for m in e])
    np.testing.assert_allclose(got.numpy(), tv, **TOL)
    np.testing.assert_allclose(got.numpy(), sp, **TOL)
    torch.testing.assert_close(create_scorer("energy", blur=(7, 1.0))(z), got)
    assert not torch.equal(create_scorer("energy")(z), got)


# ---------------------------------------------------------------- SML -------------------------------------------
def ref_boundaries(pred: np.ndarray) -> np.ndarray:
    """kornia dilation (cross) != erosion (3×3), borders ignored ≡ scipy with nearest padding for max / min."""
    cross = ndimage.generate_binary_structure(2, 1)
    dil = ndimage.grey_dilation(pred, footprint=cross, mode="nearest")
    ero = ndimage.grey_erosion(pred, footprint=np.ones((3, 3), bool), mode="nearest")
    return (dil != ero).astype(np.float64)


def ref_suppression(x: np.ndarray, pred: np.ndarray, width: int, iters: int) -> np.ndarray:
    """The reference's BoundarySuppressionWithSmoothing, first stage, one image, in loops."""
    bounds = ref_boundaries(pred)
    out = x.copy()
    for i in range(iters):
        r = 0 if i == iters - 1 else width - (width // iters) * i - 1
        diamond = np.abs(np.arange(-r, r + 1))[:, None] + np.abs(np.arange(-r, r + 1))[None] <= r
        grown = ndimage.grey_dilation(bounds, footprint=diamond, mode="nearest") if r else bounds
        keep = (grown == 0).astype(np.float64)
        xp, kp = np.pad(out * keep, 1, mode="edge"), np.pad(keep, 1, mode="edge")
        new = out.copy()
        for a in range(x.shape[0]):
            for b in range(x.shape[1]):
                n = kp[a : a + 3, b : b + 3].sum()
                if keep[a, b] == 0 and n > 0:
                    new[a, b] = xp[a : a + 3, b : b + 3].sum() / n
        out = new
    return out


def ref_dilated_smoothing(x: np.ndarray, d: int) -> np.ndarray:
    k = np.exp(-0.5 * (np.arange(7) - 3.0) ** 2)[:, None] * np.exp(-0.5 * (np.arange(7) - 3.0) ** 2)[None]
    k /= k.sum()
    xp = np.pad(x, 3 * d, mode="edge")
    out = np.zeros_like(x)
    for i in range(7):
        for j in range(7):
            out += k[i, j] * xp[i * d : i * d + x.shape[0], j * d : j * d + x.shape[1]]
    return out


def test_sml_fit_and_score_match_the_reference():
    z_train = grid((3, 5, 12, 10), 2)
    stats = create_fit("max_logit_stats").update(PixelLogits(z_train), np.zeros((3, 12, 10), np.uint8), "abc")
    m, pred = z_train.double().max(1)
    mean, std = stats.mean_std()
    for c in range(5):
        v = m[pred == c]
        assert abs(mean[c] - v.mean().item()) < 1e-9 and abs(std[c] - v.var().sqrt().item()) < 1e-9  # torch.var
    z = grid((2, 5, 14, 16), 3)
    zn = z.double().numpy()
    mx, am = zn.max(1), zn.argmax(1)
    sml_ref = (mx - mean[am]) / std[am]
    for width, dil in ((0, 0), (4, 0), (0, 6), (4, 6), (2, 2)):
        got = create_scorer("sml", fit=stats, boundary_width=width, dilation=dil)(z).numpy()
        ref = []
        for b in range(2):
            s = ref_suppression(sml_ref[b], am[b], width, min(4, width)) if width else sml_ref[b]
            ref.append(ref_dilated_smoothing(s, dil) if dil else s)
        np.testing.assert_allclose(got, -np.stack(ref), **TOL)


# ---------------------------------------------------------------- Mahalanobis ------------------------------------
def test_mahalanobis_matches_class_means_and_empirical_covariance():
    f_train = grid((3, 4, 6, 5), 4)
    labels = torch.randint(0, 3, (3, 12, 10), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    labels[0, :2] = 255  # void pixels are left out of the fit
    fit = create_fit("class_gaussians", num_classes=3).update(
        PixelLogits(torch.zeros(3, 3, 12, 10), features=f_train), labels, "abc")
    y = labels[:, ::2, ::2].numpy().reshape(-1)  # nearest sampling on the 6×5 feature grid
    x = f_train.double().permute(0, 2, 3, 1).reshape(-1, 4).numpy()
    x, y = x[y != 255], y[y != 255]
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    prec = EmpiricalCovariance(assume_centered=False).fit(x - means[y]).precision_
    f = grid((2, 4, 6, 5), 5)
    got = create_scorer("mahalanobis", fit=fit)(PixelLogits(torch.zeros(2, 3, 6, 5), features=f)).numpy()
    q = f.double().permute(0, 2, 3, 1).numpy()[..., None, :] - means  # [B,h,w,C,D]
    ref = np.einsum("...cd,de,...ce->...c", q, prec, q).min(-1)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# ---------------------------------------------------------------- kNN ------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 10])
def test_knn_is_kth_squared_distance_of_normalised_features(k):
    f_train = grid((2, 6, 5, 4), 6)
    labels = np.zeros((2, 5, 4), np.uint8)
    bank = create_fit("feature_bank", num_classes=1, cap=1000, seed=3).update(
        PixelLogits(torch.zeros(2, 1, 5, 4), features=f_train), labels, ["x", "y"])
    assert len(bank.keys) == 40  # under the cap: every labelled pixel
    def norm(a: np.ndarray) -> np.ndarray:  # the reference's normaliser
        return a / (np.linalg.norm(a, ord=2, axis=-1, keepdims=True) + 1e-10)

    train = norm(f_train.double().permute(0, 2, 3, 1).reshape(-1, 6).numpy())
    f = grid((1, 6, 5, 4), 7)
    test = norm(f.double().permute(0, 2, 3, 1).reshape(-1, 6).numpy())
    d2 = ((test[:, None] - train[None]) ** 2).sum(-1)
    ref = np.sort(d2, axis=1)[:, k - 1].reshape(1, 5, 4)
    got = create_scorer("knn", fit=bank, k=k)(PixelLogits(torch.zeros(1, 1, 5, 4), features=f)).numpy()
    np.testing.assert_allclose(got, ref, **TOL)


# ---------------------------------------------------------------- ReAct ----------------------------------------
def erfnet_and_batch(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("erfnet", width=0.25, input_size=None, num_classes=5).eval()
    images = torch.randint(0, 256, (2, 16, 24, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return model, images


@pytest.mark.parametrize("p", [50.0, 90.0, 99.0])
def test_react_threshold_and_clipped_energy(p):
    model, images = erfnet_and_batch()
    f_train = grid((3, 4, 8, 12), 8, relu=True)
    hist = create_fit("activation_histogram").update(PixelLogits(torch.zeros(3, 5, 16, 24), features=f_train),
                                                     np.zeros((3, 16, 24), np.uint8), "abc")
    c = np.percentile(f_train.double().numpy().flatten(), p)
    assert abs(hist.threshold(p) - c) < 1e-9
    out = model.predict(images, features=True)
    got = create_scorer("react", 2.0, fit=hist, percentile=p)(out, model=model, images=images).numpy()
    conv = model.decoder.output_conv  # 2×2 stride-2 transposed conv: logits[k, 2i+a, 2j+b] = Σ_c f[c,i,j] W[c,k,a,b]
    w, bias = conv.weight.double().detach().numpy(), conv.bias.double().detach().numpy()
    fc = np.minimum(out.features.double().numpy(), c)
    logits = np.einsum("ncij,ckab->nkiajb", fc, w).reshape(2, w.shape[1], 16, 24) + bias[None, :, None, None]
    np.testing.assert_allclose(got, np_energy(logits[:, :5], 2.0), **TOL)


# ---------------------------------------------------------------- ODIN -----------------------------------------
@pytest.mark.parametrize("t,eps", [(1.0, 0.0), (1000.0, 0.0014), (10.0, 0.004)])
def test_odin_matches_the_reference_procedure(t, eps):
    model, images = erfnet_and_batch(1)
    data = (images.permute(0, 3, 1, 2).float() / 255.0).requires_grad_(True)  # ERFNet: ToTensor, std 1
    output = model(data).logits
    loss = torch.nn.CrossEntropyLoss()(output / t, output.detach().argmax(1))
    loss.backward()
    gradient = (torch.ge(data.grad.detach(), 0).float() - 0.5) * 2
    with torch.no_grad():
        out2 = model(data.detach() - eps * gradient).logits.double().numpy() / t
    ref = 1.0 - np_softmax(out2).max(1)
    got = create_scorer("odin", t, epsilon=eps)(model.predict(images), model=model, images=images).numpy()
    np.testing.assert_allclose(got, ref, **TOL)


def test_feature_scorers_do_not_run_the_model_and_one_batch_serves_all():
    model, images = erfnet_and_batch(2)
    out = model.predict(images, features=True)
    labels = torch.randint(0, 5, (2, 16, 24), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    fits = {n: create_fit(n, **({"num_classes": 5} if n in ("class_gaussians", "feature_bank") else {}))
            .update(out, labels, ["a", "b"]) for n in ("max_logit_stats", "class_gaussians", "feature_bank",
                                                       "activation_histogram")}
    scorers = [create_scorer("sml", fit=fits["max_logit_stats"]), create_scorer("mahalanobis",
               fit=fits["class_gaussians"]), create_scorer("knn", fit=fits["feature_bank"]), create_scorer("gen"),
               create_scorer("react", fit=fits["activation_histogram"]), create_scorer("energy")]
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        maps = score_many(out, scorers, (16, 24), model=model, images=images)
    finally:
        handle.remove()
    assert calls == [] and all(m.shape == (2, 16, 24) and bool(torch.isfinite(m).all()) for m in maps)
    for s, m in zip(scorers, maps):  # the same maps one by one
        torch.testing.assert_close(s(out, (16, 24), model=model, images=images), m)
