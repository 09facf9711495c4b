"""EoMT through transformers: sliding windows vs the image processor's split + post_process_semantic_segmentation,
one-window == plain forward, from_pretrained round trip, param groups (tiny random EomtConfig on CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import EomtConfig, EomtForUniversalSegmentation, EomtImageProcessor
from transformers.models.eomt.modeling_eomt import EomtForUniversalSegmentationOutput

from oodseg.models import check_partition, create_model, save_safetensors
from oodseg.models.eomt import window_starts
from oodseg.outputs import MaskOutputs

S = 32
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=S, patch_size=8, num_queries=6,
            num_blocks=1, num_register_tokens=1, num_labels=19, mlp_ratio=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("eomt", config=TINY, window_batch=2, upsample_masks=True).eval()


@pytest.fixture(scope="module")
def native(model):
    """The same weights, mask logits kept at their native S/4 resolution (the default)."""
    m = create_model("eomt", config=TINY).eval()
    m.load_state_dict(model.state_dict())
    return m


def processor() -> EomtImageProcessor:
    return EomtImageProcessor(size={"shortest_edge": S, "longest_edge": None}, do_split_image=True)


def stitch(out: MaskOutputs) -> torch.Tensor:
    """Reference stitching (docs/architecture.md): per-crop class scores Σ_q softmax·sigmoid at crop size, averaged over
    overlaps in the frame, bilinearly resized to ``size``. Returns [B, C, H, W]."""
    fh, fw = out.frame_size
    c = out.class_logits.shape[-1] - 1
    acc = torch.zeros(out.n_images, c, fh, fw)
    cnt = torch.zeros(out.n_images, 1, fh, fw)
    for n, (i, top, left, h, w) in enumerate(out.crops.tolist()):
        masks = F.interpolate(out.mask_logits[n : n + 1], size=(h, w), mode="bilinear", align_corners=False)[0]
        scores = torch.einsum("qc,qhw->chw", out.class_logits[n].softmax(-1)[:, :-1], masks.sigmoid())
        acc[i, :, top : top + h, left : left + w] += scores
        cnt[i, :, top : top + h, left : left + w] += 1
    return F.interpolate(acc / cnt, size=out.size, mode="bilinear", align_corners=False)


def test_window_starts_cover_and_overlap_evenly():
    assert window_starts(32, 32) == [0]
    assert window_starts(80, 32) == [0, 24, 48]  # 3 windows, 16 px total overlap spread evenly
    assert window_starts(64, 32) == [0, 32]
    for length in (33, 57, 100, 129):
        starts = window_starts(length, S)
        assert starts[0] == 0 and starts[-1] + S == length
    with pytest.raises(ValueError):
        window_starts(20, 32)


@pytest.mark.parametrize("hw", [(40, 100), (90, 36)])
def test_windows_match_image_processor_and_post_process(model, native, hw):
    h, w = hw
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    proc = processor()
    inputs = proc(images=list(imgs), return_tensors="pt")
    ours = model.predict(torch.from_numpy(imgs))
    # the same window placement (pixels: identical logits below)
    offsets = torch.stack(inputs["patch_offsets"])  # (image, start, end) along the long side
    long_axis_start = ours.crops[:, 1] if h > w else ours.crops[:, 2]
    assert torch.equal(ours.crops[:, 0], offsets[:, 0]) and torch.equal(long_axis_start, offsets[:, 1])
    assert bool((ours.crops[:, 3:] == S).all())
    with torch.no_grad():
        ref = model.hf(pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(ours.class_logits, ref.class_queries_logits, rtol=1e-4, atol=1e-4)
    up = F.interpolate(ref.masks_queries_logits, size=(S, S), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours.mask_logits, up, rtol=1e-4, atol=1e-4)
    low = native.predict(torch.from_numpy(imgs))
    torch.testing.assert_close(low.mask_logits, ref.masks_queries_logits, rtol=1e-4, atol=1e-4)
    # stitched class scores == the processor's post-processing on the HF outputs
    assert ours.size == (h, w) and ours.n_images == 2 and ours.batch_size == 2
    stitched = stitch(ours)
    assert stitched.shape == (2, 19, h, w)
    hf_out = EomtForUniversalSegmentationOutput(
        class_queries_logits=ref.class_queries_logits,
        masks_queries_logits=ref.masks_queries_logits,
        patch_offsets=inputs["patch_offsets"],
    )
    post = proc.post_process_semantic_segmentation(hf_out, target_sizes=[(h, w)] * 2, return_segmentation_scores=True)
    stitched_low = stitch(low)
    for i in range(2):
        torch.testing.assert_close(stitched[i], post[i].segmentation_scores, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stitched_low[i], post[i].segmentation_scores, rtol=1e-4, atol=1e-5)
        agree = (stitched[i].argmax(0) == post[i].segmentation).float().mean()
        assert agree > 0.999


def test_scoring_layer_stitching_agrees(model, native):
    """The scoring layer's pixel_class_scores on predict() outputs equals the reference stitching, whether the model
    hands over window-size or native-resolution mask logits."""
    from oodseg.scoring import pixel_class_scores

    img = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (1, 40, 100, 3), dtype=np.uint8))
    out = model.predict(img)
    ref = stitch(out)
    torch.testing.assert_close(pixel_class_scores(out).float(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pixel_class_scores(native.predict(img)).float(), ref, rtol=1e-4, atol=1e-5)


def test_one_window_equals_plain_forward(model):
    img = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 3, S, S), dtype=np.uint8))
    out = model.predict(img)
    assert out.crops.tolist() == [[0, 0, 0, S, S], [1, 0, 0, S, S]] and out.frame_size == (S, S)
    with torch.no_grad():
        plain = model(model.preprocess(img))
    torch.testing.assert_close(out.class_logits, plain.class_logits)
    up = F.interpolate(plain.mask_logits, size=(S, S), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.mask_logits, up)
    with pytest.raises(ValueError, match="image_size"):
        model(torch.zeros(1, 3, S, 2 * S))


def test_from_pretrained_dir_round_trip(tmp_path: Path):
    torch.manual_seed(4)
    hf = EomtForUniversalSegmentation(EomtConfig(**TINY)).eval()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    proc = EomtImageProcessor(size={"shortest_edge": S, "longest_edge": None}, do_split_image=True,
                              image_mean=mean, image_std=std)
    hf.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    ours = create_model("eomt", pretrained=str(tmp_path / "ckpt")).eval()
    img = np.random.default_rng(5).integers(0, 256, (1, 48, 70, 3), dtype=np.uint8)
    inputs = proc(images=list(img), return_tensors="pt")
    out = ours.predict(torch.from_numpy(img))
    with torch.no_grad():
        ref = hf(pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(out.class_logits, ref.class_queries_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.mask_logits, ref.masks_queries_logits, rtol=1e-4, atol=1e-4)
    # fine-tuning export → rebuild from the safetensors header alone
    path = save_safetensors(ours, tmp_path / "eomt.safetensors", {"recipe": "queries"})
    again = create_model(checkpoint=path).eval()
    out2 = again.predict(torch.from_numpy(img))
    torch.testing.assert_close(out2.class_logits, out.class_logits, rtol=0, atol=0)


def test_param_groups(model):
    groups = model.param_groups()
    check_partition(model, groups)
    assert groups["queries"] == [model.hf.query.weight]
    assert [k for k in groups if k.startswith("blocks.")] == ["blocks.0", "blocks.1", "blocks.2"]
    ids = {id(p) for p in groups["backbone"]}
    assert all(id(p) in ids for p in groups["blocks.2"])
    assert {id(p) for p in groups["blocks.2"]} == {id(p) for p in model.hf.layers[2].parameters()}
    head_ids = {id(p) for p in groups["head"]}
    assert id(model.hf.class_predictor.weight) in head_ids and id(model.hf.mask_head.fc1.weight) in head_ids


def test_offline_hub_id_fails_without_network(monkeypatch):
    """HF_HUB_OFFLINE=1: a hub id that is not cached fails at once (local_files_only) instead of downloading."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError):
        create_model("eomt", pretrained="tue-mps/cityscapes_semantic_eomt_large_1024")
    with pytest.raises(ValueError, match="pretrained=.*or config="):
        create_model("eomt")


