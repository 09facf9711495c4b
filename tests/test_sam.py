"""SamSegmenter against transformers' own reference path (SamProcessor + SamModel on the full input)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from oodseg.models.base import check_partition
from oodseg.models.checkpoint import CheckpointError
from oodseg.models.sam import SamImage, create_sam, save_sam, to_input_frame


@pytest.fixture(scope="module")
def sam():
    return create_sam("tiny", seed=0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (100, 77, 3), dtype=np.uint8)  # portrait, not square


def _boxes(rng: np.random.Generator, k: int, h: int, w: int) -> np.ndarray:
    xy = rng.uniform(0, [w - 1, h - 1, w - 1, h - 1], size=(k, 4))
    return np.concatenate([np.minimum(xy[:, :2], xy[:, 2:]), np.maximum(xy[:, :2], xy[:, 2:])], 1).astype(np.float32)


def _reference(sam, image, **prompts):
    """transformers' documented path: processor on image + prompts, one full SamModel forward."""
    inputs = sam.processor(images=image, return_tensors="pt", **prompts)
    kw = {k: inputs[k].float() if k != "input_labels" else inputs[k] for k in ("input_boxes", "input_points",
                                                                                  "input_labels") if k in inputs}
    with torch.no_grad():
        out = sam.model(pixel_values=inputs["pixel_values"], multimask_output="input_points" in kw, **kw)
    logits = sam.processor.post_process_masks(out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"],
                                              binarize=False)[0]
    return inputs, out, logits


def test_embedding_reuse_matches_reference_boxes(sam, image):
    boxes = _boxes(np.random.default_rng(1), 5, *image.shape[:2])
    inputs, out, logits = _reference(sam, image, input_boxes=[boxes.tolist()])
    img = sam.embed(image)
    assert isinstance(img, SamImage) and img.original_size == (100, 77)
    assert img.input_size == tuple(int(v) for v in inputs["reshaped_input_sizes"][0]) == (128, 99)
    torch.testing.assert_close(img.embeddings, sam.model.get_image_embeddings(inputs["pixel_values"]))
    masks, iou = sam.masks_from_boxes(img, boxes)
    assert masks.dtype == torch.bool and masks.shape == (5, 100, 77) and iou.shape == (5,)
    torch.testing.assert_close(iou, out.iou_scores[0, :, 0])
    ref = logits[:, 0]
    decided = ref.abs() > 1e-4  # pixels whose reference logit is not within float noise of the threshold
    assert torch.equal(masks[decided], ref[decided] > 0)
    assert 0 < masks.float().mean() < 1


@pytest.mark.parametrize("size", [(100, 77), (50, 200), (128, 128), (33, 47)])
def test_prompt_coordinates_rescaled_like_processor(sam, size):
    h, w = size
    image = np.zeros((h, w, 3), np.uint8)
    rng = np.random.default_rng(2)
    boxes = _boxes(rng, 3, h, w)
    points = rng.uniform(0, [w, h], size=(3, 2, 2))
    inputs = sam.processor(images=image, input_boxes=[boxes.tolist()], input_points=[points.tolist()],
                           input_labels=[[[1, 0]] * 3], return_tensors="pt")
    input_size = tuple(int(v) for v in inputs["reshaped_input_sizes"][0])
    got_b = to_input_frame(torch.as_tensor(boxes, dtype=torch.float64), (h, w), input_size)
    got_p = to_input_frame(torch.as_tensor(points), (h, w), input_size)
    torch.testing.assert_close(got_b, inputs["input_boxes"][0].double())
    torch.testing.assert_close(got_p, inputs["input_points"][0].double())
    assert max(input_size) == 128


