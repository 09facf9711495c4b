"""segment-anything-format SAM checkpoints through ``create_sam(path.pth)`` against the ``segment-anything`` package.

Each reference is a randomly initialised ``segment_anything.modeling.Sam`` built by the package itself (seeded; its
constant-initialised tensors, e.g. the zero relative-position tables, get seeded noise so every tensor is distinct and
a swapped key cannot hide), saved with ``torch.save(sam.state_dict())`` as the official ``.pth`` files are. What is
compared, on the same uint8 RGB image and the same prompts in original pixels:

* low-resolution mask logits (``SamPredictor.predict_torch(..., return_logits=True)``'s ``low_res_masks`` vs
  ``SamModel``'s ``pred_masks`` on :meth:`SamSegmenter.embed`'s embedding) and the predicted IoUs, ≤ 1e-5;
* the full-resolution logits (SAM's ``postprocess_masks`` vs :meth:`SamSegmenter.mask_logits_from_boxes` /
  ``mask_logits_from_points``), ≤ 1e-5.

Both sides preprocess the image themselves (segment-anything: ``ResizeLongestSide`` = PIL bilinear, then
``(x − pixel_mean) / pixel_std`` and zero padding; ours: ``SamImageProcessorPil``), so the comparison covers the
whole path; the embeddings differ by float32 rounding of the normalisation only.
"""

from __future__ import annotations

import argparse
from functools import partial

import numpy as np
import pytest
import torch

from oodseg.models.checkpoint import CheckpointError
from oodseg.models.sam import check_sam, create_sam, save_sam, to_input_frame
from oodseg.models.sam_convert import read_segment_anything, sam_config

sa = pytest.importorskip("segment_anything")
from segment_anything.build_sam import _build_sam
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

TOL = 1e-5
BOXES = torch.tensor([[10.0, 20.0, 150.0, 250.0], [50.0, 5.0, 190.0, 100.0], [0.0, 0.0, 199.0, 299.0]])
POINTS = torch.tensor([[[30.0, 40.0], [100.0, 200.0]], [[150.0, 250.0], [20.0, 20.0]], [[5.5, 290.25], [0, 0]]])
LABELS = torch.tensor([[1, 0], [1, 1], [1, -1]])


def _small_sam() -> Sam:
    """A non-default layout: 256 input, width 48, 3 heads, depth 3, global blocks (0, 2), window 5 (the 16-cell grid
    is padded to 20 inside windowed blocks), prompt width 64, decoder MLP 128."""
    return Sam(
        image_encoder=ImageEncoderViT(img_size=256, patch_size=16, embed_dim=48, depth=3, num_heads=3, mlp_ratio=4,
                                      out_chans=64, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                      use_rel_pos=True, window_size=5, global_attn_indexes=(0, 2)),
        prompt_encoder=PromptEncoder(embed_dim=64, image_embedding_size=(16, 16), input_image_size=(256, 256),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=64, iou_head_depth=3, iou_head_hidden_dim=64,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=64, mlp_dim=128, num_heads=8)),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


BUILDERS = {
    # segment-anything's own builder: SAM's 1024 input, window 14, prompt/decoder sizes; a tiny encoder
    "builder-1024": lambda: _build_sam(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                                       encoder_global_attn_indexes=[1]),
    "small-256": _small_sam,
}


def _reference(name: str, seed: int = 0) -> Sam:
    torch.manual_seed(seed)
    ref = BUILDERS[name]().eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.min() == p.max():  # zeros / ones at init: perturb so that every tensor is distinct
                p.add_(torch.randn_like(p) * 0.1)
    return ref


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def pair(request, tmp_path_factory):
    """(segment-anything predictor with the image set, our SamSegmenter from the saved .pth, its SamImage)."""
    ref = _reference(request.param)
    path = tmp_path_factory.mktemp(request.param) / "sam_ref.pth"
    torch.save(ref.state_dict(), path)
    image = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    predictor = sa.SamPredictor(ref)
    predictor.set_image(image)
    ours = create_sam(str(path))
    return predictor, ours, ours.embed(image)


