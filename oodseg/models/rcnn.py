"""The torchvision Faster R-CNN behind :class:`~oodseg.models.detector.ScoreDetector`: one foreground class, no
input normalisation or test-time resize of its own (S2M's settings and what differs from detectron2:
:mod:`oodseg.models.detector`). A module of its own so that importing the detector prompter — every
benchmark worker does, through the prompter registry — does not import torchvision's detection stack (~2 s)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign


class _ScoreTransform(GeneralizedRCNNTransform):
    """torchvision's batching transform without the test-time resize (unless ``resize_test``) and without
    normalisation (done on the score map by :class:`ScoreDetector`)."""

    def __init__(self, min_size: int, max_size: int, resize_test: bool) -> None:
        super().__init__(min_size, max_size, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
        self.resize_test = resize_test

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None) -> tuple[Any, Any]:
        if self.training or self.resize_test:
            return super().resize(image, target)
        return image, target


def _tiny_parts(norm: str) -> dict[str, Any]:
    """A 3-conv stride-8 backbone (32 channels, GroupNorm(8) or BatchNorm, ~15 k parameters) with matching anchors
    and box head, for tests and demos (GroupNorm makes a few dozen Adam steps converge reliably from scratch)."""
    layers: list[nn.Module] = []
    for c_in, c_out in ((3, 16), (16, 32), (32, 32)):
        layers += [nn.Conv2d(c_in, c_out, 3, 2, 1), nn.GroupNorm(8, c_out) if norm == "gn" else nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]
    body = nn.Sequential(*layers)
    body.out_channels = 32
    return {
        "backbone": body,
        "rpn_anchor_generator": AnchorGenerator(((16, 32, 64),), ((0.5, 1.0, 2.0),)),
        "box_roi_pool": MultiScaleRoIAlign(["0"], 7, 2),
        "box_head": TwoMLPHead(32 * 7 * 7, 64),
        "box_predictor": FastRCNNPredictor(64, 2),
    }


def build_rcnn(cfg: Any) -> FasterRCNN:
    """torchvision's ``FasterRCNN`` for ``cfg``, a :class:`~oodseg.models.detector.DetectorConfig` (not imported:
    the detector imports this module)."""
    if cfg.backbone == "tiny":
        parts: dict[str, Any] = _tiny_parts(cfg.norm)
        num_classes = None
    else:
        norm = partial(nn.GroupNorm, 32) if cfg.norm == "gn" else nn.BatchNorm2d
        parts = {"backbone": resnet_fpn_backbone(backbone_name=cfg.backbone, weights=None, norm_layer=norm,
                                                 trainable_layers=5)}
        num_classes = 2  # background + the anomaly class; default FPN anchors, RoIAlign and 1024-d box head
    rcnn = FasterRCNN(
        num_classes=num_classes, min_size=cfg.min_size, max_size=cfg.max_size,
        image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train, box_score_thresh=cfg.score_thresh,
        box_nms_thresh=cfg.nms_thresh, box_detections_per_img=cfg.detections_per_img,
        box_batch_size_per_image=cfg.box_batch_size_per_image, **parts,
    )
    rcnn.transform = _ScoreTransform(cfg.min_size, cfg.max_size, cfg.resize_test)
    return rcnn
