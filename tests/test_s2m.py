"""S2M core: metrics (vs a direct numpy implementation of S2M's get_iou / calculate_miou), mask assembly, box
prompters, the score-map Faster R-CNN (training, checkpoints, recall/AP) and refine_s2m with the tiny SAM."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from oodseg.models.checkpoint import CheckpointError
from oodseg.models.detector import (
    build_detector,
    detector_targets,
    hflip,
    load_detector,
    multiplicative_noise,
    save_detector,
)
from oodseg.outputs import Boxes
from oodseg.refine import assemble_masks, create_prompter, list_prompters, refine_s2m
from oodseg.scoring.calibration import ScoreCalibration
from oodseg.scoring.metrics import S2MMetrics, average_precision, box_recall, metric_from_state

# ------------------------------------------------------------------------------------------------------------------
# S2MMetrics
# ------------------------------------------------------------------------------------------------------------------


def _reference(maps: list[np.ndarray], labels: list[np.ndarray], exclude_void: bool = False) -> dict[str, float]:
    """S2M's definitions written out: loop over thresholds and images, IoU / Dice per image, image mean."""
    thresholds = np.arange(0, 1 + 0.01, 0.01)
    ious, f1s = [], []
    for t in thresholds:
        per_iou, per_f1 = [], []
        for m, lab in zip(maps, labels):
            keep = lab != 255 if exclude_void else np.ones(lab.shape, bool)
            p = (m.astype(np.float64) > t)[keep]
            g = (lab == 1)[keep]
            inter, union = np.logical_and(p, g).sum(), np.logical_or(p, g).sum()
            per_iou.append(inter / union if union else 0.0)
            per_f1.append(2 * inter / (inter + union) if union else 0.0)
        ious.append(np.mean(per_iou))
        f1s.append(np.mean(per_f1))
    best_iou, best_t = 0.0, 0.0
    for t, v in zip(thresholds, ious):  # S2M: `if iou > Best_miou`, starting from 0
        if v > best_iou:
            best_iou, best_t = v, t
    return {"iou": best_iou, "best_threshold": best_t, "auiou": float(np.trapezoid(ious, thresholds)),
            "mean_f1": float(np.mean(f1s))}


def _random_images(seed: int, n: int = 7) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    maps, labels = [], []
    for i in range(n):
        h, w = rng.integers(8, 24, size=2)
        lab = (rng.random((h, w)) < 0.2).astype(np.uint8)
        lab[rng.random((h, w)) < 0.1] = 255
        m = np.zeros((h, w), np.float32)  # piecewise constant like an assembled map, plus continuous noise
        for _ in range(3):
            y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
            m[y : y + 5, x : x + 6] = np.float32(rng.choice([0.07, 0.5, 0.86, 1.0, 0.3]))
        if i % 2:
            m = np.clip(m + rng.normal(0, 0.2, (h, w)).astype(np.float32), 0, 1.2)
        maps.append(m)
        labels.append(lab)
    maps.append(np.zeros((9, 11), np.float32))  # empty union at every threshold
    labels.append(np.zeros((9, 11), np.uint8))
    maps.append(np.full((9, 11), 0.5, np.float32))  # prediction only on void: counted (void not excluded)
    labels.append(np.full((9, 11), 255, np.uint8))
    return maps, labels


@pytest.mark.parametrize("exclude_void", [False, True])
def test_s2m_metrics_match_reference(exclude_void: bool) -> None:
    maps, labels = _random_images(0)
    metric = S2MMetrics(exclude_void=exclude_void)
    for m, lab in zip(maps, labels):
        metric.update(m, lab)
    got, ref = metric.compute(), _reference(maps, labels, exclude_void)
    assert set(got) == {"iou", "best_threshold", "auiou", "mean_f1"}
    for key in ref:
        assert got[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-12), key
    assert S2MMetrics.columns == {"iou": "s2m_iou", "auiou": "s2m_auiou", "mean_f1": "s2m_mean_f1",
                                  "best_threshold": "s2m_threshold"}