def test_box_prompts_match_segment_anything(pair):
    predictor, ours, img = pair
    assert img.input_size == predictor.input_size and img.original_size == predictor.original_size
    with torch.no_grad():
        ref_full, ref_iou, ref_low = predictor.predict_torch(
            None, None, boxes=predictor.transform.apply_boxes_torch(BOXES, img.original_size),
            multimask_output=False, return_logits=True)
        out = ours.model(image_embeddings=img.embeddings, multimask_output=False,
                         input_boxes=to_input_frame(BOXES, img.original_size, img.input_size)[None])
        full, iou = ours.mask_logits_from_boxes(img, BOXES)
    assert ref_low.abs().max() > 0.05 and 0.05 < (ref_low > 0).float().mean() < 0.95  # not a degenerate output
    torch.testing.assert_close(out.pred_masks[0], ref_low, atol=TOL, rtol=0)
    torch.testing.assert_close(out.iou_scores[0], ref_iou, atol=TOL, rtol=0)
    torch.testing.assert_close(full, ref_full, atol=TOL, rtol=0)
    torch.testing.assert_close(iou, ref_iou, atol=TOL, rtol=0)


def test_point_prompts_match_segment_anything(pair):
    predictor, ours, img = pair
    with torch.no_grad():
        ref_full, ref_iou, ref_low = predictor.predict_torch(
            predictor.transform.apply_coords_torch(POINTS, img.original_size), LABELS, multimask_output=True,
            return_logits=True)
        out = ours.model(image_embeddings=img.embeddings, input_labels=LABELS[None], multimask_output=True,
                         input_points=to_input_frame(POINTS, img.original_size, img.input_size)[None])
        full, iou, _ = ours.mask_logits_from_points(img, POINTS, LABELS)
    assert ref_low.shape[1] == 3 and ref_low.abs().max() > 0.05
    torch.testing.assert_close(out.pred_masks[0], ref_low, atol=TOL, rtol=0)
    torch.testing.assert_close(out.iou_scores[0], ref_iou, atol=TOL, rtol=0)
    torch.testing.assert_close(full, ref_full, atol=TOL, rtol=0)
    torch.testing.assert_close(iou, ref_iou, atol=TOL, rtol=0)


@pytest.mark.parametrize(("builder", "width", "depth", "heads", "global_idx"), [
    (sa.build_sam_vit_b, 768, 12, 12, [2, 5, 8, 11]),
    (sa.build_sam_vit_l, 1024, 24, 16, [5, 11, 17, 23]),
    (sa.build_sam_vit_h, 1280, 32, 16, [7, 15, 23, 31]),
])
def test_released_sizes_are_read_off_the_weights(builder, width, depth, heads, global_idx, tmp_path):
    """The official builders on the meta device (no memory, no compute): their state dicts map onto a SamModel of
    the right size; ViT-B equals transformers' default SamConfig (the facebook/sam-vit-base architecture)."""
    from transformers import SamConfig, SamModel

    from oodseg.models.sam_convert import check_converted, convert_state_dict

    with torch.device("meta"):
        state = builder().state_dict()
    cfg = sam_config(state, "meta.pth")
    v = cfg.vision_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, list(v.global_attn_indexes)) == (
        width, depth, heads, global_idx)
    assert (v.window_size, v.image_size, v.patch_size, v.mlp_dim, v.output_channels) == (14, 1024, 16, 4 * width, 256)
    d = cfg.mask_decoder_config
    assert (d.hidden_size, d.num_attention_heads, d.mlp_dim, d.num_hidden_layers, d.iou_head_depth) == (
        256, 8, 2048, 2, 3)
    with torch.device("meta"):
        own = SamModel(cfg).state_dict()
    check_converted(own, convert_state_dict(state, "meta.pth"), "meta.pth")
    if width == 768:
        default = SamConfig().vision_config
        for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "global_attn_indexes", "window_size",
                      "mlp_dim", "image_size", "num_pos_feats"):
            got, want = getattr(v, field), getattr(default, field)
            assert (list(got) if field == "global_attn_indexes" else got) == (
                list(want) if field == "global_attn_indexes" else want), field