def test_points_multimask_logits_and_iou_token(sam, image):
    rng = np.random.default_rng(3)
    points = rng.uniform(0, [77, 100], size=(4, 2, 2)).astype(np.float32)
    labels = np.array([[1, 0], [1, 1], [1, -1], [0, 1]])
    _, out, ref = _reference(sam, image, input_points=[points.tolist()], input_labels=[labels.tolist()])
    img = sam.embed(image)
    sam.prompt_batch = 3  # chunking must not change anything
    try:
        logits, iou, token = sam.mask_logits_from_points(img, points, labels, multimask=True)
    finally:
        sam.prompt_batch = 64
    assert logits.shape == (4, 3, 100, 77) and iou.shape == (4, 3) and token.shape == (4, sam.hidden_size)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(iou, out.iou_scores[0])
    # the hooked token is what the IoU head reads: its output (4 slots) restricted to the multimask slots = iou
    head_out = sam.model.mask_decoder.iou_prediction_head(token)
    torch.testing.assert_close(head_out[:, 1:], iou)
    single, iou1, _ = sam.mask_logits_from_points(img, points, labels, multimask=False)
    assert single.shape == (4, 1, 100, 77) and iou1.shape == (4, 1)
    torch.testing.assert_close(iou1[:, 0], head_out[:, 0])
    # differentiable at the original resolution
    logits.sum().backward()
    grads = [p.grad for p in sam.model.mask_decoder.output_hypernetworks_mlps.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    sam.model.zero_grad(set_to_none=True)


def test_zero_and_many_boxes(sam, image):
    img = sam.embed(image)
    masks, iou = sam.masks_from_boxes(img, np.zeros((0, 4), np.float32))
    assert masks.shape == (0, 100, 77) and masks.dtype == torch.bool and iou.shape == (0,)
    logits, ious, tok = sam.mask_logits_from_points(img, np.zeros((0, 1, 2)), np.zeros((0, 1)))
    assert logits.shape == (0, 3, 100, 77) and ious.shape == (0, 3) and tok.shape == (0, sam.hidden_size)
    boxes = _boxes(np.random.default_rng(4), 300, 100, 77)
    many, many_iou = sam.masks_from_boxes(img, torch.as_tensor(boxes))  # 5 chunks of 64
    assert many.shape == (300, 100, 77) and many_iou.shape == (300,)
    sub, sub_iou = sam.masks_from_boxes(img, boxes[130:135])  # a chunk boundary (128) lies before it
    assert torch.equal(many[130:135], sub)
    torch.testing.assert_close(many_iou[130:135], sub_iou)
    with pytest.raises(ValueError, match=r"\[K, 4\]"):
        sam.masks_from_boxes(img, np.zeros((3, 2)))


def test_param_groups_partition(sam):
    groups = sam.param_groups()
    assert {"encoder", "prompt_points", "prompt_other", "decoder"} <= set(groups)
    check_partition(sam.model, groups)
    assert any(p is sam.model.prompt_encoder.point_embed[1].weight for p in groups["prompt_points"])
    assert not any(p is sam.model.mask_decoder.iou_prediction_head.layers[0].weight for p in groups["decoder"])


def test_safetensors_round_trip(sam, image, tmp_path):
    path = save_sam(sam, tmp_path / "sam.safetensors", {"note": "x", "step": 3})
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    assert json.loads(header["oodseg.sam"]) == json.loads(json.dumps(sam.export_cfg()))
    assert header["note"] == "x" and header["step"] == "3"
    loaded = create_sam(str(path), prompt_batch=7)
    assert loaded.prompt_batch == 7 and loaded.pad_size == sam.pad_size
    boxes = _boxes(np.random.default_rng(5), 4, 100, 77)
    a, ia = sam.masks_from_boxes(sam.embed(image), boxes)
    b, ib = loaded.masks_from_boxes(loaded.embed(image), boxes)
    assert torch.equal(a, b) and torch.equal(ia, ib)
    for k, v in sam.model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k


def test_safetensors_key_mismatch_is_named(sam, tmp_path):
    state = {k: v.clone().contiguous() for k, v in sam.model.state_dict().items()}
    state.pop("mask_decoder.iou_token.weight")
    state["extra.weight"] = torch.zeros(2)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata={"oodseg.sam": json.dumps(sam.export_cfg())})
    with pytest.raises(CheckpointError) as err:
        create_sam(str(bad))
    msg = str(err.value)
    assert str(bad) in msg and "mask_decoder.iou_token.weight" in msg and "extra.weight" in msg
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(1)}, str(plain))
    with pytest.raises(CheckpointError, match=r"oodseg\.sam"):
        create_sam(str(plain))


def test_local_transformers_directory(sam, image, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sam.model.save_pretrained(tmp_path / "hf")
    sam.processor.save_pretrained(tmp_path / "hf")
    loaded = create_sam(str(tmp_path / "hf"))
    boxes = _boxes(np.random.default_rng(6), 3, 100, 77)
    assert torch.equal(loaded.masks_from_boxes(loaded.embed(image), boxes)[0],
                       sam.masks_from_boxes(sam.embed(image), boxes)[0])
    assert loaded.export_cfg()["pad_size"] == [128, 128]


def test_bad_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not found"):
        create_sam(str(tmp_path / "missing.safetensors"))
    txt = tmp_path / "weights.txt"
    txt.write_text("x")
    with pytest.raises(CheckpointError, match="not a SAM source"):
        create_sam(str(txt))
    with pytest.raises(ValueError, match="no-such-org/no-such-sam"):
        create_sam("no-such-org/no-such-sam")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="empty_dir"):
        create_sam(str(tmp_path / "empty_dir"))
    with pytest.raises(TypeError, match="imgsize"):
        create_sam("tiny", imgsize=64)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        create_sam("tiny", image_size=100)
    with pytest.raises(ValueError, match="uint8"):
        create_sam("tiny").embed(np.zeros((8, 8, 3), np.float32))


def test_tiny_is_seeded_and_sized():
    a, b, c = create_sam("tiny", seed=1, image_size=64), create_sam("tiny", seed=1, image_size=64), create_sam(
        "tiny", seed=2, image_size=64)
    w = "mask_decoder.iou_token.weight"
    assert torch.equal(a.model.state_dict()[w], b.model.state_dict()[w])
    assert not torch.equal(a.model.state_dict()[w], c.model.state_dict()[w])
    img = a.embed(np.zeros((30, 64, 3), np.uint8))
    assert img.embeddings.shape[-2:] == (4, 4) and img.input_size == (30, 64) and a.pad_size == (64, 64)