def test_s2m_metrics_void_counts_by_default() -> None:
    """A prediction on void pixels only: the union is non-empty, IoU 0 (S2M); excluding void leaves it empty (0)."""
    m, lab = np.full((4, 4), 0.5, np.float32), np.full((4, 4), 255, np.uint8)
    lab[0, 0] = 1
    kept = S2MMetrics().update(m, lab).compute()
    dropped = S2MMetrics(exclude_void=True).update(m, lab).compute()
    assert kept["iou"] == pytest.approx(1 / 16)  # t < 0.5: P = all 16, G = 1 pixel
    assert dropped["iou"] == pytest.approx(1.0)  # only the labelled pixel is left


def test_s2m_metrics_hand_case() -> None:
    """Map 0.5 exactly on the GT: IoU 1 for t < 0.5 (50 thresholds), else 0; best_threshold is the first (0.0)."""
    lab = np.zeros((6, 6), np.uint8)
    lab[1:4, 2:5] = 1
    m = np.where(lab == 1, 0.5, 0.0).astype(np.float32)
    out = S2MMetrics().update(m, lab).compute()
    assert out == pytest.approx({"iou": 1.0, "best_threshold": 0.0, "auiou": 0.49 + 0.005, "mean_f1": 50 / 101})


def test_s2m_metrics_batch_merge_state_torch() -> None:
    maps, labels = _random_images(1, n=6)  # 8 images incl. the empty-union and void-only ones
    h = min(m.shape[0] for m in maps)
    w = min(m.shape[1] for m in maps)
    maps = [m[:h, :w] for m in maps]
    labels = [lab[:h, :w] for lab in labels]
    single = S2MMetrics()
    for m, lab in zip(maps, labels):
        single.update(m, lab)
    batch = S2MMetrics().update(np.stack(maps), np.stack(labels))
    torch_in = S2MMetrics().update(torch.from_numpy(np.stack(maps)), torch.from_numpy(np.stack(labels)))
    parts = [S2MMetrics().update(np.stack(maps[a:b]), np.stack(labels[a:b])) for a, b in ((0, 2), (2, 3), (3, 8))]
    merged_abc = S2MMetrics().merge(parts[0]).merge(parts[1]).merge(parts[2])
    merged_cab = metric_from_state("s2m", parts[2].state_dict()).merge(parts[0]).merge(
        S2MMetrics.from_state_dict(parts[1].state_dict()))
    ref = single.compute()
    for other in (batch, torch_in, merged_abc, merged_cab):
        got = other.compute()
        for key in ref:
            assert got[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-15), key
    assert merged_cab.n_images == 8
    with pytest.raises(ValueError, match="cannot merge"):
        S2MMetrics().merge(S2MMetrics(exclude_void=True))