def _weights_equal(a, b) -> bool:
    sa_, sb = a.model.state_dict(), b.model.state_dict()
    return sa_.keys() == sb.keys() and all(torch.equal(sa_[k], sb[k]) for k in sa_)


def test_wrapped_and_saom_checkpoints_load_the_same_weights(tmp_path):
    """Bare, ``{"model": ...}``, ``{"state_dict": ...}`` with DDP's ``module.`` prefix, and SAOM's training checkpoint
    (``{"model": SamWrapper.state_dict(), "optimizer", "epoch", "args": Namespace}``: SAM under ``model.``, a
    ``classifier`` head) all give the same SAM."""
    state = _reference("small-256", seed=1).state_dict()
    bare = tmp_path / "bare.pth"
    torch.save(state, bare)
    saom = {"model": {**{f"model.{k}": v for k, v in state.items()}, "classifier.weight": torch.zeros(55, 64),
                      "classifier.bias": torch.zeros(55)},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "eps": 1e-4}]}, "epoch": 3,
            "args": argparse.Namespace(lr=1e-3, batch_size=1, outdir="out")}
    variants = {"model.pth": {"model": state}, "ddp.pt": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
                "saom.pth": saom}
    ref = create_sam(str(bare))
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        check_sam(str(tmp_path / name))
        assert _weights_equal(create_sam(str(tmp_path / name), prompt_batch=5), ref), name


def test_export_keeps_segment_anything_preprocessing(tmp_path):
    """A converted SAM saved with save_sam (e.g. after SAOM fine-tuning) reloads with the PIL resize and equal masks."""
    path = tmp_path / "s.pth"
    torch.save(_reference("small-256", seed=2).state_dict(), path)
    sam = create_sam(str(path))
    assert sam.export_cfg()["resize"] == "pil" and create_sam("tiny").export_cfg()["resize"] == "torchvision"
    again = create_sam(str(save_sam(sam, tmp_path / "s.safetensors")))
    assert type(again.image_processor) is type(sam.image_processor) and _weights_equal(again, sam)
    image = np.random.default_rng(5).integers(0, 256, (61, 97, 3), dtype=np.uint8)
    a, b = sam.embed(image), again.embed(image)
    torch.testing.assert_close(a.embeddings, b.embeddings, atol=0, rtol=0)