def test_training_forward_reaches_every_group():
    torch.manual_seed(6)
    m = create_model("eomt", config=TINY).train()
    out = m(torch.randn(2, 3, S, S))
    assert out.class_logits.shape == (2, 6, 20) and out.mask_logits.shape == (2, 6, S // 2, S // 2)
    (out.class_logits.logsumexp(-1).sum() + out.mask_logits.sigmoid().sum()).backward()
    groups = m.param_groups()
    for name in ("queries", "head", "blocks.2"):
        assert all(p.grad is not None for p in groups[name]), name


def test_semantic_to_mask_labels_by_hand():
    from oodseg.models.eomt import semantic_to_mask_labels

    t = torch.tensor([[[0, 0, 255], [13, 254, 13]], [[255, 255, 255], [255, 2, 2]]])
    masks, classes = semantic_to_mask_labels(t, 19)
    assert classes[0].tolist() == [0, 13] and classes[1].tolist() == [2]
    assert masks[0].tolist() == [[[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [1, 0, 1]]]  # 255 / 254 pixels in no mask
    assert masks[1].tolist() == [[[0, 0, 0], [0, 1, 1]]]


def test_training_loss_is_eomts_own_mask_classification_loss(model):
    """forward_loss on EoMT: ``ce`` is transformers' mask-classification loss on the target's class masks,
    ``oe`` adds its outlier term, per-pixel-only losses are refused by name."""
    from oodseg.losses import create_loss, loss_info
    from oodseg.training.step import forward_loss

    rng = np.random.default_rng(7)
    images = torch.from_numpy(rng.integers(0, 256, (2, S, S, 3), dtype=np.uint8))
    target = torch.from_numpy(rng.choice([0, 1, 2, 8, 13, 254, 255], size=(2, S, S))).long()
    batch = {"images": images, "target": target, "outlier_mask": (target == 254).to(torch.uint8)}
    model.train()
    try:
        x = model.preprocess(images)
        masks = [torch.stack([(t == c).float() for c in sorted(set(t.unique().tolist()) - {254, 255})]) for t in target]
        classes = [torch.tensor(sorted(set(t.unique().tolist()) - {254, 255})) for t in target]
        torch.manual_seed(0)
        ref = model.hf(pixel_values=x, mask_labels=masks, class_labels=classes)
        torch.manual_seed(0)
        ce = forward_loss(model, batch, create_loss("ce"), combine=loss_info("ce").combine)
        torch.testing.assert_close(ce, ref.loss)
        oe_fn = create_loss("oe", weight=0.5)
        oe_term = oe_fn(MaskOutputs(ref.class_queries_logits, ref.masks_queries_logits), target,
                        batch["outlier_mask"])
        torch.manual_seed(0)
        oe = forward_loss(model, batch, oe_fn, combine=loss_info("oe").combine)
        torch.testing.assert_close(oe, ref.loss + oe_term)
        model.zero_grad()
        oe.backward()
        assert model.hf.query.weight.grad is not None and bool(model.hf.query.weight.grad.abs().sum() > 0)
        with pytest.raises(TypeError, match="(?i)logitnorm|MaskOutputs"):
            forward_loss(model, batch, create_loss("logitnorm"))
    finally:
        model.zero_grad()
        model.eval()
