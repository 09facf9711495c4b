"""timm_seg: forward shapes on CNN and ViT backbones, preprocessing from timm's data config, param-group partition,
IsoMax+ head, safetensors round trip (tiny timm models, pretrained=False: no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from oodseg.models import check_partition, create_model, save_safetensors
from oodseg.outputs import PixelLogits


@pytest.mark.parametrize(
    "backbone,hw",
    [("test_resnet", (45, 70)), ("test_convnext", (64, 96)), ("test_vit", (40, 72))],
)
def test_forward_shapes_and_param_groups(backbone, hw):
    model = create_model("timm_seg", backbone=backbone, num_classes=7, decoder_channels=16).eval()
    x = torch.randn(2, 3, *hw)
    out = model(x)
    assert isinstance(out, PixelLogits) and out.logits.shape == (2, 7, *hw)
    groups = model.param_groups()
    check_partition(model, groups)  # backbone / decoder / head: no overlap, nothing missing
    top = [groups[k] for k in ("backbone", "decoder", "head")]
    assert sum(len(g) for g in top) == len(list(model.parameters()))
    blocks = sorted((k for k in groups if k.startswith("blocks.")), key=lambda k: int(k.split(".")[1]))
    assert groups[blocks[-1]] == list(model.decoder.parameters())
    if "vit" in backbone:
        assert len(blocks) == len(model.backbone.model.blocks) + 1
    # every parameter receives a gradient (no unused parameters under DDP)
    out.logits.sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize(
    "backbone,mean,std",
    [  # published pretrained configs: ConvNeXt → ImageNet statistics, AugReg ViT → 0.5 / 0.5
        ("convnext_atto", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ("vit_tiny_patch16_224", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ],
)
def test_preprocess_uses_timm_data_config(backbone, mean, std):
    model = create_model("timm_seg", backbone=backbone, num_classes=3, decoder_channels=8)
    img = np.random.default_rng(0).integers(0, 256, (1, 20, 30, 3), dtype=np.uint8)
    x = model.preprocess(torch.from_numpy(img)).numpy().transpose(0, 2, 3, 1)
    ref = (img / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)
    out = model.eval().predict(torch.from_numpy(img))
    assert out.size == (20, 30) and out.logits.shape == (1, 3, 20, 30)


def test_isomax_head_and_safetensors_round_trip(tmp_path: Path):
    model = create_model("timm_seg", backbone="test_resnet", num_classes=4, decoder_channels=16, head="isomax").eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        a = model(x).logits
    assert bool((a <= 0).all())  # −|s|·distance
    path = save_safetensors(model, tmp_path / "t.safetensors", {"epoch": 1})
    again = create_model(checkpoint=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, a, rtol=0, atol=0)
