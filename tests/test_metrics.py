"""Metrics vs independent references: sklearn for pixel metrics and the confusion matrix, hand-worked masks and a
literal re-implementation of the official SMIYC loops for the component metrics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    jaccard_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from oodseg.scoring.metrics import (
    ComponentMetrics,
    ConfusionMatrix,
    PixelMetrics,
    S2MMetrics,
    float32_keys,
    keys_to_float32,
)


# ---------------------------------------------------------------- pixel metrics -------------------------------
def reference(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """sklearn on the non-ignored pixels (float32 scores, as the metric sees them)."""
    keep = labels != 255
    y, s = labels[keep].astype(int), scores[keep].astype(np.float32).astype(np.float64)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    prec, rec, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * prec * rec / (prec + rec))
    return {
        "auprc": average_precision_score(y, s),
        "auroc": roc_auc_score(y, s),
        "fpr95": fpr[np.argmax(tpr >= 0.95)],
        "best_f1": f1.max(),
    }


def realistic_maps(rng: np.random.Generator, n_img: int, shape=(64, 128), offset=0.0, scale=1.0, frac=0.02):
    """Smooth Gaussian score maps with blob anomalies (~frac of pixels) scoring higher, plus some ignore pixels."""
    noise = ndimage.gaussian_filter(rng.normal(size=(n_img, *shape)), sigma=(0, 2, 2))
    noise = noise / noise.std() + rng.normal(size=noise.shape) * 0.5
    blobs = ndimage.gaussian_filter(rng.random((n_img, *shape)), sigma=(0, 4, 4))
    labels = (blobs > np.quantile(blobs, 1 - frac)).astype(np.uint8)
    labels[:, :3] = 255
    scores = (noise + 1.5 * labels) * scale + offset
    return scores.astype(np.float32), labels


@pytest.mark.parametrize(
    "offset,scale,bits", [(0.0, 1.0, 24), (-15.0, 2.0, 24), (0.0, 1e-3, 24), (-3.0, 20.0, 22), (1e6, 1e4, 26)]
)
def test_realistic_maps_match_sklearn_within_1e4(offset, scale, bits):
    """Binning error on realistic maps (incl. energy-like offsets and tiny/huge magnitudes) is ≤ 1e-4. An offset
    100× the spread (last case) needs the finer 26-bit binning: resolution is relative to the magnitude."""
    scores, labels = realistic_maps(np.random.default_rng(0), 24, offset=offset, scale=scale)
    got = PixelMetrics(bits).update(scores, labels).compute()
    ref = reference(scores, labels)
    for key in ("auprc", "auroc", "fpr95", "best_f1"):
        assert abs(got[key] - ref[key]) <= 1e-4, (key, got[key], ref[key])
    assert got["n_pixels"] == int((labels != 255).sum()) and got["n_anomaly"] == int((labels == 1).sum())
    assert got["anomaly_fraction"] == pytest.approx(got["n_anomaly"] / got["n_pixels"])


def test_binning_error_shrinks_with_bits():
    """The only error source is distinct scores sharing a bin: a large offset (1000× the spread) exposes it, and
    more bits strictly reduce it."""
    scores, labels = realistic_maps(np.random.default_rng(1), 24, offset=1e3)
    ref = reference(scores, labels)
    err = [abs(PixelMetrics(b).update(scores, labels).compute()["auprc"] - ref["auprc"]) for b in (20, 22, 24, 26)]
    assert err[0] > err[1] > err[2] > err[3]
    assert err[0] > 1e-3  # 20 bits: a bin is ~0.5 score units wide here, far coarser than the spread


@pytest.mark.parametrize("seed", range(8))
def test_random_tied_scores_are_exact(seed):
    """Scores on a coarse grid (heavy ties, distinct values in distinct bins): identical to sklearn."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 5000))
    labels = (rng.random(n) < rng.uniform(0.01, 0.5)).astype(np.uint8)
    labels[0], labels[1] = 0, 1
    scores = np.round(rng.normal(size=n) + labels * rng.uniform(0, 2), 1) * rng.choice([1.0, -3.0, 1e5])
    got, ref = PixelMetrics().update(scores, labels).compute(), reference(scores, labels)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key


def test_all_equal_scores():
    labels = np.array([0, 1, 0, 0, 1, 0, 0, 0], dtype=np.uint8)
    got = PixelMetrics().update(np.full(8, -7.25), labels).compute()
    assert got["auprc"] == pytest.approx(2 / 8)  # one threshold: recall 1 at precision 2/8
    assert got["auroc"] == pytest.approx(0.5)
    assert got["fpr95"] == 1.0
    assert got == pytest.approx({**got, **reference(np.full(8, -7.25), labels)})