def _one_line_error(fn, *needles):
    with pytest.raises(CheckpointError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_bad_segment_anything_files_fail_in_one_line(tmp_path):
    state = _reference("small-256", seed=3).state_dict()
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x02 not a checkpoint" * 10)
    missing = dict(state)
    del missing["mask_decoder.iou_token.weight"]
    extra = {**state, "image_encoder.blocks.0.attn.scale": torch.ones(1)}
    shaped = {**state, "mask_decoder.mask_tokens.weight": torch.zeros(4, 65)}
    other = {"backbone.weight": torch.zeros(3)}
    cases = {"garbage.pth": (None, ["garbage.pth", "weights_only=True"]),
             "missing.pth": (missing, ["missing.pth", "mask_decoder.iou_token.weight"]),
             "extra.pth": (extra, ["extra.pth", "image_encoder.blocks.0.attn.scale"]),
             "shaped.pth": (shaped, ["shaped.pth", "mask_decoder.mask_tokens.weight"]),
             "other.pth": (other, ["other.pth", "not a segment-anything SAM"])}
    for name, (obj, needles) in cases.items():
        if obj is not None:
            torch.save(obj, tmp_path / name)
        _one_line_error(lambda n=name: create_sam(str(tmp_path / n)), *needles)
        _one_line_error(lambda n=name: check_sam(str(tmp_path / n)), *needles)
    _one_line_error(lambda: create_sam(str(tmp_path / "absent.pth")), "absent.pth", "not found")
    assert read_segment_anything(tmp_path / "extra.pth", meta=True)["image_encoder.pos_embed"].is_meta


def test_benchmark_refine_check_takes_a_pth_sam(tmp_path):
    """The benchmark's pre-Ray refine check (prepare.check_refine_models) accepts a segment-anything .pth and rejects
    a garbage one in one line."""
    from oodseg.platform.benchmark.prepare import check_refine_models

    good = tmp_path / "sam_vit_x.pth"
    torch.save(_reference("small-256", seed=4).state_dict(), good)
    check_refine_models(str(good), {})
    bad = tmp_path / "sam_bad.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}, bad)
    _one_line_error(lambda: check_refine_models(str(bad), {}), "sam_bad.pth", "image_encoder.pos_embed")


def test_everything_with_crop_layers_matches_segment_anything(tmp_path):
    """SAOM's everything mode (explicit ``point_grids``, one crop layer) against ``SamAutomaticMaskGenerator`` on the
    same converted weights: same masks and predicted IoUs. With this random model every sub-crop mask touches a crop
    edge, so the crop-edge filter removes them on both sides; its rule and the crop layout are compared with
    segment-anything's own helpers on hand-made boxes below."""
    from oodseg.models.saom import point_grid
    from oodseg.refine.everything import generate_everything

    ref = _reference("small-256", seed=7)
    torch.save(ref.state_dict(), tmp_path / "amg.pth")
    ours = create_sam(str(tmp_path / "amg.pth"))
    image = np.random.default_rng(3).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    grids = [point_grid(6, 5), point_grid(4, 3)]
    for nms in (1.0, 0.9):
        kw = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": nms, "crop_nms_thresh": nms,
              "crop_n_layers": 1, "point_grids": grids, "points_per_batch": 16}
        gen = sa.SamAutomaticMaskGenerator(ref, points_per_side=None, stability_score_offset=0.01, output_mode=
                                           "binary_mask", min_mask_region_area=0, crop_overlap_ratio=512 / 1500, **kw)
        anns = sorted(gen.generate(image), key=lambda a: -a["predicted_iou"])
        masks, scores = generate_everything(ours, image, min_area=0, stability_offset=0.01, **kw)
        assert len(masks) == len(anns) > 0
        torch.testing.assert_close(scores, torch.tensor([a["predicted_iou"] for a in anns]), atol=TOL, rtol=0)
        ref_masks = torch.stack([torch.as_tensor(a["segmentation"]) for a in anns])
        assert (masks != ref_masks).float().mean() < 1e-4  # pixels whose logit is within float noise of 0


def test_crop_layout_and_edge_rule_match_segment_anything():
    from segment_anything.utils.amg import generate_crop_boxes, is_box_near_crop_edge

    from oodseg.refine.everything import crop_boxes, near_crop_edge

    for (h, w), layers, overlap in [((120, 160), 1, 512 / 1500), ((1024, 2048), 2, 512 / 1500), ((77, 50), 3, 0.2)]:
        assert crop_boxes(h, w, layers, overlap) == generate_crop_boxes((h, w), layers, overlap)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, [160, 120, 160, 120], size=(200, 4))
    boxes = torch.tensor(np.concatenate([np.minimum(xy[:, :2], xy[:, 2:]), np.maximum(xy[:, :2], xy[:, 2:])], 1))
    for crop in ([0, 0, 91, 69], [69, 51, 160, 120], [0, 0, 160, 120]):
        local = boxes - torch.tensor(crop[:2] * 2)  # segment-anything takes crop-frame boxes and uncrops them
        want = is_box_near_crop_edge(local.float(), crop, [0, 0, 160, 120])
        assert torch.equal(near_crop_edge(boxes, crop, [0, 0, 160, 120]), want)
        assert 0 < int(want.sum()) < 200 or crop == [0, 0, 160, 120]
