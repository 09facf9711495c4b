"""SAOM: grid, nearest-neighbour prompt assignment (models.saom), losses (losses.saom), the training objective
(training.saom_task), SaomEval (scoring.metrics.saom), everything mode (refine.everything)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from oodseg.losses import saom as L
from oodseg.models import saom as S
from oodseg.models.sam import create_sam
from oodseg.refine import everything as E
from oodseg.scoring.metrics import SaomEval
from oodseg.scoring.metrics.base import create_metric, metric_from_state
from oodseg.training import saom_task as T


@pytest.fixture(scope="module")
def sam():
    return create_sam("tiny", seed=0)


# -- grid --------------------------------------------------------------------------------------------------------------
def test_point_grid_non_square_and_sam_reference():
    from transformers.models.sam.image_processing_sam import _build_point_grid

    g = S.point_grid(4, 2)
    assert g.shape == (8, 2)
    np.testing.assert_allclose(g[:4, 0], [0.125, 0.375, 0.625, 0.875])  # x runs fastest
    np.testing.assert_allclose(g[:4, 1], 0.25)
    np.testing.assert_allclose(g[4:, 1], 0.75)
    px = S.point_grid(4, 2, size=(30, 80))  # (H, W): x scaled by W, y by H, not by 1024
    np.testing.assert_allclose(px[5], [0.375 * 80, 0.75 * 30])
    np.testing.assert_allclose(S.point_grid(5, 5), _build_point_grid(5).numpy(), atol=1e-7)
    with pytest.raises(ValueError):
        S.point_grid(0, 3)


# -- nearest-neighbour assignment --------------------------------------------------------------------------------------
def _one_hot_features(h: int, w: int) -> torch.Tensor:
    return torch.eye(h * w).reshape(h * w, h, w)


def test_assign_single_cell_peak_snaps_to_grid():
    feats = _one_hot_features(4, 4)  # cell (r, c) has code e_{4r+c}
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 16:32, 32:48] = True  # exactly cell (1, 2): similarity 1 there, 0 elsewhere
    grid = S.point_grid(8, 8, size=(64, 64))  # points at 4, 12, ..., 60
    points, keep = S.assign_points(feats, masks, grid)
    assert keep.tolist() == [True, False]  # the empty mask is dropped
    # bilinear peak at the cell centre (23.5, 39.5) → first arg-max pixel (x=39, y=23) → nearest grid point
    np.testing.assert_allclose(points[0], [36, 20])
    assert np.isnan(points[1]).all()


def test_assign_location_prior_can_leave_the_mask():
    """target = norm(½max + ½mean) over cells A=e0, B=e1 is (e0+e1)/√2, so cell C holding that code wins."""
    feats = torch.zeros(16, 4, 4)
    feats[0, 0, 0] = 1  # A
    feats[1, 0, 1] = 1  # B
    feats[0, 3, 3] = feats[1, 3, 3] = 2 ** -0.5  # C, outside the mask
    others = [(r, c) for r in range(4) for c in range(4) if (r, c) not in [(0, 0), (0, 1), (3, 3)]]
    for ch, (r, c) in enumerate(others, start=2):
        feats[ch, r, c] = 1
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 0:16, 0:32] = True
    points, keep = S.assign_points(feats, masks, S.point_grid(5, 5, size=(64, 64)))
    # C is the corner cell: bilinear clamps at the border, so pixels 56..63 all hold 1; first is (56, 56)
    assert keep.all()
    np.testing.assert_allclose(points[0], [57.6, 57.6])


def test_assign_with_resize_and_padding():
    """Original 16×32 → resized 32×64 inside a 64×64 padded frame; 4×4 feature grid of that frame."""
    feats = _one_hot_features(4, 4)
    masks = torch.zeros(1, 16, 32, dtype=torch.bool)
    masks[0, 8:16, 0:8] = True  # resized: rows 16..31, cols 0..15 → cell (1, 0)
    grid = S.point_grid(4, 2, size=(16, 32))  # x 4, 12, 20, 28; y 4, 12
    points, keep = S.assign_points(feats, masks, grid, input_size=(32, 64), pad_size=(64, 64))
    assert keep.all()
    np.testing.assert_allclose(points[0], [4, 12])
    # the padded rows (32..63 of the frame) never hold the mask: its cells are all in rows 0..1
    cells = S.mask_cells(masks, (4, 4), (32, 64), (64, 64))
    assert cells[0].nonzero().tolist() == [[1, 0]]


def test_assign_matches_numpy_reference():
    rng = np.random.default_rng(0)
    c, h, w, hh, ww = 6, 4, 5, 32, 40  # cells of 8×8 pixels
    feats = rng.normal(size=(c, h, w)).astype(np.float32)
    masks = np.zeros((3, hh, ww), bool)
    masks[0, 3:20, 5:30] = True
    masks[1, 20:32, 0:12] = True
    masks[2, 10:13, 33:36] = True  # smaller than a cell: keeps its best-overlapping cell
    grid = S.point_grid(10, 8, size=(hh, ww))
    points, keep = S.assign_points(torch.from_numpy(feats), masks, grid)
    assert keep.all()
    for i in range(3):
        frac = masks[i].reshape(h, 8, w, 8).mean((1, 3))
        cells = frac >= 0.5 if (frac >= 0.5).any() else frac == frac.max()
        f = feats.reshape(c, -1).T[cells.ravel()]
        t = 0.5 * f.max(0) + 0.5 * f.mean(0)
        t /= np.linalg.norm(t)
        fn = feats.reshape(c, -1).T / np.linalg.norm(feats.reshape(c, -1).T, axis=1, keepdims=True)
        sim = torch.from_numpy((fn @ t).reshape(1, 1, h, w).astype(np.float32))
        up = F.interpolate(sim, size=(hh, ww), mode="bilinear", align_corners=False)[0, 0].numpy()
        ys, xs = np.nonzero(up >= up.max() - 1e-5)  # bilinear peaks tie between pixels; float noise decides
        allowed = {tuple(grid[np.argmin(((grid - [x, y]) ** 2).sum(1))]) for y, x in zip(ys, xs, strict=True)}
        assert len(allowed) <= 2 and tuple(points[i]) in allowed


def test_mask_cells_threshold_and_fallback():
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[0, 0:16, 0:16] = True
    masks[0, 0:16, 16:22] = True  # 6/16 of cell (0,1): below ½
    masks[1, 20:23, 20:23] = True  # tiny: best cell (1,1) only
    cells = S.mask_cells(masks, (2, 2))
    assert cells[0].tolist() == [[True, False], [False, False]]
    assert cells[1].tolist() == [[False, False], [False, True]]
    assert not cells[2].any()
    assert S.mask_cells(masks, (2, 2), min_fraction=0.3)[0].tolist() == [[True, True], [False, False]]


# -- losses ------------------------------------------------------------------------------------------------------------
def test_dice_and_focal_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(scale=3, size=(3, 5, 6))
    t = rng.random((3, 5, 6)) > 0.6
    p = 1 / (1 + np.exp(-x))
    dice = sum(1 - (2 * (p[i] * t[i]).sum() + 1) / (p[i].sum() + t[i].sum() + 1) for i in range(3))
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = np.where(t, p, 1 - p)
    a_t = np.where(t, 0.25, 0.75)
    focal = sum((a_t[i] * ce[i] * (1 - p_t[i]) ** 2).mean() for i in range(3))
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)
    assert L.dice_loss(xt, tt).item() == pytest.approx(dice, rel=1e-9)
    assert L.focal_loss(xt, tt).item() == pytest.approx(focal, rel=1e-7)
    cls_logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0]])
    cls = torch.tensor([0, 2, 2])
    terms = L.saom_loss(xt, tt, cls_logits, cls)
    lsm = cls_logits.log_softmax(1).numpy()
    ce_ref = -np.mean([lsm[0, 0], lsm[1, 2], lsm[2, 2]])
    assert terms["ce"].item() == pytest.approx(ce_ref, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(dice + focal + ce_ref, rel=1e-6)


# -- training step -----------------------------------------------------------------------------------------------------
def _scene():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    masks = np.zeros((4, 48, 64), bool)
    masks[0, 5:20, 5:30] = True
    masks[1, 25:45, 30:60] = True
    masks[2, 30:34, 2:6] = True
    return image, masks, np.array([0, 1, 2, 1])  # mask 3 is empty → dropped


def _train_step(sam, head, opt):
    """One step of the saom task's training path on :func:`_scene`: ``SaomModel``'s loss, backward, optimizer step."""
    image, masks, classes = _scene()
    model = T.SaomModel(sam, head, T.SaomTaskConfig(grid=(8, 6)), seed=0)
    opt.zero_grad(set_to_none=True)
    loss = model([{"image": image, "masks": masks, "classes": classes, "index": 0, "epoch": 0}])
    loss.backward()
    opt.step()
    return loss


def test_saom_training_step_updates_exactly_the_intended_groups():
    sam = create_sam("tiny", seed=3, image_size=64)
    head = S.SaomHead(sam.hidden_size, 3)
    params = S.select_saom_parameters(sam, head=head)
    opt = torch.optim.AdamW(params, lr=1e-2, eps=1e-4)
    before = {n: p.detach().clone() for n, p in sam.model.named_parameters()}
    head_before = head.fc.weight.detach().clone()
    image, masks, classes = _scene()
    terms = T.saom_image_loss(sam, head, image, masks, classes, S.point_grid(8, 6))
    assert terms["n_masks"] == 3
    torch.testing.assert_close(terms["loss"], terms["dice"] + terms["focal"] + terms["ce"])
    loss = _train_step(sam, head, opt)
    torch.testing.assert_close(loss.detach(), terms["loss"].detach())  # one image: the model's loss is SAOM's
    changed = {n for n, p in sam.model.named_parameters() if not torch.equal(p, before[n])}
    assert not any(n.startswith("vision_encoder.") for n in changed)
    assert not any(".iou_prediction_head." in n for n in changed)
    assert "shared_image_embedding.positional_embedding" not in changed
    pe = "prompt_encoder."
    assert {pe + "point_embed.1.weight", pe + "not_a_point_embed.weight", pe + "no_mask_embed.weight"} <= changed
    assert not {pe + "point_embed.2.weight", pe + "point_embed.3.weight", pe + "mask_embed.conv1.weight"} & changed
    # the negative-label embedding gets an all-zero gradient (torch.where), so AdamW only applies its weight decay
    neg = pe + "point_embed.0.weight"
    torch.testing.assert_close(dict(sam.model.named_parameters())[neg], before[neg] * (1 - 1e-2 * 1e-2))
    assert {"mask_decoder.iou_token.weight", "mask_decoder.upscale_conv1.weight"} <= changed
    assert not torch.equal(head.fc.weight, head_before)
    assert not any(p.requires_grad for p in sam.model.vision_encoder.parameters())


def test_saom_loss_is_the_best_of_three(sam):
    image, masks, classes = _scene()
    head = S.SaomHead(sam.hidden_size, 3)
    grid = S.point_grid(8, 6)
    with torch.no_grad():
        terms = T.saom_image_loss(sam, head, image, masks, classes, grid)
        img = sam.embed(image)
        points, keep = S.saom_prompts(sam, img, masks, grid)
        logits, iou, token = sam.mask_logits_from_points(img, points[keep][:, None], np.ones((3, 1)))
        best = torch.stack([logits[i, int(iou[i].argmax())] for i in range(3)])
        gt = torch.from_numpy(masks[keep])
        assert terms["dice"].item() == pytest.approx(L.dice_loss(best, gt).item(), rel=1e-5)
        ce = F.cross_entropy(head(token), torch.tensor([0, 1, 2])).item()
        assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)
        assert T.saom_image_loss(sam, head, image, np.zeros((2, 48, 64), bool), np.array([0, 1]), grid) is None
        with pytest.raises(ValueError, match="classes"):
            T.saom_image_loss(sam, head, image, masks, np.array([0, 1, 7, 1]), grid)


def test_train_encoder_variant_moves_the_encoder():
    sam = create_sam("tiny", seed=4, image_size=64)
    head = S.SaomHead(sam.hidden_size, 3)
    opt = torch.optim.AdamW(S.select_saom_parameters(sam, train_encoder=True, head=head), lr=1e-2)
    w = sam.model.vision_encoder.neck.conv1.weight
    w0 = w.detach().clone()
    _train_step(sam, head, opt)
    assert not torch.equal(w, w0)


def test_saom_predict_pairs_one_mask_per_gt(sam):
    image, masks, _ = _scene()
    head = S.SaomHead(sam.hidden_size, 3)
    pred, cls = S.saom_predict(sam, head, image, masks, S.point_grid(8, 6))
    assert pred.shape == masks.shape and pred.dtype == torch.bool
    assert not pred[3].any() and cls[3] == -1 and (cls[:3] >= 0).all()


# -- SaomEval ----------------------------------------------------------------------------------------------------------
def _m(*boxes, shape=(6, 6)):
    out = np.zeros((len(boxes), *shape), bool)
    for i, b in enumerate(boxes):
        if b is not None:
            out[i, b[0]:b[1], b[2]:b[3]] = True
    return out


def test_saom_eval_pools_per_class():
    gt1 = _m((0, 2, 0, 2), (0, 3, 3, 6))  # class 0: 4 px; class 1: 9 px
    pr1 = _m((0, 2, 0, 1), (0, 3, 3, 6))  # ∩2 ∪4 ; ∩9 ∪9
    gt2 = _m((2, 6, 0, 4), None)  # class 0: 16 px; class 2: empty GT (not an instance)
    pr2 = _m((2, 6, 2, 6), (0, 1, 0, 1))  # ∩8 ∪24 ; class 2: ∩0 ∪1
    a = SaomEval(num_classes=4).update(pr1, gt1, np.array([0, 1]))
    b = create_metric("saom", num_classes=4).update(torch.from_numpy(pr2), torch.from_numpy(gt2), [0, 2])
    ab = metric_from_state("saom", a.state_dict()).merge(b).compute(warn=False)
    ba = metric_from_state("saom", b.state_dict()).merge(a).compute(warn=False)
    iou0, acc0 = (2 + 8) / (4 + 24), (2 + 8) / (4 + 16)
    assert ab["iou_per_class"][0] == pytest.approx(iou0) and ab["acc_per_class"][0] == pytest.approx(acc0)
    assert ab["iou_per_class"][1] == 1.0 and np.isnan(ab["iou_per_class"][2]) and np.isnan(ab["iou_per_class"][3])
    assert ab["miou"] == pytest.approx((iou0 + 1) / 2) and ab["macc"] == pytest.approx((acc0 + 1) / 2)
    assert ab["n_classes"] == 2
    for k in ("miou", "macc", "iou_per_class", "acc_per_class"):
        np.testing.assert_equal(ab[k], ba[k])
    assert a.row(ab) == {"saom_miou": ab["miou"], "saom_macc": ab["macc"]}
    with pytest.raises(ValueError, match="classes"):
        SaomEval(2).update(pr1, gt1, np.array([0, 5]))
    with pytest.raises(ValueError, match="config"):
        SaomEval(2).merge(SaomEval(3))


# -- everything mode ---------------------------------------------------------------------------------------------------
def _reference_everything(sam, image, grid, iou_t, stab_t, offset, nms):
    """The same pipeline through transformers' own helpers (filter_masks → post_process_for_mask_generation)."""
    img = sam.embed(image)
    h, w = img.original_size
    ip = sam.image_processor
    pts = S.point_grid(*grid, size=(h, w))
    rles, scores, boxes = [], [], []
    with torch.no_grad():
        for p in np.array_split(pts, 3):
            logits, iou, _ = sam.mask_logits_from_points(img, p[:, None], np.ones((len(p), 1)))
            r, s, b = ip.filter_masks(logits, iou, (h, w), [0, 0, w, h], iou_t, stab_t, 0.0, offset)
            rles += r
            scores.append(s)
            boxes.append(b)
    masks, scores, _, _ = ip.post_process_for_mask_generation(rles, torch.cat(scores), torch.cat(boxes), nms)
    return torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.bool), scores