def test_extreme_magnitudes_and_signed_zero_are_ordered_exactly():
    vals = np.array([-3.4e38, -1e30, -1.0, -1e-30, -1e-38, -0.0, 0.0, 1e-38, 1e-30, 1.0, 1e30, 3.4e38], np.float32)
    keys = float32_keys(vals)
    assert np.all(np.diff(keys.astype(np.int64)[[0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]]) > 0)
    assert keys[5] == keys[6]  # −0.0 == +0.0
    np.testing.assert_array_equal(keys_to_float32(keys), vals + np.float32(0))
    rng = np.random.default_rng(1)
    scores = rng.choice(vals, size=3000)
    labels = (rng.random(3000) < 0.3).astype(np.uint8)
    got, ref = PixelMetrics().update(scores, labels).compute(), reference(scores, labels)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key


def test_best_f1_threshold_reproduces_best_f1_with_strict_comparison():
    rng = np.random.default_rng(3)
    labels = (rng.random(4000) < 0.1).astype(np.uint8)
    scores = np.round(rng.normal(size=4000) + 2 * labels, 2).astype(np.float32)
    got = PixelMetrics().update(scores, labels).compute()
    pred = scores > np.float32(got["threshold"])
    tp = np.sum(pred & (labels == 1))
    f1 = 2 * tp / (pred.sum() + labels.sum())
    assert f1 == pytest.approx(got["best_f1"], abs=1e-12)
    assert got["best_f1"] == pytest.approx(reference(scores, labels)["best_f1"], abs=1e-12)


def test_ignore_pixels_and_torch_inputs():
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(3, 20, 30)).astype(np.float32)
    labels = (rng.random((3, 20, 30)) < 0.2).astype(np.uint8)
    labels[rng.random((3, 20, 30)) < 0.3] = 255
    scores[labels == 255] += 100.0  # ignored pixels must not count even with extreme scores
    a = PixelMetrics().update(scores, labels).compute()
    b = PixelMetrics().update(torch.from_numpy(scores).to(torch.bfloat16), torch.from_numpy(labels).long()).compute()
    ref = reference(scores, labels)
    assert a["auroc"] == pytest.approx(ref["auroc"], abs=1e-4) and a["auprc"] == pytest.approx(ref["auprc"], abs=1e-4)
    # bf16 rounds the scores (more ties) but must still be accepted and scored sensibly
    assert b["n_pixels"] == a["n_pixels"] and abs(b["auroc"] - a["auroc"]) < 0.02


