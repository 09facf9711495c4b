"""The mask2former model (tiny random Swin config on CPU): MaskOutputs in the reference's inference order (padding,
test-size resize), every mask scorer incl. RbA and both temperature placements, local-directory and safetensors
round trips, parameter groups, and fine-tuning on its own mask-classification loss with the OE losses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oodseg.losses import create_loss, loss_info
from oodseg.models import check_partition, create_model, list_models, model_output_kind, save_safetensors
from oodseg.models.mask2former import shortest_edge_size
from oodseg.outputs import MaskOutputs
from oodseg.scoring import create_scorer, default_scorers, pixel_class_scores, scorer_applies
from oodseg.training.params import select_parameters
from oodseg.training.step import forward_loss


def tiny(**cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("mask2former", backbone="tiny", **cfg).eval()


def images(h: int = 70, w: int = 100, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8))


def reference_scores(model, img: torch.Tensor, test_size=None) -> torch.Tensor:
    """detectron2 MaskFormer semantic inference, written out: (ResizeShortestEdge), normalise, zero-pad to 32, mask
    logits → padded size (bilinear), sigmoid, Σ_q softmax(class)[:-1]·mask, crop to the image, resize to (H, W)."""
    x = img.permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    if test_size:
        from torchvision.transforms.v2 import functional as tvF

        x = tvF.resize(x, list(shortest_edge_size(h, w, *test_size)), antialias=True)
    fh, fw = x.shape[-2:]
    ph, pw = -(-fh // 32) * 32, -(-fw // 32) * 32
    x = F.pad((x.float() - model.pixel_mean) / model.pixel_std, (0, pw - fw, 0, ph - fh))
    with torch.no_grad():
        out = model.hf(pixel_values=x)
    masks = F.interpolate(out.masks_queries_logits, size=(ph, pw), mode="bilinear", align_corners=False).sigmoid()
    sem = torch.einsum("nqc,nqhw->nchw", out.class_queries_logits.softmax(-1)[..., :-1], masks)[..., :fh, :fw]
    return F.interpolate(sem, size=(h, w), mode="bilinear", align_corners=False)


def test_registered_as_a_mask_model():
    assert "mask2former" in list_models() and model_output_kind("mask2former") == "mask"


@pytest.mark.parametrize("hw,test_size", [((70, 100), None), ((64, 96), None), ((70, 100), (48, 80))])
def test_predict_follows_the_reference_inference_order(hw, test_size):
    model = tiny(test_size=test_size)
    img = images(*hw)
    out = model.predict(img)
    assert isinstance(out, MaskOutputs) and out.size == hw and out.batch_size == 2
    assert out.class_logits.shape == (2, 8, 20) and out.crops[:, 0].tolist() == [0, 1]
    if hw == (64, 96):  # no padding: mask logits stay at 1/4 resolution
        assert out.mask_logits.shape[-2:] == (16, 24)
    torch.testing.assert_close(pixel_class_scores(out), reference_scores(model, img, test_size), rtol=1e-4, atol=1e-5)


def test_every_mask_scorer_applies_with_both_placements():
    model = tiny(arch={"num_feature_levels": 1})
    out = model.predict(images())
    ref = reference_scores(model, images())
    for name in default_scorers():  # the scorers that need no training-split fit (tests/test_contracts.py: the rest)
        if not scorer_applies(name, model.ood_channels):
            assert name == "p_ood"
            continue
        for placement in ("cl", "pl"):
            scores = create_scorer(name, temperature=2.0, placement=placement)(out)
            assert scores.shape == (2, 70, 100) and torch.isfinite(scores).all(), (name, placement)
    torch.testing.assert_close(create_scorer("rba")(out), -ref.tanh().sum(1), rtol=1e-4, atol=1e-4)


def test_local_directory_and_safetensors_round_trip(tmp_path: Path):
    from transformers import Mask2FormerImageProcessor

    model = tiny(arch={"num_feature_levels": 2})
    model.hf.save_pretrained(str(tmp_path / "dir"))
    Mask2FormerImageProcessor(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], size_divisor=64,
                              size={"shortest_edge": 48, "longest_edge": 96}).save_pretrained(str(tmp_path / "dir"))
    loaded = create_model("mask2former", pretrained=str(tmp_path / "dir"), test_size="checkpoint").eval()
    assert loaded._mean == [0.5, 0.4, 0.3] and loaded.size_divisibility == 64 and loaded.test_size == (48, 96)
    for a, b in zip(model.hf.state_dict().values(), loaded.hf.state_dict().values()):
        assert torch.equal(a, b)
    path = save_safetensors(loaded, tmp_path / "m2f.safetensors", {"recipe": "queries"})
    again = create_model(checkpoint=path).eval()
    x, y = loaded.predict(images()), again.predict(images())
    assert again.test_size == (48, 96) and y.frame_size == (48, 69)
    torch.testing.assert_close(x.class_logits, y.class_logits)
    torch.testing.assert_close(x.mask_logits, y.mask_logits)
    with pytest.raises(ValueError, match="test_size"):
        tiny(test_size="checkpoint")


def test_param_groups_partition_and_blocks_run_input_to_output():
    model = tiny()
    groups = model.param_groups()
    check_partition(model, groups)
    names = {id(p): n for n, p in model.hf.named_parameters()}
    blocks = sorted((int(k.split(".")[1]), k) for k in groups if k.startswith("blocks."))
    assert [i for i, _ in blocks] == list(range(7))  # 4 Swin stages, pixel decoder, 2 decoder layers
    assert all("pixel_level_module.encoder" in names[id(p)] for p in groups["blocks.0"])
    assert all("transformer_module.decoder.layers.1." in names[id(p)] for p in groups["blocks.6"])
    assert {names[id(p)] for p in groups["queries"]} == {"model.transformer_module.queries_features.weight",
                                                         "model.transformer_module.queries_embedder.weight"}


@pytest.mark.parametrize("spec,loss", [("queries", "oe"), ("head", "ce"), ("last_k:2", "energy_oe"), ("lora", "oe")])
def test_finetunes_on_its_own_loss_plus_oe(spec, loss):
    """A few AdamW steps on a fixed batch with pasted outliers (254): finite loss, gradients only on the selected
    parameters, and the loss goes down."""
    model = tiny()
    model.hf.config.train_num_points = 256
    params = select_parameters(model, spec, lora_rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and len(trainable) < len(list(model.parameters()))
    target = torch.randint(0, 4, (2, 64, 96))
    target[:, 20:40, 30:60] = 254
    batch = {"images": images(64, 96), "target": target}
    loss_fn = create_loss(loss)
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        torch.manual_seed(1)  # the same sampled points every step
        opt.zero_grad()
        value = forward_loss(model, batch, loss_fn, combine=loss_info(loss).combine)
        value.backward()
        assert torch.isfinite(value)
        assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
        assert any(float(p.grad.abs().sum()) > 0 for p in params)
        opt.step()
        losses.append(float(value.detach()))
    assert losses[-1] < losses[0], losses
