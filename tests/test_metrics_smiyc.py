"""SMIYC leaderboard pixel numbers vs a literal transcription of the official toolkit's ``PixBinaryClass``
(SegmentMeIfYouCan/road-anomaly-benchmark: ``metrics/pixel_classification.py`` ``binary_confusion_matrix`` with
``bin_strategy='percentiles'``, ``num_bins=768``, ``process_frame``, ``aggregate_dynamic_bins``, and
``metrics/pixel_classification_curves.py`` ``curves_from_cmats``), plus the official component threshold rule."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from oodseg.scoring.metrics import ComponentMetrics, PixelMetrics, SmiycPixelMetrics, create_metric
from oodseg.scoring.metrics.smiyc import linear_quantiles

KEYS = ("auprc", "auroc", "fpr95", "best_f1", "threshold")


# ---------------------------------------------------------------- literal toolkit reference ----------------------
def toolkit_frame(labels: np.ndarray, scores: np.ndarray, num_bins: int = 768) -> dict:
    """``process_frame`` + ``binary_confusion_matrix(bin_strategy='percentiles')``. The three scalar range-end
    expressions are written as numpy 1.23.3 (the toolkit's pin) evaluates them: ``float32 scalar * 0.01`` is float64
    there (NEP 50 made it float32 in numpy 2), hence the explicit float64 casts."""
    roi = labels < 255
    prob, gt = scores[roi], labels[roi].astype(bool)
    prob_at_true, prob_at_false = prob[gt], prob[~gt]
    vmin, vmax = np.min(prob), np.max(prob)
    vrange = vmax - vmin
    eps = np.maximum(np.float64(vrange) * 1e-2, 1e-2)
    bins = [np.array([np.float64(vmin) - eps, np.float64(vmax) + eps])]
    if prob_at_true.size:
        bins += [np.quantile(prob_at_true, np.linspace(0, 1, min(num_bins // 2, prob_at_true.size)))]
    if prob_at_false.size:
        bins += [np.quantile(prob_at_false, np.linspace(0, 1, min(num_bins // 2, prob_at_false.size)))]
    bins = np.unique(np.concatenate(bins))
    tp_rel, _ = np.histogram(prob_at_true, bins=bins)
    fp_rel, bin_edges = np.histogram(prob_at_false, bins=bins)
    return {"bin_edges": bin_edges[::-1], "tp_rel": tp_rel[::-1], "fp_rel": fp_rel[::-1],
            "num_pos": int(gt.sum()), "num_neg": int((~gt).sum())}


def toolkit_aggregate(frames: list[dict], kind: str | None = None) -> dict[str, float]:
    """``aggregate_dynamic_bins`` + ``curves_from_cmats`` (``kind``: the argsort kind; the toolkit's default
    quicksort leaves the order of tied thresholds unspecified, ``"stable"`` makes it the frames' order)."""
    thresholds = np.concatenate([r["bin_edges"][1:] for r in frames])
    tp_relative = np.concatenate([r["tp_rel"] for r in frames])
    fp_relative = np.concatenate([r["fp_rel"] for r in frames])
    n_p, n_n = sum(r["num_pos"] for r in frames), sum(r["num_neg"] for r in frames)
    order = np.argsort(thresholds, kind=kind)[::-1]
    tp_cumu = np.cumsum(tp_relative[order].astype(np.float64))
    fp_cumu = np.cumsum(fp_relative[order].astype(np.float64))
    cmats = np.array([[tp_cumu, fp_cumu], [n_p - tp_cumu, n_n - fp_cumu]]).transpose([2, 0, 1])
    thr = thresholds[order]
    keep = np.concatenate([[0], np.nonzero(thr[:-1] != thr[1:])[0], [len(cmats) - 1]])
    cmats, thr = cmats[keep], thr[keep]
    tp, fp, fn, tn = cmats[:, 0, 0], cmats[:, 0, 1], cmats[:, 1, 0], cmats[:, 1, 1]
    num_pos, num_neg = tp[0] + fn[0], fp[0] + tn[0]
    if tp[0] != 0 or fp[0] != 0:
        tp, fp = np.concatenate([[0], tp]), np.concatenate([[0], fp])
        fn, tn = np.concatenate([[num_pos], fn]), np.concatenate([[num_neg], tn])
        thr = np.concatenate([[float(np.max(thr)) + 1], thr])
    if tp[-1] != num_pos or fp[-1] != num_neg:
        tp, fp = np.concatenate([tp, [num_pos]]), np.concatenate([fp, [num_neg]])
        fn, tn = np.concatenate([fn, [0]]), np.concatenate([tn, [0]])
        thr = np.concatenate([thr, [float(np.max(thr)) - 1]])
    tpr, fpr = tp / (tp + fn), fp / (fp + tn)
    n_preds = tp + fp
    precision = np.ones(tp.shape[0], np.float64)
    precision[n_preds > 0] = tp[n_preds > 0] / n_preds[n_preds > 0]
    recall = tp / (tp + fn)
    f1 = (2 * tp) / (2 * tp + fp + fn)
    k = np.searchsorted(tpr, 0.95)
    ix = np.nanargmax(f1)
    return {"auprc": float(np.sum(np.diff(recall) * precision[1:])), "auroc": float(np.trapezoid(tpr, fpr)),
            "fpr95": float(fpr[k]) if k < tpr.shape[0] else 1.0, "best_f1": float(f1[ix]),
            "threshold": float(thr[ix])}


def toolkit(scores: np.ndarray, labels: np.ndarray, order=None, kind: str | None = None) -> dict[str, float]:
    frames = [toolkit_frame(labels[i], scores[i]) for i in (range(len(scores)) if order is None else order)]
    return toolkit_aggregate(frames, kind)


def ordered_for_ties(scores: np.ndarray, labels: np.ndarray) -> list[int]:
    """A frame order under which a stable argsort picks, as the toolkit's partial first curve point, the entry this
    module documents: among frames tied at the top edge, the one with the fewest (anomaly, inlier) top-bin pixels
    (a stable descending walk meets the LAST tied frame first, so that frame goes last)."""
    frames = [toolkit_frame(labels[i], scores[i]) for i in range(len(scores))]
    top = max(r["bin_edges"][1] for r in frames)
    tied = [i for i, r in enumerate(frames) if r["bin_edges"][1] == top]
    chosen = min(tied, key=lambda i: (frames[i]["tp_rel"][0], frames[i]["fp_rel"][0]))
    return [i for i in range(len(frames)) if i != chosen] + [chosen]


def smiyc(scores, labels, **kw) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray numpy warnings from the metric
        return SmiycPixelMetrics(**kw).update(scores, labels).compute()


def assert_same(got: dict, ref: dict) -> None:
    for key in KEYS:
        assert got[key] == ref[key], (key, got[key], ref[key])  # same arithmetic → bit-identical


def maps(rng: np.random.Generator, n: int, shape=(48, 64), frac=0.04, sep=3.0, empty_frames=0):
    """Smooth score maps with blob anomalies; the first ``empty_frames`` frames have no anomaly; ignore border."""
    noise = ndimage.gaussian_filter(rng.normal(size=(n, *shape)), sigma=(0, 2, 2))
    noise = noise / noise.std() + rng.normal(size=noise.shape) * 0.5
    blobs = ndimage.gaussian_filter(rng.random((n, *shape)), sigma=(0, 5, 5))
    cut = np.quantile(blobs.reshape(n, -1), 1 - frac, axis=1).reshape(n, 1, 1)
    labels = (blobs > cut).astype(np.uint8)
    labels[:empty_frames] = 0
    labels[:, :3] = 255
    return (noise + sep * (labels == 1)).astype(np.float32), labels


# ---------------------------------------------------------------- building blocks ---------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n", [1, 2, 7, 383, 384, 385, 2000])
def test_linear_quantiles_round_exactly_like_numpy(n, dtype):
    x = np.sort(np.clip(np.random.default_rng(n).standard_cauchy(n) * 50, -3e4, 3e4).astype(dtype))
    q, extremes = linear_quantiles(x, dtype)
    np.testing.assert_array_equal(q, np.quantile(x, np.linspace(0, 1, min(384, n))))
    assert extremes.dtype == dtype and extremes[0] == x[0] and extremes[1] == x[-1]


# ---------------------------------------------------------------- vs the toolkit ----------------------------------
def test_continuous_frames_with_ignore_empty_and_heavy_tailed_frames_match_the_toolkit():
    """Frames with few (< 384) and many anomaly pixels, a frame without anomaly, a Cauchy-tailed frame, and
    ignore pixels with extreme scores that must not count."""
    rng = np.random.default_rng(0)
    scores, labels = maps(rng, 5, empty_frames=1)
    scores[2] = (rng.standard_cauchy(scores[2].shape) + 3.0 * (labels[2] == 1)).astype(np.float32)
    labels[3, 10:12] = 255
    scores[3, 10:12] = 1e30
    labels[4][labels[4] == 1] = rng.choice([0, 1], size=int((labels[4] == 1).sum()), p=[0.9, 0.1])  # ~10 pixels
    got, ref = smiyc(scores, labels), toolkit(scores, labels)
    assert_same(got, ref)
    assert got["n_frames"] == 5


def test_fpr95_is_read_at_the_first_point_reaching_tpr_095_without_interpolation():
    """20 anomaly pixels (each its own quantile edge): TPR = 19/20 = 0.95 exactly at the 19th anomaly score."""
    rng = np.random.default_rng(1)
    scores = rng.permutation(200).astype(np.float32).reshape(1, 10, 20)
    labels = np.zeros((1, 10, 20), np.uint8)
    labels.flat[rng.choice(200, 20, replace=False)] = 1
    got = smiyc(scores, labels)
    assert_same(got, toolkit(scores, labels))
    pos = np.sort(scores[labels == 1])[::-1]
    assert got["fpr95"] == np.sum(scores[labels == 0] >= pos[18]) / 180


@pytest.mark.parametrize("seed", range(3))
def test_tied_scores_match_the_toolkit_with_the_documented_top_tie_rule(seed):
    """Coarse scores tie across frames, also at the top edge. The toolkit's result then depends on the order in
    which tied entries are visited (its argsort and worker pool); ours equals the order of the documented rule."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((4, 30, 40)) < rng.uniform(0.05, 0.4, (4, 1, 1))).astype(np.uint8)
    scores = np.clip(np.round(rng.normal(size=labels.shape) + 1.5 * labels, 0), -2, 2).astype(np.float32)
    got = smiyc(scores, labels)
    assert_same(got, toolkit(scores, labels, ordered_for_ties(scores, labels), kind="stable"))
    outcomes = {toolkit(scores, labels, np.roll(np.arange(4), k), kind="stable")["auprc"] for k in range(4)}
    assert got["auprc"] in outcomes and len(outcomes) > 1  # the toolkit itself is order-dependent here


def test_binary_scores_match_the_toolkit_and_put_the_threshold_on_the_ones():
    rng = np.random.default_rng(3)
    labels = (rng.random((3, 32, 32)) < 0.2).astype(np.uint8)
    scores = np.where(rng.random(labels.shape) < 0.7, labels, 1 - labels).astype(np.float32)
    got = smiyc(scores, labels)
    assert_same(got, toolkit(scores, labels, ordered_for_ties(scores, labels), kind="stable"))
    assert got["threshold"] == 1.0  # `score > 1.0` then predicts nothing


def test_fp16_option_matches_the_toolkit_on_float16_maps():
    """The toolkit evaluates the float16 maps it stored: scores that differ only below float16 precision tie."""
    rng = np.random.default_rng(4)
    scores, labels = maps(rng, 3)
    scores = (scores * 1e-3 + 0.5).astype(np.float32)  # ~0.5 ± 0.003: many float16 ties, few float32 ones
    got = smiyc(scores, labels, fp16=True)
    stored = scores.astype(np.float16)
    assert_same(got, toolkit(stored, labels, ordered_for_ties(stored, labels), kind="stable"))
    assert got["auprc"] != smiyc(scores, labels)["auprc"]
    with pytest.raises(ValueError, match="overflow float16"):
        SmiycPixelMetrics(fp16=True).update(np.array([[1.0, 7e4]]), np.array([[0, 1]]))


# ---------------------------------------------------------------- state, frames, devices --------------------------
def test_merge_in_any_order_and_through_state_dict_gives_identical_numbers():
    scores, labels = maps(np.random.default_rng(5), 8, empty_frames=2)
    scores = np.round(scores, 1)  # ties across frames, including the top edge
    whole = PixelMetrics().update(scores, labels).compute()
    shards = [PixelMetrics().update(scores[i : i + 2], labels[i : i + 2]) for i in range(0, 8, 2)]
    for seed in range(3):
        merged = PixelMetrics()
        for i in np.random.default_rng(seed).permutation(len(shards)):
            merged.merge(PixelMetrics.from_state_dict(shards[i].state_dict()))
        assert merged.compute() == whole
    assert whole["auprc_smiyc"] == toolkit(scores, labels, ordered_for_ties(scores, labels), kind="stable")["auprc"]
    with pytest.raises(ValueError, match="cannot merge"):
        PixelMetrics().merge(PixelMetrics(smiyc=False))


def test_frames_are_leading_axis_slices_and_the_torch_path_bins_identically():
    scores, labels = maps(np.random.default_rng(6), 3)
    batched = PixelMetrics().update(scores, labels).state_dict()["state"]
    single = PixelMetrics()
    for i in range(3):
        single.update(scores[i], labels[i])
    flat = PixelMetrics()
    for i in range(3):
        valid = labels[i] != 255
        flat.update(scores[i][valid], labels[i][valid])  # 1-D: one frame (the same pixels as the [H, W] frame)
    for other in (single.state_dict()["state"], flat.state_dict()["state"]):
        for key in batched:
            np.testing.assert_array_equal(batched[key], other[key], err_msg=key)
    for fp16 in (False, True):
        ref = PixelMetrics(smiyc_fp16=fp16).update(scores, labels).state_dict()["state"]
        for lab in (torch.from_numpy(labels), torch.from_numpy(labels).long()):
            got = PixelMetrics(smiyc_fp16=fp16)._update_torch(torch.from_numpy(scores), lab).state_dict()["state"]
            for key in ref:
                np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


def test_exact_numbers_are_unchanged_and_switches_are_in_the_config():
    scores, labels = maps(np.random.default_rng(7), 4)
    on, off = PixelMetrics().update(scores, labels), PixelMetrics(smiyc=False).update(scores, labels)
    a, b = on.compute(), off.compute()
    assert {k: v for k, v in a.items() if not k.endswith("_smiyc")} == {k: v for k, v in b.items()
                                                                     if not k.endswith("_smiyc")}
    assert all(np.isnan(b[f"{k}_smiyc"]) for k in KEYS) and not any(np.isnan(a[f"{k}_smiyc"]) for k in KEYS)
    assert on.config() == {"bits": 24, "smiyc": True, "smiyc_fp16": False}
    assert {"auprc_smiyc", "fpr95_smiyc", "auroc_smiyc"} <= set(on.row())
    legacy = {"config": {"bits": 24}, "state": {k: v for k, v in off.state_dict()["state"].items()}}
    assert PixelMetrics.from_state_dict(legacy).config()["smiyc"] is False  # no frames: no leaderboard numbers
    with pytest.warns(RuntimeWarning, match="need both"):
        out = PixelMetrics().update(scores, np.zeros_like(labels)).compute()
    assert np.isnan(out["auprc_smiyc"]) and np.isnan(out["threshold_smiyc"])
    with pytest.warns(RuntimeWarning, match="needs both"):
        assert np.isnan(create_metric("smiyc_pixel").compute()["auprc"])
    with pytest.raises(ValueError, match="smiyc_fp16"):
        PixelMetrics(smiyc=False, smiyc_fp16=True)


def test_leaderboard_auprc_overstates_the_exact_one_on_a_realistic_map():
    """Frames without anomaly pixels get only inlier quantile edges, so their highest-scoring inliers share one
    coarse top bin and count as if they scored its lower edge: fewer false positives at high thresholds."""
    scores, labels = maps(np.random.default_rng(8), 8, shape=(64, 128), empty_frames=3)
    out = PixelMetrics().update(scores, labels).compute()
    assert 5e-3 < out["auprc_smiyc"] - out["auprc"] < 5e-2, (out["auprc"], out["auprc_smiyc"])


# ---------------------------------------------------------------- component threshold rule ------------------------
def test_official_component_rule_gives_siou_zero_on_binary_scores():
    """Binary scores: the best pooled point is the edge 1.0; the toolkit applies `score > 1.0` and predicts nothing,
    while the exact threshold (largest float32 below the ones' bin) predicts the ones."""
    labels = np.zeros((2, 60, 60), np.uint8)
    labels[:, 10:40, 10:40] = 1
    scores = np.zeros(labels.shape, np.float32)
    scores[:, 12:40, 10:42] = 1.0
    pixel = PixelMetrics().update(scores, labels)
    exact = ComponentMetrics.at_threshold(pixel, "anomaly", rule="exact").update(scores, labels).compute()
    official = ComponentMetrics.at_threshold(pixel, "anomaly", rule="smiyc").update(scores, labels).compute()
    assert exact["siou"] == pytest.approx(28 * 30 / (30 * 30 + 28 * 2))  # GT ∪ pred: 900 + 2 columns of 28
    assert official["siou"] == 0.0 and official["n_pred"] == 0 and official["mean_f1"] == 0.0
    assert ComponentMetrics.at_threshold(pixel, rule="smiyc").row().keys() == {"siou_smiyc", "ppv_smiyc",
                                                                               "mean_f1_smiyc"}


def test_fp16_component_rule_rounds_the_threshold_to_float16():
    """The toolkit compares its float16 maps with the float64 threshold in float16 (numpy 1.23 value-based
    casting): 0.49999 rounds to 0.5, so a blob scoring exactly 0.5 is not predicted; in float32 it is."""
    labels = np.zeros((40, 40), np.uint8)
    labels[5:30, 5:30] = 1
    scores = np.where(labels == 1, 0.5, 0.0).astype(np.float32)
    f32 = ComponentMetrics(0.49999, "anomaly", rule="smiyc").update(scores, labels).compute()
    f16 = ComponentMetrics(0.49999, "anomaly", rule="smiyc", fp16=True).update(scores, labels).compute()
    assert f32["siou"] == 1.0 and f16["siou"] == 0.0
    with pytest.raises(ValueError, match="rule"):
        ComponentMetrics(0.5, rule="leaderboard")


@pytest.mark.parametrize("value", [0.9, 0.6734])
def test_float16_stored_maps_keep_an_object_whose_score_sits_just_above_the_threshold(value):
    """The component pass reads float16 score shards while the exact rule's threshold is the largest float32 below
    the best bin: a 64-pixel object whose score is not a float16 value must stay predicted, as on the float32 map."""
    scores = np.zeros((32, 32), np.float32)
    scores[4:12, 4:12] = value
    labels = np.zeros((32, 32), np.uint8)
    labels[4:12, 4:12] = 1
    pixel = PixelMetrics().update(scores, labels)
    exact = ComponentMetrics.at_threshold(pixel, track="obstacle")
    assert float(np.float16(value)) < exact.threshold < value  # the float16 map is below the threshold...
    full = ComponentMetrics(**exact.config()).update(scores, labels).compute()
    half = ComponentMetrics(**exact.config()).update(scores.astype(np.float16), labels).compute()
    torch_half = ComponentMetrics(**exact.config()).update(torch.from_numpy(scores).half(), labels).compute()
    assert full["siou"] == half["siou"] == torch_half["siou"] == 1.0  # ...and the object is predicted all the same


def test_float16_stored_maps_differ_from_float32_only_within_half_a_float16_step_of_the_threshold():
    rng = np.random.default_rng(0)
    scores = rng.random((64, 64), dtype=np.float32)
    labels = (scores > 0.7).astype(np.uint8)
    labels[rng.random((64, 64)) < 0.05] ^= 1
    metric = ComponentMetrics.at_threshold(PixelMetrics().update(scores, labels))
    key = np.nextafter(np.float32(metric.threshold), np.float32(1))
    full = scores > np.float32(metric.threshold)
    half = scores.astype(np.float16) >= np.float16(key)
    assert (full <= half).all()  # nothing predicted on the float32 map is lost
    extra = scores[half & ~full]
    assert ((extra < key) & (extra >= key - np.float32(np.spacing(np.float16(key))) / 2)).all()