def test_no_positives_or_no_negatives_give_nan_with_warning():
    for labels in (np.zeros(10, np.uint8), np.ones(10, np.uint8), np.full(10, 255, np.uint8)):
        m = PixelMetrics().update(np.arange(10.0), labels)
        with pytest.warns(RuntimeWarning, match="need both"):
            out = m.compute()
        assert np.isnan(out["auprc"]) and np.isnan(out["auroc"]) and np.isnan(out["fpr95"])
    with pytest.warns(RuntimeWarning):
        assert np.isnan(PixelMetrics().compute()["auroc"])


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"only be 0 \(inlier\), 1 \(anomaly\) or 255"):
        PixelMetrics().update(np.zeros(4), np.array([0, 1, 2, 255]))
    with pytest.raises(ValueError, match="NaN"):
        PixelMetrics().update(np.array([0.0, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="inf"):
        PixelMetrics().update(np.array([0.0, np.inf]), np.array([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        PixelMetrics().update(np.zeros((2, 3)), np.zeros((3, 2), np.uint8))
    with pytest.raises(ValueError, match="integer"):
        PixelMetrics().update(np.zeros(3), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="bits"):
        PixelMetrics().merge(PixelMetrics(bits=20))


def test_shards_merged_in_any_order_give_identical_state():
    scores, labels = realistic_maps(np.random.default_rng(5), 12, offset=-8.0)
    whole = PixelMetrics().update(scores, labels).state_dict()
    shards = [PixelMetrics().update(scores[i], labels[i]) for i in range(12)]
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(12)
        merged = PixelMetrics()
        for i in order:  # states travel as plain numpy dicts
            merged.merge(PixelMetrics.from_state_dict(shards[i].state_dict()))
        state = merged.state_dict()["state"]
        for key in ("bins", "neg", "pos"):
            np.testing.assert_array_equal(state[key], whole["state"][key])
        assert merged.compute() == PixelMetrics.from_state_dict(whole).compute()


@pytest.mark.parametrize("bits", [22, 24])
def test_device_path_bins_exactly_like_the_numpy_path(bits):
    """``_update_torch`` is what runs on a GPU actor; its torch ops are device-agnostic, so on the CPU it must give
    the numpy path's state bit for bit (extreme values, signed zeros, ignore pixels, bool / int64 labels)."""
    scores, labels = realistic_maps(np.random.default_rng(8), 3, offset=-4.0, scale=3.0)
    scores[0, 5, :8] = [-0.0, 0.0, 3.4e38, -3.4e38, 1e-40, -1e-40, 1e30, -1e-30]
    ref = PixelMetrics(bits).update(scores, labels).state_dict()
    for lab in (torch.from_numpy(labels), torch.from_numpy(labels).long()):
        got = PixelMetrics(bits)._update_torch(torch.from_numpy(scores), lab).state_dict()
        for key in ("bins", "neg", "pos"):
            np.testing.assert_array_equal(got["state"][key], ref["state"][key])
    valid = labels[0] != 255
    flat = PixelMetrics(bits)._update_torch(torch.from_numpy(scores[0][valid]), torch.from_numpy(labels[0][valid] == 1))
    ref0 = PixelMetrics(bits).update(scores[0], labels[0]).state_dict()
    np.testing.assert_array_equal(flat.state_dict()["state"]["pos"], ref0["state"]["pos"])
    bad = [
        (torch.zeros(4), torch.tensor([0, 1, 2, 255]), r"only be 0 \(inlier\)"),
        (torch.tensor([0.0, float("nan")]), torch.tensor([0, 1]), "NaN"),
        (torch.tensor([0.0, float("inf")]), torch.tensor([0, 1]), "inf"),
        (torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.uint8), "shape"),
        (torch.zeros(3), torch.zeros(3), "integer"),
    ]
    for s, lab, match in bad:
        with pytest.raises(ValueError, match=match):
            PixelMetrics(bits)._update_torch(s, lab)


def page_span(scores: np.ndarray, bits: int = 24) -> int:
    """How many ``PixelMetrics`` pages lie between the lowest and the highest score."""
    from oodseg.scoring.metrics import pixel

    pages = float32_keys(scores) >> np.uint32(32 - bits + pixel.PAGE_BITS)
    return int(pages.max()) - int(pages.min()) + 1


def test_dense_and_sparse_page_counting_give_the_same_state(monkeypatch):
    """Scores spanning few pages are counted by one bincount over their span, wider ones page by page: same state."""
    from oodseg.scoring.metrics import pixel

    scores, labels = realistic_maps(np.random.default_rng(9), 4, offset=50.0, scale=3.0)
    assert PixelMetrics().update(scores, labels).state_dict()["state"]["bins"].size > 4096  # several pages
    assert page_span(scores) < pixel.DENSE_PAGES  # one-signed scores (ignored ones too): the dense path
    dense = PixelMetrics().update(scores, labels).state_dict()["state"]
    monkeypatch.setattr(pixel, "DENSE_PAGES", 0)
    sparse = PixelMetrics().update(scores, labels).state_dict()["state"]
    for key in ("bins", "neg", "pos"):
        np.testing.assert_array_equal(dense[key], sparse[key])


@pytest.mark.parametrize("dense_pages", [256, 0])
def test_ignored_pixels_add_no_pages(monkeypatch, dense_pages):
    """Ignored pixels are left out before counting: pages only they would reach are not kept, on the dense and the
    sparse path alike; the state equals that of the valid pixels alone."""
    from oodseg.scoring.metrics import pixel

    scores, labels = realistic_maps(np.random.default_rng(5), 2, offset=50.0, scale=3.0)
    scores[labels == 255] = 1e6  # far from every valid score: pages of their own
    assert page_span(scores) < pixel.DENSE_PAGES  # with the default, the dense path
    monkeypatch.setattr(pixel, "DENSE_PAGES", dense_pages)
    valid = labels != 255
    full, alone = PixelMetrics().update(scores, labels), PixelMetrics(smiyc=False).update(scores[valid], labels[valid])
    assert sorted(full._pages) == sorted(alone._pages)
    for key in ("bins", "neg", "pos"):
        np.testing.assert_array_equal(full.state_dict()["state"][key], alone.state_dict()["state"][key])


def test_memory_does_not_grow_with_pixels():
    scores, labels = realistic_maps(np.random.default_rng(6), 8)
    m = PixelMetrics().update(scores, labels)
    n_pages = len(m._pages)
    for _ in range(30):
        m.update(scores, labels)  # 31× the pixels, same score values → the same pages
    assert len(m._pages) == n_pages
    assert sum(p.nbytes for p in m._pages.values()) == n_pages * 4096 * 2 * 8
    assert m.compute()["n_pixels"] == 31 * int((labels != 255).sum())


def test_curves_are_monotone_and_consistent_with_auroc():
    scores, labels = realistic_maps(np.random.default_rng(7), 8)
    m = PixelMetrics().update(scores, labels)
    c = m.curves(max_points=300)
    assert len(c["threshold"]) <= 300 and np.all(np.diff(c["threshold"]) < 0)
    assert np.all(np.diff(c["recall"]) >= 0) and np.all(np.diff(c["fpr"]) >= 0)
    assert c["recall"][-1] == 1.0 and c["fpr"][-1] == 1.0
    area = np.trapezoid(np.r_[0, c["tpr"]], np.r_[0, c["fpr"]])
    assert area == pytest.approx(m.compute()["auroc"], abs=2e-3)


# ---------------------------------------------------------------- component metrics --------------------------
def test_component_metrics_hand_built_obstacle_track():
    """20×20 image, obstacle track (pred segments < 50 px removed, GT < 10 px voided); worked out by hand:

    GT A rows 2-5 × cols 2-5 (16 px), GT B rows 2-5 × cols 11-16 (24 px), GT C rows 12-15 × cols 2-5 (16 px),
    GT D rows 18-19 × cols 18-19 (4 px < 10 → void). Row 0 is void (predictions there are dropped).
    Pred P rows 2-5 × cols 2-15 (56 px: 16 on A, 20 on B, 20 background);
    Pred Q rows 10-17 × cols 10-17 (64 px background) + D (8-connected to Q, but void);
    Pred R rows 12-13 × cols 2-3 (4 px on C, < 50 → removed).
    sIoU(A) = 16 / (16 + 20)   = 0.4444  (B's pixels in P are the adjustment, excluded from the union)
    sIoU(B) = 20 / (24 + 20)   = 0.4545
    sIoU(C) = 0                (R was removed)
    PPV(P) = 36/56 = 0.6429, PPV(Q) = 0/64 = 0
    τ ≤ 0.40: TP 2, FN 1, FP 1 → F1 = 4/6;  τ = 0.45: TP 1, FN 2, FP 1 → 2/5;  τ ≥ 0.50: TP 0 → 0.
    """
    labels = np.zeros((20, 20), np.uint8)
    labels[2:6, 2:6] = 1
    labels[2:6, 11:17] = 1
    labels[12:16, 2:6] = 1
    labels[18:20, 18:20] = 1
    labels[0] = 255
    scores = np.zeros((20, 20), np.float32)
    scores[0] = 1.0
    scores[2:6, 2:16] = 1.0
    scores[10:18, 10:18] = 1.0
    scores[18:20, 18:20] = 1.0
    scores[12:14, 2:4] = 1.0
    out = ComponentMetrics(0.5, track="obstacle").update(scores, labels).compute()
    siou = [16 / 36, 20 / 44, 0.0]
    f1 = [4 / 6] * 4 + [2 / 5] + [0.0] * 6
    assert out["n_gt"] == 3 and out["n_pred"] == 2
    assert out["siou"] == pytest.approx(np.mean(siou))
    assert out["ppv"] == pytest.approx((36 / 56 + 0) / 2)
    assert out["f1"] == pytest.approx(f1)
    assert out["mean_f1"] == pytest.approx(np.mean(f1))
    # threshold is strict (score > threshold, as in the official code): nothing is predicted at threshold 1.0
    strict = ComponentMetrics(1.0, track="obstacle").update(scores, labels).compute()
    assert strict["n_pred"] == 0 and strict["siou"] == 0.0


def test_component_metrics_anomaly_track_size_filters():
    """60×60 image, anomaly track: GT E rows 5-24 × cols 5-24 (400 px); GT F 9×11 = 99 px (< 100 → void);
    pred S rows 5-24 × cols 5-29 (500 px, kept) → sIoU(E) = 400/500 = 0.8, PPV(S) = 0.8 → F1 = 1 at every τ;
    pred T = rows 50-59 × cols 0-49 minus one pixel = 499 px (< 500 → removed, no FP).
    The obstacle track keeps F (FN: sIoU 0) and T (FP: PPV 0)."""
    labels = np.zeros((60, 60), np.uint8)
    labels[5:25, 5:25] = 1
    labels[40:49, 40:51] = 1
    scores = np.zeros((60, 60), np.float32)
    scores[5:25, 5:30] = 3.0
    scores[50:60, 0:50] = 3.0
    scores[50, 0] = 0.0
    out = ComponentMetrics(1.0, track="anomaly").update(scores, labels).compute()
    assert (out["n_gt"], out["n_pred"]) == (1, 1)
    assert out["siou"] == pytest.approx(0.8) and out["ppv"] == pytest.approx(0.8)
    assert out["mean_f1"] == pytest.approx(1.0)
    obstacle = ComponentMetrics(1.0, track="obstacle").update(scores, labels).compute()
    assert (obstacle["n_gt"], obstacle["n_pred"]) == (2, 2)
    assert obstacle["f1"][0] == pytest.approx(2 / (2 + 1 + 1))  # TP E, FN F, FP T


def official_segment_metrics(scores, labels, threshold, min_pred, min_gt):
    """A literal transcription of the official per-component loops (``default_instancer`` + ``segment_metrics`` of
    SegmentMeIfYouCan/road-anomaly-benchmark), used as an independent reference."""
    structure = np.ones((3, 3))
    pred = (scores > threshold).astype(int)
    pred[labels == 255] = 0
    gt_inst, n_gt = ndimage.label(labels == 1, structure)
    seg, n_seg = ndimage.label(pred, structure)
    for comp in range(1, n_seg + 1):
        if np.sum(seg == comp) < min_pred:
            seg[seg == comp] = 0
    labels = labels.copy()
    for comp in range(1, n_gt + 1):
        if np.sum(gt_inst == comp) < min_gt:
            labels[gt_inst == comp] = 255
    roi = labels < 255
    gt_inst, seg = gt_inst[roi], seg[roi]
    siou_gt, ppv = [], []
    for i in np.unique(gt_inst[gt_inst > 0]):
        hit = np.unique(seg[(gt_inst == i) & (seg > 0)])
        inter = np.sum((gt_inst == i) & np.isin(seg, hit))
        adjust = np.sum(~np.isin(gt_inst, [0, i]) & np.isin(seg, hit))
        siou_gt.append(inter / (np.isin(seg, hit).sum() + (gt_inst == i).sum() - inter - adjust))
    for j in np.unique(seg[seg > 0]):
        hit = np.unique(gt_inst[(seg == j) & (gt_inst > 0)])
        inter = np.sum((seg == j) & np.isin(gt_inst, hit))
        ppv.append(inter / np.sum(seg == j))
    return siou_gt, ppv


@pytest.mark.parametrize("track", ["anomaly", "obstacle"])
def test_component_metrics_match_official_loops_on_random_blobs(track):
    rng = np.random.default_rng(8)
    min_pred, min_gt = {"anomaly": (500, 100), "obstacle": (50, 10)}[track]
    metric = ComponentMetrics(0.3, track=track)
    all_siou, all_ppv = [], []
    for _ in range(4):
        blobs = ndimage.gaussian_filter(rng.random((120, 160)), 6)
        labels = (blobs > np.quantile(blobs, 0.85)).astype(np.uint8)
        labels[ndimage.gaussian_filter(rng.random((120, 160)), 6) > 0.53] = 255
        scores = (ndimage.gaussian_filter(rng.random((120, 160)), 5) + 0.03 * (labels == 1)).astype(np.float32)
        scores = (scores - scores.mean()) / scores.std()
        metric.update(scores, labels)
        siou, ppv = official_segment_metrics(scores, labels, 0.3, min_pred, min_gt)
        all_siou += siou
        all_ppv += ppv
    assert len(all_siou) > 3 and len(all_ppv) > 3
    np.testing.assert_allclose(metric.siou_gt, all_siou)
    np.testing.assert_allclose(metric.ppv, all_ppv)
    out = metric.compute()
    assert out["siou"] == pytest.approx(np.mean(all_siou)) and out["ppv"] == pytest.approx(np.mean(all_ppv))


def test_component_metrics_with_a_shared_ground_truth_and_float16_maps():
    """The component pass labels an image's GT once for all its score maps (``ground_truth`` → ``update_image``):
    the same values as ``update`` labelling it per map, for float32 and float16-stored maps; and S2M's curves of a
    thresholded (boolean) map equal those of the same map as 0.0 / 1.0 floats."""
    rng = np.random.default_rng(3)
    blobs = ndimage.gaussian_filter(rng.random((90, 120)), 5)
    labels = (blobs > np.quantile(blobs, 0.85)).astype(np.uint8)
    labels[:8] = 255
    for track in ("anomaly", "obstacle"):
        shared = ComponentMetrics(0.2, track=track)
        gt = shared.ground_truth(labels)
        for k in range(3):
            noise = ndimage.gaussian_filter(rng.random((90, 120)), 4)
            scores = ((noise - noise.mean()) / noise.std() + labels * k).astype(np.float32)
            for maps in (scores, scores.astype(np.float16)):
                alone = ComponentMetrics(0.2, track=track).update(maps, labels)
                one = ComponentMetrics(0.2, track=track).update_image(maps, labels, gt)
                assert (one.siou_gt, one.siou_pred, one.ppv) == (alone.siou_gt, alone.siou_pred, alone.ppv)
                assert one.siou_gt and one.ppv
        binary = rng.random((90, 120)) > 0.6
        assert S2MMetrics().update(binary, labels).compute() == S2MMetrics().update(binary.astype(np.float32),
                                                                                  labels).compute()


def test_component_metrics_merge_state_roundtrip_and_batches():
    rng = np.random.default_rng(9)
    scores = rng.normal(size=(3, 40, 40)).astype(np.float32)
    labels = (ndimage.gaussian_filter(rng.random((3, 40, 40)), (0, 3, 3)) > 0.55).astype(np.uint8)
    batched = ComponentMetrics(0.5, "obstacle").update(scores, labels)
    parts = [ComponentMetrics(0.5, "obstacle").update(scores[i], labels[i]) for i in (2, 0, 1)]
    merged = ComponentMetrics.from_state_dict(parts[0].state_dict())
    merged.merge(ComponentMetrics.from_state_dict(parts[1].state_dict())).merge(parts[2])
    assert merged.compute() == batched.compute()
    with pytest.raises(ValueError, match="cannot merge ComponentMetrics with config .*0.4"):
        merged.merge(ComponentMetrics(0.4, "obstacle"))
    with pytest.raises(ValueError, match="track"):
        ComponentMetrics(0.5, "lane")
    with pytest.raises(ValueError, match="finite threshold"):
        ComponentMetrics(float("nan"))  # e.g. the NaN threshold of a degenerate PixelMetrics


def test_component_metrics_empty_is_nan():
    out = ComponentMetrics(0.5).compute()
    assert np.isnan(out["siou"]) and np.isnan(out["ppv"]) and np.isnan(out["mean_f1"])


# ---------------------------------------------------------------- confusion matrix --------------------------
def test_confusion_matrix_matches_sklearn():
    rng = np.random.default_rng(10)
    k = 19
    target = rng.integers(0, k - 2, size=(4, 30, 40))  # classes 17, 18 never in GT
    target[rng.random(target.shape) < 0.1] = 255
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, k - 1, size=target.shape))  # 18 never
    pred[pred == 255] = 0
    keep = target != 255
    shards = [ConfusionMatrix(k).update(torch.from_numpy(pred[i]), target[i]) for i in range(4)]
    cm = ConfusionMatrix.from_state_dict(shards[3].state_dict())
    for s in shards[:3]:
        cm.merge(s)
    np.testing.assert_array_equal(cm.matrix, confusion_matrix(target[keep], pred[keep], labels=list(range(k))))
    out = cm.compute()
    iou = jaccard_score(target[keep], pred[keep], labels=list(range(k)), average=None, zero_division=0)
    np.testing.assert_allclose(out["iou_per_class"][:18], iou[:18])
    assert np.isnan(out["iou_per_class"][18]) and out["iou_per_class"][17] == 0.0  # 17 predicted but never GT
    assert out["miou"] == pytest.approx(np.mean(iou[:18]))  # class 18 (no GT, no pred) excluded
    assert out["pixel_accuracy"] == pytest.approx(accuracy_score(target[keep], pred[keep]))


def test_confusion_matrix_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="target class ids"):
        ConfusionMatrix(3).update(np.array([0, 1]), np.array([0, 7]))
    with pytest.raises(ValueError, match="pred class ids"):
        ConfusionMatrix(3).update(np.array([0, 3]), np.array([0, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ignored pixels are skipped before the range check, silently
        out = ConfusionMatrix(3).update(np.array([5]), np.array([255])).compute()
    assert np.isnan(out["miou"]) and np.isnan(out["pixel_accuracy"])