def test_s2m_metrics_empty_and_bad_input() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = S2MMetrics().compute()
    assert all(np.isnan(v) for v in out.values()) and caught
    with pytest.raises(ValueError, match="labels may only be"):
        S2MMetrics().update(np.zeros((3, 3), np.float32), np.full((3, 3), 7, np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        S2MMetrics().update(np.full((3, 3), np.nan, np.float32), np.zeros((3, 3), np.uint8))


# ------------------------------------------------------------------------------------------------------------------
# assemble_masks
# ------------------------------------------------------------------------------------------------------------------


def _rect(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_assemble_masks_rule() -> None:
    a, b, c = _rect(6, 8, 0, 4, 0, 4), _rect(6, 8, 2, 6, 2, 7), _rect(6, 8, 3, 4, 3, 4)
    expected = torch.zeros(6, 8)
    expected[a] = 0.9
    expected[b] = 0.4  # lower score visited later: wins on the overlap with a
    expected[c] = 0.2  # inside both
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):  # input order must not matter
        masks = torch.stack([a, b, c])[order]
        scores = torch.tensor([0.9, 0.4, 0.2])[order]
        out = assemble_masks(masks, scores)
        assert out.dtype == torch.float32 and torch.equal(out, expected)
    two = torch.zeros(6, 8)
    two[a] = 0.9
    two[b] = 0.4
    assert torch.equal(assemble_masks(torch.stack([b, a]).numpy(), np.array([0.4, 0.9])), two)  # numpy input
    assert torch.equal(assemble_masks(torch.zeros(0, 6, 8, dtype=torch.bool), torch.zeros(0)), torch.zeros(6, 8))
    with pytest.raises(ValueError, match="bool masks"):
        assemble_masks(torch.zeros(1, 6, 8), torch.ones(1))


# ------------------------------------------------------------------------------------------------------------------
# prompters
# ------------------------------------------------------------------------------------------------------------------


def test_components_two_blobs() -> None:
    s = np.zeros((20, 24), np.float32)
    s[2:6, 3:9] = 2.0  # blob A: rows 2..5, cols 3..8
    s[10:15, 10:13] = 1.0  # blob B: rows 10..14, cols 10..12
    s[14, 13] = 3.0  # right of B's last row (4-neighbour): joins B
    s[15, 14] = 1.0  # touches (14, 13) diagonally: 8-connected, joins B
    prompter = create_prompter("components", threshold=0.5, scale=1.0, min_area=1)
    boxes = prompter(s)
    mean_b = (15 * 1.0 + 3.0 + 1.0) / 17  # B: 15 px of 1.0, the 3.0 and the diagonal 1.0
    assert boxes.xyxy.tolist() == [[3, 2, 9, 6], [10, 10, 15, 16]]
    np.testing.assert_allclose(boxes.scores.numpy(), np.tanh((np.array([2.0, mean_b]) - 0.5) / 2), rtol=1e-6)
    by_max = create_prompter("components", threshold=0.5, scale=1.0, min_area=1, reduce="max")(torch.from_numpy(s))
    assert by_max.xyxy.tolist() == [[10, 10, 15, 16], [3, 2, 9, 6]]  # B's max 3.0 now ranks first
    np.testing.assert_allclose(by_max.scores.numpy(), np.tanh((np.array([3.0, 2.0]) - 0.5) / 2), rtol=1e-6)
    small = create_prompter("components", threshold=0.5, scale=1.0, min_area=20)(s)
    assert small.xyxy.tolist() == [[3, 2, 9, 6]]  # A has 24 px, B 17 px
    assert len(create_prompter("components", threshold=5.0, scale=1.0)(s)) == 0


def test_components_calibration_and_errors() -> None:
    s = np.zeros((10, 10), np.float32)
    s[2:7, 2:7] = 4.0
    cal = ScoreCalibration(threshold=1.0, location=0.0, scale=0.5)
    boxes = create_prompter("components")(s, calibration=cal)
    assert boxes.xyxy.tolist() == [[2, 2, 7, 7]] and boxes.scores.item() == pytest.approx(np.tanh(3.0 / 1.0))
    with pytest.raises(ValueError, match="needs threshold"):
        create_prompter("components")(s)
    with pytest.raises(ValueError, match="constant"):
        create_prompter("components", threshold=0.0, scale=1.0)(np.full((5, 5), 0.3, np.float32))
    with pytest.raises(ValueError, match="all NaN"):
        create_prompter("components", threshold=0.0, scale=1.0)(np.full((5, 5), np.nan, np.float32))
    partial = s.copy()
    partial[0, 0] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        create_prompter("components", threshold=0.0, scale=1.0)(partial)
    assert set(list_prompters()) >= {"components", "detector"}


def test_components_many_tiny_components_capped() -> None:
    rng = np.random.default_rng(0)
    s = np.zeros((64, 64), np.float32)
    s[::2, ::2] = rng.uniform(1.0, 2.0, (32, 32)).astype(np.float32)  # 1024 isolated pixels
    boxes = create_prompter("components", threshold=0.5, scale=1.0, min_area=1)(s)
    assert len(boxes) == 100
    top = np.sort(s[::2, ::2].reshape(-1))[::-1][:100]
    np.testing.assert_allclose(boxes.scores.numpy(), np.tanh((top - 0.5) / 2), rtol=1e-6)
    assert bool((boxes.xyxy[:, 2:] - boxes.xyxy[:, :2] == 1).all())
    assert len(create_prompter("components", threshold=0.5, scale=1.0, min_area=2)(s)) == 0


def test_calibration_from_scores() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(3.0, 2.0, (4, 32, 32)).astype(np.float32)
    labels = np.zeros(scores.shape, np.uint8)
    labels[:, :6, :6] = 1
    scores[labels == 1] += 10.0
    labels[:, -2:, :] = 255
    cal = ScoreCalibration.from_scores(scores, labels)
    inl = scores[labels == 0]
    q25, q50, q75 = np.quantile(inl, [0.25, 0.5, 0.75])
    assert cal.location == pytest.approx(q50, rel=1e-3, abs=1e-3)
    assert cal.scale == pytest.approx((q75 - q25) / 1.349, rel=1e-3)
    assert 8.0 < cal.threshold < 13.0  # best-F1 cut between the inlier bulk and the shifted anomalies


# ------------------------------------------------------------------------------------------------------------------
# detector
# ------------------------------------------------------------------------------------------------------------------

S = 64


def _square_sample(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Score map: N(0, 0.3) background with one bright (+3) square of side 28..36 at a random place."""
    s = torch.randn(S, S, generator=g) * 0.3
    size = int(torch.randint(28, 37, (1,), generator=g))
    y, x = (int(torch.randint(0, S - size + 1, (1,), generator=g)) for _ in range(2))
    m = torch.zeros(S, S, dtype=torch.bool)
    m[y : y + size, x : x + size] = True
    return s + 3.0 * m, m


def _tiny_detector() -> torch.nn.Module:
    return build_detector(backbone="tiny", min_size=S, max_size=S, box_batch_size_per_image=64)


def test_detector_targets_flip_noise() -> None:
    m = np.zeros((12, 30), bool)
    m[3:8, 10:21] = True  # rows 3..7, cols 10..20
    t = detector_targets(m)
    assert t["boxes"].tolist() == [[10, 3, 21, 8]] and t["labels"].tolist() == [1]  # xyxy, not S2M's (y, x)
    empty = detector_targets(np.zeros((5, 5), bool))
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    flipped_map, flipped = hflip(torch.from_numpy(m).float(), t)
    assert flipped["boxes"].tolist() == [[30 - 21, 3, 30 - 10, 8]]
    assert detector_targets(flipped_map.bool())["boxes"].tolist() == flipped["boxes"].tolist()
    x = torch.full((3, 50, 50), 2.0)
    y = multiplicative_noise(x, 0.01, torch.Generator().manual_seed(0))
    assert float(y.min()) >= 2.0 * 0.99 and float(y.max()) <= 2.0 * 1.01 and float(y.std()) > 0


def test_detector_no_test_resize_and_normalisation() -> None:
    det = build_detector(backbone="tiny", min_size=96, max_size=128, location=2.0, scale=4.0, clip=1.5)
    s = torch.tensor([[2.0, 6.0], [-10.0, 30.0]])
    x = det.eval().inputs([s])[0]
    assert torch.allclose(x[1], torch.tensor([[0.0, 1.0], [-1.5, 1.5]]))  # (s − 2) / 4, clipped to ±1.5
    images, _ = det.rcnn.transform([torch.zeros(3, 40, 70)])
    assert images.image_sizes == [(40, 70)]  # eval: no resize
    det.train()
    images, _ = det.rcnn.transform([torch.zeros(3, 40, 70)], [{"boxes": torch.tensor([[1.0, 1, 5, 5]]),
                                                               "labels": torch.tensor([1])}])
    assert images.image_sizes == [(73, 128)]  # train: shortest edge → 96, capped by max_size 128
    r18 = build_detector(backbone="resnet18", min_size=64, max_size=96)
    boxes = r18.detect(torch.randn(48, 80))
    assert boxes.xyxy.shape[1] == 4 and len(boxes) <= 100 and bool((boxes.xyxy[:, 2] <= 80).all())


@pytest.mark.slow  # trains
def test_detector_trains_and_recalls_square(tmp_path) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    val = [_square_sample(g) for _ in range(8)]
    gts = [detector_targets(m)["boxes"] for _, m in val]
    det = _tiny_detector()

    def top1_recall() -> float:
        preds = [det.detect(s) for s, _ in val]
        return box_recall([Boxes(p.xyxy[:1], p.scores[:1]) for p in preds], gts)

    before = top1_recall()
    opt = torch.optim.Adam(det.parameters(), lr=2e-3)
    det.train()
    losses = []
    for _ in range(40):
        batch = [_square_sample(g) for _ in range(2)]
        loss_dict = det([s for s, _ in batch], [detector_targets(m) for _, m in batch])
        assert set(loss_dict) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
        loss = sum(loss_dict.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    preds = [det.detect(s) for s, _ in val]
    assert before <= 0.25 and top1_recall() >= 0.75
    assert average_precision(preds, gts) >= 0.75
    assert all(bool((p.scores[:-1] >= p.scores[1:]).all()) and float(p.scores.min()) > 0.05 for p in preds)

    path = save_detector(det, tmp_path / "det.safetensors", {"scorer": "energy", "steps": 40})
    loaded = load_detector(path)
    again = [loaded.detect(s) for s, _ in val]
    assert all(torch.equal(a.xyxy, b.xyxy) and torch.equal(a.scores, b.scores) for a, b in zip(preds, again))
    assert loaded.meta["scorer"] == "energy" and json.loads(loaded.meta["steps"]) == 40
    assert load_detector(path, score_thresh=0.5).cfg.score_thresh == 0.5
    via_prompter = create_prompter("detector", checkpoint=str(path))(val[0][0].numpy())
    assert torch.equal(via_prompter.xyxy, preds[0].xyxy)
    with pytest.raises(ValueError, match="may be overridden"):
        load_detector(path, backbone="resnet18")


def test_detector_checkpoint_mismatch(tmp_path) -> None:
    det = _tiny_detector()
    state = {k: v.clone() for k, v in det.state_dict().items()}
    dropped = "rcnn.roi_heads.box_predictor.cls_score.weight"
    del state[dropped]
    state["rcnn.extra.weight"] = torch.zeros(2)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata={"oodseg.detector": json.dumps({"backbone": "tiny", "min_size": S,
                                                                        "max_size": S})})
    with pytest.raises(CheckpointError) as err:
        load_detector(bad)
    assert str(bad) in str(err.value) and dropped in str(err.value) and "rcnn.extra.weight" in str(err.value)
    headless = tmp_path / "headless.safetensors"
    save_file({k: v.clone() for k, v in det.state_dict().items()}, str(headless))
    with pytest.raises(CheckpointError, match="not a ScoreDetector checkpoint"):
        load_detector(headless)
    wrong_cfg = tmp_path / "wrong.safetensors"
    save_file({"a": torch.zeros(1)}, str(wrong_cfg), metadata={"oodseg.detector": json.dumps({"backbone": "vgg"})})
    with pytest.raises(CheckpointError, match="invalid oodseg.detector config"):
        load_detector(wrong_cfg)


def test_recall_and_ap_hand_case() -> None:
    gt = [torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([[0.0, 0, 10, 10]])]
    preds = [Boxes.ranked([[0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60]], [0.9, 0.8, 0.7]),
             Boxes.ranked([[0, 0, 10, 10]], [0.6])]
    # ranked: 0.9 TP, 0.8 FP (duplicate of a matched GT), 0.7 FP, 0.6 TP → recall 1/3, 1/3, 1/3, 2/3
    # precision 1, 1/2, 1/3, 1/2 → envelope 1, 1/2, 1/2, 1/2 → AP = 1/3·1 + 1/3·1/2
    assert average_precision(preds, gt) == pytest.approx(1 / 3 + 1 / 6)
    assert box_recall(preds, gt) == pytest.approx(2 / 3)
    assert np.isnan(box_recall([Boxes.empty()], [torch.zeros(0, 4)]))


# ------------------------------------------------------------------------------------------------------------------
# refine_s2m
# ------------------------------------------------------------------------------------------------------------------


class _BoxFillSam:
    """Stand-in SAM: each box's mask is its rectangle; counts embed calls."""

    def __init__(self) -> None:
        self.embeds = 0

    def embed(self, image: np.ndarray) -> tuple[int, int]:
        self.embeds += 1
        return image.shape[:2]

    def masks_from_boxes(self, sam_image: tuple[int, int], boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        masks = torch.stack([_rect(*sam_image, int(b[1]), int(b[3]), int(b[0]), int(b[2])) for b in boxes])
        return masks, torch.ones(len(boxes))


def test_refine_s2m_with_stand_in() -> None:
    image = np.zeros((16, 20, 3), np.uint8)
    s = np.zeros((16, 20), np.float32)
    s[2:12, 2] = 3.0  # blob A: an L, box [2, 2, 12, 12]
    s[11, 2:12] = 3.0
    s[4:8, 5:9] = 1.0  # blob B inside A's box, not touching A: box [5, 4, 9, 8]
    prompter = create_prompter("components", threshold=0.5, scale=1.0, min_area=1)
    sam = _BoxFillSam()
    refined, boxes = refine_s2m(image, s, prompter, sam)
    assert sam.embeds == 1 and refined.dtype == torch.float32 and refined.shape == (16, 20)
    assert boxes.xyxy.tolist() == [[2, 2, 12, 12], [5, 4, 9, 8]]
    np.testing.assert_allclose(boxes.scores.numpy(), np.tanh([1.25, 0.25]), rtol=1e-6)
    expected = torch.zeros(16, 20)
    expected[2:12, 2:12] = boxes.scores[0]
    expected[4:8, 5:9] = boxes.scores[1]  # the lower score, assembled later, wins inside A's mask
    assert torch.equal(refined, expected)
    refined, boxes = refine_s2m(image, np.where(s > 0, 0.2, 0.0).astype(np.float32), prompter, sam)
    assert len(boxes) == 0 and sam.embeds == 1 and torch.equal(refined, torch.zeros(16, 20))
    with pytest.raises(ValueError, match="differ in size"):
        refine_s2m(image, s[:8], prompter, sam)


def test_refine_s2m_with_tiny_sam() -> None:
    from oodseg.models.sam import create_sam

    sam = create_sam("tiny", image_size=64)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    s = np.zeros((48, 64), np.float32)
    s[5:20, 8:30] = 2.0
    s[30:44, 40:60] = 1.0
    cal = ScoreCalibration(threshold=0.5, location=0.0, scale=1.0)
    prompter = create_prompter("components", min_area=16)
    refined, boxes = refine_s2m(image, torch.from_numpy(s), prompter, sam, calibration=cal)
    assert refined.shape == (48, 64) and refined.dtype == torch.float32 and len(boxes) == 2
    masks, _ = sam.masks_from_boxes(sam.embed(image), boxes.xyxy)
    assert torch.equal(refined, assemble_masks(masks, boxes.scores).cpu())
    assert set(torch.unique(refined).tolist()) <= {0.0, *boxes.scores.tolist()}
    empty, none = refine_s2m(image, s * 0.1, prompter, sam, calibration=cal)
    assert len(none) == 0 and torch.equal(empty, torch.zeros(48, 64))


def test_detector_task_trains_and_validates_through_the_one_loop(tiny_erfnet, suite_factory):
    """The ``s2m_detector`` task on the shared loop: a finite loss each step and, at the validation step, box recall
    / AP over the evenly spaced validation frames (each with one pasted object) computed by ``BoxMetrics``. (Seed 0's
    COCO-format objects are large enough for the paste's size filter at this frame size.)"""
    from oodseg.training.config import TrainConfig
    from oodseg.training.detector_task import DetectorTask
    from oodseg.training.loop import fit

    suite = suite_factory(seed=0, size=(64, 128), n_train=4, n_val=3, n_anomaly=1, n_coco=2)
    cfg = TrainConfig(task="s2m_detector", data_root=str(suite), coco_root=str(suite / "coco"),
                      anomaly_set=None, steps=2, global_batch=2, crop=(64, 128), val_every=2, val_images=2,
                      log_every=1, task_cfg={"scorer": "msp", "scoring_model": str(tiny_erfnet),
                                             "calibration_images": 2,
                                             "detector": {"backbone": "tiny", "min_size": 64, "max_size": 128}})
    result = fit(cfg)
    assert [r["step"] for r in result.history] == [1, 2] and all(np.isfinite(r["loss"]) for r in result.history)
    assert 0.0 <= result.metrics["val_box_recall"] <= 1.0 and 0.0 <= result.metrics["val_box_ap"] <= 1.0
    task = DetectorTask(cfg)
    frames = task.eval_data()["boxes"]
    assert len(frames) == 2 and all(int((f["outlier_mask"] == 1).sum()) > 0 for f in frames)