def test_everything_matches_transformers_helpers(sam):
    image = np.random.default_rng(5).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    offset = 1e-5  # the random tiny model's logits are ~1e-5
    img = sam.embed(image)
    pts = S.point_grid(6, 5, size=(48, 64))
    with torch.no_grad():
        logits, iou, _ = sam.mask_logits_from_points(img, pts[:, None], np.ones((30, 1)))
    stab = ((logits > offset).flatten(2).sum(-1) / (logits > -offset).flatten(2).sum(-1).clamp(min=1)).flatten()
    # thresholds halfway between attained values, so '>' (transformers) and '≥' (SAM) agree
    iou_t = float(iou.flatten().median()) + 1e-7
    sv = np.unique(stab.numpy())
    stab_t = float(sv[len(sv) // 3: len(sv) // 3 + 2].mean())
    masks, scores = E.generate_everything(sam, image, (6, 5), points_per_batch=7, pred_iou_thresh=iou_t,
                                          stability_score_thresh=stab_t, box_nms_thresh=0.7, min_area=0,
                                          stability_offset=offset)
    ref_masks, ref_scores = _reference_everything(sam, image, (6, 5), iou_t, stab_t, offset, 0.7)
    assert 0 < len(masks) < 90
    assert (scores > iou_t).all() and (scores[:-1] >= scores[1:]).all()
    order = torch.argsort(ref_scores, descending=True, stable=True)
    torch.testing.assert_close(scores, ref_scores[order])
    assert torch.equal(masks, ref_masks[order])


def _components(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
    return np.bincount(lab.ravel(), minlength=n + 1)[1:]


def test_everything_min_area_cleans_regions(sam):
    image = np.random.default_rng(6).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    raw, _ = E.generate_everything(sam, image, (5, 4), pred_iou_thresh=0, stability_score_thresh=0,
                                   box_nms_thresh=1.0, min_area=0)
    assert any((_components(m) < 25).any() for m in raw.numpy())  # the raw random masks are fragmented
    masks, scores = E.generate_everything(sam, image, (5, 4), pred_iou_thresh=0, stability_score_thresh=0,
                                          box_nms_thresh=0.9, min_area=25)
    assert len(masks) > 0 and len(scores) == len(masks)
    for m in masks.numpy():
        sizes = _components(m)
        assert (sizes >= 25).all() or len(sizes) == 1
        assert (_components(~m) >= 25).all()


def test_remove_small_regions_hand_case():
    m = np.zeros((10, 10), bool)
    m[1:8, 1:8] = True
    m[4, 4] = False  # 1-px hole
    m[9, 9] = True  # 1-px island
    filled, changed = E.remove_small_regions(m, 3, "holes")
    assert changed and filled[4, 4] and filled[9, 9]
    cleaned, changed = E.remove_small_regions(filled, 3, "islands")
    assert changed and not cleaned[9, 9] and cleaned[1:8, 1:8].all()
    same, changed = E.remove_small_regions(cleaned, 3, "islands")
    assert not changed and np.array_equal(same, cleaned)
    tiny = np.zeros((5, 5), bool)
    tiny[0, 0] = tiny[3, 3] = tiny[3, 4] = True
    kept, _ = E.remove_small_regions(tiny, 10, "islands")  # all small: the largest stays
    assert kept.sum() == 2 and kept[3, 3]


# -- the saom task's box objective (from-scratch demo SAM) ------------------------------------------------------------
def test_box_objective_samples_objects_with_pasted_outliers(suite_factory):
    from oodseg.labels import IGNORE_ID
    from oodseg.training.config import TrainConfig
    from oodseg.training.tasks import create_task

    suite = suite_factory(seed=0, size=(64, 128), n_train=6, n_val=2, n_anomaly=1, n_coco=3)
    cfg = TrainConfig(task="saom", task_cfg={"sam": "tiny", "sam_cfg": {"image_size": 128}, "prompts": "box",
                                             "train_encoder": True, "outliers": 2},
                      data_root=str(suite), coco_root=str(suite / "coco"), val_split=None, anomaly_set=None,
                      steps=1, global_batch=2, seed=0)
    task = create_task(cfg)
    samples, plain = task.samples(), create_task(replace_outliers(cfg, 0)).samples()
    pasted = 0
    for i in range(len(samples)):
        s, p = samples.get(i, 0), plain.get(i, 0)
        assert set(s["classes"].tolist()) <= {11, 13, IGNORE_ID}  # objects only: no stuff region is box-prompted
        assert s["masks"].sum(0).max() <= 1  # later pastes occlude earlier masks: disjoint
        new = s["masks"][s["classes"] == IGNORE_ID]
        pasted += len(new)
        for m in new:  # a pasted object's pixels are new image content, and the frame's own masks lost them
            assert m.any() and (s["image"][m] != p["image"][m]).any()
        own = s["masks"][s["classes"] != IGNORE_ID]
        assert own.shape == p["masks"].shape and not (own & ~p["masks"]).any()
    assert pasted > 0
    model = task.build_model()
    loss = model([samples.get(i, 0) for i in range(2)])
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0
                                        for p in model.sam.param_groups()["encoder"])


def replace_outliers(cfg, n):
    from dataclasses import replace

    return replace(cfg, task_cfg={**cfg.task_cfg, "outliers": n})


def test_saom_released_config_parses_and_dry_checks(tmp_path):
    """configs/saom_released.yaml with its paths replaced (a random tiny segment-anything-format SAM, a scratch data
    root and storage): it parses into the SAOM job's config, passes the job's pre-Ray validation and the SAM check,
    and builds SAOM's model from the converted .pth with the release's separate training / evaluation grids."""
    from dataclasses import replace
    from pathlib import Path

    pytest.importorskip("segment_anything")
    from segment_anything.build_sam import _build_sam

    from oodseg.config import parse_config
    from oodseg.models.checkpoint import CheckpointError
    from oodseg.models.sam import check_sam
    from oodseg.platform.jobs.finetune import validate
    from oodseg.platform.jobs.train_saom import PRESET
    from oodseg.platform.trainer import FinetuneConfig, resolve_data
    from oodseg.training.saom_task import SaomTask

    torch.manual_seed(0)
    sam_path = tmp_path / "sam_vit_tiny.pth"
    torch.save(_build_sam(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                          encoder_global_attn_indexes=[1]).state_dict(), sam_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "saom_released.yaml"
    cfg = parse_config(FinetuneConfig, ["--config", str(config), "--set", f"storage_path={tmp_path / 'runs'}",
                                        "--set", f"train.data_root={tmp_path}", "--set",
                                        f"train.task_cfg.sam={sam_path}", "--set", "use_gpu=false"], base=PRESET)
    tc = cfg.train
    assert (tc.task, tc.lr, tc.weight_decay, tc.schedule, tc.warmup, tc.global_batch, cfg.num_workers) == (
        "saom", 1e-3, 0.01, "cosine", 0, 4, 4)
    assert (tc.adam_eps, tc.decay_1d, tc.lr_per, tc.precision) == (1e-4, True, "epoch", "fp16")  # the release's
    cfg = resolve_data(cfg, tmp_path / "cache")
    validate(cfg)
    check_sam(cfg.train.task_cfg["sam"])
    task = SaomTask(cfg.train)
    model = task.build_model()
    assert (task.opts.grid, task.opts.eval_grid) == ((320, 64), (32, 32))
    assert model.grid.shape == (320 * 64, 2) and task.grid.shape == (32 * 32, 2)
    assert model.sam.export_cfg()["resize"] == "pil" and model.sam.hidden_size == 256
    bad = tmp_path / "sam_bad.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}, bad)
    with pytest.raises(CheckpointError, match="sam_bad.pth: missing segment-anything key 'image_encoder.pos_embed'"):
        resolve_data(replace(cfg, train=replace(cfg.train, task_cfg={**cfg.train.task_cfg, "sam": str(bad)})),
                     tmp_path / "cache")
