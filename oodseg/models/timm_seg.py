"""``timm_seg``: a per-pixel segmentation model on any timm backbone (pixel logits).

* Backbone: ``timm.create_model(backbone, features_only=True, out_indices=...)`` — CNN stages (ResNet, ConvNeXt, ...)
  or ViT patch tokens reshaped to a grid (timm's ``FeatureGetterNet``, e.g. ``vit_small_patch14_dinov2``; built with
  ``dynamic_img_size=True`` so any input size works). ``pretrained``: ``False``, ``True`` (timm's hub weights) or a
  local weights file (``pretrained_cfg_overlay=dict(file=...)``; timm reads it with ``weights_only=True``).
* Decoder (FPN-style, Lin et al. CVPR 2017, without the extra levels): 1×1 lateral conv per feature level to
  ``decoder_channels``, top-down pathway (bilinear upsample the coarser map to the finer one and add), then a 3×3
  conv + GroupNorm + ReLU at the finest level.
* Head: 1×1 conv to ``num_classes`` (``head="linear"``) or :class:`~oodseg.models.heads.IsoMaxPlusHead`
  (``head="isomax"``); logits are bilinearly upsampled to the input resolution.
* Input convention: timm's pretrained data config of the backbone (``resolve_model_data_config``: RGB/255, its
  ``mean`` / ``std``). The input is zero-padded at the bottom/right to a multiple of the largest feature stride (ViTs
  need whole patches) and the logits are cropped back. ``predict`` optionally resizes to ``input_size`` first.

``param_groups()``: ``backbone`` (timm model), ``decoder`` (laterals + fuse), ``head``; ``blocks.<i>`` = the
backbone's blocks in forward order (ViT: its transformer blocks; CNNs: the feature wrapper's stem/stage modules)
followed by the decoder as the last block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oodseg.models.base import SegModel, to_nchw_uint8
from oodseg.models.factory import register_model
from oodseg.models.heads import IsoMaxPlusHead
from oodseg.outputs import PixelLogits


class FPNDecoder(nn.Module):
    """Lateral 1×1 convs + top-down sum + 3×3 fuse conv (GroupNorm, ReLU) at the finest feature level."""

    def __init__(self, in_channels: list[int], channels: int) -> None:
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        self.fuse = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.GroupNorm(groups, channels), nn.ReLU(True)
        )

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        y = self.laterals[-1](feats[-1])
        for lateral, f in zip(reversed(self.laterals[:-1]), reversed(feats[:-1])):
            y = lateral(f) + F.interpolate(y, size=f.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(y)


@register_model("timm_seg")
class TimmSeg(SegModel):
    """Per-pixel segmentation on any timm backbone (CNN stages or ViT patch grids) with a small FPN decoder and a
    linear or IsoMax+ head; input normalised with the backbone's timm data config, logits at input resolution."""

    output_kind = "pixel"
    has_features = True

    def __init__(
        self,
        backbone: str = "convnext_atto",
        num_classes: int = 19,
        pretrained: bool | str = False,
        decoder_channels: int = 128,
        head: str = "linear",
        out_indices: tuple[int, ...] | list[int] | None = None,
        input_size: tuple[int, int] | list[int] | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        import timm

        if head not in ("linear", "isomax"):
            raise ValueError(f"head must be 'linear' or 'isomax', got {head!r}")
        super().__init__(num_classes)
        kwargs: dict[str, Any] = dict(backbone_kwargs or {})
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        if "vit" in backbone or "eva" in backbone or "deit" in backbone:
            kwargs.setdefault("dynamic_img_size", True)
        if isinstance(pretrained, str):
            kwargs["pretrained_cfg_overlay"] = dict(file=pretrained)
        self.backbone = timm.create_model(backbone, pretrained=bool(pretrained), features_only=True, **kwargs)
        info = self.backbone.feature_info
        channels, strides = list(info.channels()), list(info.reduction())
        self.pad_multiple = int(max(strides))
        self.feature_stride = int(min(strides))
        self.decoder = FPNDecoder(channels, decoder_channels)
        d = decoder_channels
        self.head: nn.Module = IsoMaxPlusHead(d, num_classes) if head == "isomax" else nn.Conv2d(d, num_classes, 1)
        data_cfg = timm.data.resolve_model_data_config(self.backbone)
        mean, std = [float(v) for v in data_cfg["mean"]], [float(v) for v in data_cfg["std"]]
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.input_size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
        self.cfg: dict[str, Any] = dict(
            backbone=backbone,
            num_classes=num_classes,
            decoder_channels=decoder_channels,
            head=head,
            out_indices=None if out_indices is None else [int(i) for i in out_indices],
            input_size=None if input_size is None else [int(s) for s in input_size],
            backbone_kwargs=dict(backbone_kwargs or {}),
        )

    def export_cfg(self) -> dict[str, Any]:
        return dict(self.cfg)

    def preprocess(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 RGB → ``(x − 255·mean) / (255·std)`` with the backbone's timm data-config mean/std."""
        x = to_nchw_uint8(images_uint8).to(self.device, non_blocking=True)
        return (x.float() - self.pixel_mean) / self.pixel_std

    def forward(self, x: torch.Tensor, features: bool = False) -> PixelLogits:
        """Logits at the input resolution; ``features=True``: also the FPN decoder's fused map (the head's input)
        at the finest feature stride ``s``, ``[B, decoder_channels, ⌈H/s⌉, ⌈W/s⌉]``, from the same pass."""
        h, w = x.shape[-2:]
        m = self.pad_multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        f = self.decoder(self.backbone(x))
        y = self.classify(f, (h, w))
        s = self.feature_stride
        return PixelLogits(y, features=f[..., : -(-h // s), : -(-w // s)] if features else None)

    def classify(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Head, bilinear upsampling by the feature stride, cropped to ``size`` (for features cropped to the image,
        as ``predict`` exposes them, the last row / column of logits can differ slightly from the padded pass's)."""
        y = self.head(features)
        s = self.feature_stride
        y = F.interpolate(y, size=(y.shape[-2] * s, y.shape[-1] * s), mode="bilinear", align_corners=False)
        return y[..., : size[0], : size[1]]

    def _backbone_blocks(self) -> list[nn.Module]:
        inner = getattr(self.backbone, "model", None)
        if inner is not None and isinstance(getattr(inner, "blocks", None), nn.Sequential | nn.ModuleList):
            return list(inner.blocks)
        return [m for m in self.backbone.children() if any(True for _ in m.parameters())]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {
            "backbone": list(self.backbone.parameters()),
            "decoder": list(self.decoder.parameters()),
            "head": list(self.head.parameters()),
        }
        for i, block in enumerate([*self._backbone_blocks(), self.decoder]):
            groups[f"blocks.{i}"] = list(block.parameters())
        return groups
