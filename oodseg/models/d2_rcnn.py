"""S2M's released detector: detectron2's Faster R-CNN R50-FPN at inference, loaded from its ``model_final.pth``.

S2M (WenjieZhao1/S2M) trains detectron2's ``GeneralizedRCNN`` from ``configs/OE/OE.yaml``
(``COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml`` with ``ROI_HEADS.NUM_CLASSES: 2``) on anomaly score maps and runs
it in ``tools/inference.py`` on the full-resolution map copied into 3 channels (``datasets/validation/val_score.py``:
``score.unsqueeze(0).expand(3, -1, -1)``), with no resize and no ``height`` / ``width`` (so no output rescale). This
module is that network, written against detectron2's conventions (facebookresearch/detectron2, ``modeling/``):

* input ``(s − PIXEL_MEAN) / PIXEL_STD`` per channel on the raw score (detectron2's defaults, which S2M keeps:
  mean ``[103.530, 116.280, 123.675]``, std 1), zero-padded bottom/right to a multiple of 32 (``ImageList``);
* ``build_resnet_backbone``: 7×7/2 stem + 3×3/2 max pool, bottleneck stages res2–res5 with the stride in the first
  1×1 conv (``STRIDE_IN_1X1``), ``FrozenBN`` everywhere (``F.batch_norm`` in eval, as detectron2 runs it);
* ``FPN`` (sum fusion, nearest ×2 top-down, no norm) + ``LastLevelMaxPool`` (p6 = 1×1/2 max pool of p5);
* ``RPN``: ``StandardRPNHead`` (3×3 conv + ReLU, objectness, deltas), ``DefaultAnchorGenerator`` (sizes 32–512 on
  p2–p6, ratios 0.5 / 1 / 2, offset 0), ``Box2BoxTransform`` weights 1 and clamp log(1000/16), per level the top
  1000 by objectness, clip, drop empty boxes, NMS 0.7 per level (``batched_nms`` by level), top 1000 overall;
* ``StandardROIHeads``: ``ROIAlignV2`` 7×7 (aligned, sampling ratio 0) on p2–p5 by the canonical level rule
  ``floor(4 + log2(√area / 224 + 1e-8))``, two 1024-d FC + ReLU, ``cls_score`` (K + 1, last = background) and
  class-specific ``bbox_pred`` (weights 10, 10, 5, 5); softmax, clip, ``score > 0.05``, class-wise NMS 0.5, the best
  100, then ``detector_postprocess``'s empty-box filter.

Every detection is returned, whatever its class (S2M prompts SAM with every instance). The widths (stem, bottleneck,
FPN, FC), the block counts, the anchors per location and the class count are read off the checkpoint's shapes, so a
detectron2 ResNet-50/101 Faster R-CNN of any width loads. Verified against detectron2 itself (tests/test_d2_rcnn.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oodseg.models.checkpoint import CheckpointError
from oodseg.outputs import Boxes

#: Keys that mark a detectron2 Faster R-CNN state dict (``GeneralizedRCNN`` with an RPN and box head).
D2_RCNN_KEYS = ("proposal_generator.rpn_head.objectness_logits.weight", "roi_heads.box_predictor.cls_score.weight")
_SCALE_CLAMP = math.log(1000.0 / 16)  # detectron2's _DEFAULT_SCALE_CLAMP
#: Config fields that only affect the box filters (the prompter may override them).
INFERENCE_FIELDS = ("score_thresh", "nms_thresh", "detections_per_img")


@dataclass(frozen=True)
class D2RcnnConfig:
    """What the checkpoint does not hold: S2M's resolved config (``tools/output/config.yaml``) at test time."""

    pixel_mean: tuple[float, float, float] = (103.530, 116.280, 123.675)
    pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    anchor_sizes: tuple[float, ...] = (32.0, 64.0, 128.0, 256.0, 512.0)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_nms_thresh: float = 0.7
    rpn_pre_nms_topk: int = 1000
    rpn_post_nms_topk: int = 1000
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100


class FrozenBN(nn.Module):
    """detectron2's ``FrozenBatchNorm2d`` (buffers ``weight``, ``bias``, ``running_mean``, ``running_var``)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((channels,), fill))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                            eps=self.eps)


class ConvBN(nn.Conv2d):
    """A bias-free conv followed by its ``norm`` (detectron2's ``Conv2d(..., norm=FrozenBN)``: ``conv.norm.*`` keys)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1) -> None:
        super().__init__(c_in, c_out, kernel, stride, padding=(kernel - 1) // 2, bias=False)
        self.norm = FrozenBN(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class Bottleneck(nn.Module):
    """``BottleneckBlock`` with ``stride_in_1x1``: 1×1 (stride) → 3×3 → 1×1, projection shortcut when shapes change."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.shortcut = ConvBN(c_in, c_out, 1, stride) if (c_in != c_out or stride != 1) else None
        self.conv1 = ConvBN(c_in, c_mid, 1, stride)
        self.conv2 = ConvBN(c_mid, c_mid, 3)
        self.conv3 = ConvBN(c_mid, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv2(F.relu_(self.conv1(x))))
        out = self.conv3(out)
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out)


class Stem(nn.Module):
    def __init__(self, c_out: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(3, c_out, 7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu_(self.conv1(x)), kernel_size=3, stride=2, padding=1)


class ResNet(nn.Module):
    """``backbone.bottom_up``: stem + ``res2``..``res5`` (``blocks[i]`` bottlenecks, widths ``(mid, out)``)."""

    def __init__(self, stem: int, blocks: list[int], widths: list[tuple[int, int]]) -> None:
        super().__init__()
        self.stem = Stem(stem)
        c_in = stem
        for i, (n, (mid, out)) in enumerate(zip(blocks, widths, strict=True)):
            stride = 1 if i == 0 else 2
            stage = [Bottleneck(c_in if k == 0 else out, mid, out, stride if k == 0 else 1) for k in range(n)]
            self.add_module(f"res{i + 2}", nn.Sequential(*stage))
            c_in = out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for i in range(2, 6):
            x = getattr(self, f"res{i}")(x)
            feats.append(x)
        return feats


class FPN(nn.Module):
    """detectron2's ``FPN`` over res2–res5 with ``LastLevelMaxPool``: p2..p6 (strides 4..64)."""

    def __init__(self, bottom_up: ResNet, in_channels: list[int], channels: int) -> None:
        super().__init__()
        self.bottom_up = bottom_up
        for level, c in zip(range(2, 6), in_channels, strict=True):
            self.add_module(f"fpn_lateral{level}", nn.Conv2d(c, channels, 1))
            self.add_module(f"fpn_output{level}", nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.bottom_up(x)
        prev = self.fpn_lateral5(feats[3])
        results = [self.fpn_output5(prev)]
        for level in (4, 3, 2):
            top_down = F.interpolate(prev, scale_factor=2.0, mode="nearest")
            prev = getattr(self, f"fpn_lateral{level}")(feats[level - 2]) + top_down
            results.insert(0, getattr(self, f"fpn_output{level}")(prev))
        return [*results, F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0)]


def apply_deltas(deltas: torch.Tensor, boxes: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """detectron2's ``Box2BoxTransform.apply_deltas``: ``deltas [R, k·4]`` on ``boxes [R, 4]`` → ``[R, k·4]``."""
    deltas = deltas.float()
    boxes = boxes.to(deltas.dtype)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=_SCALE_CLAMP)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=_SCALE_CLAMP)
    pred_ctr_x, pred_ctr_y = dx * widths[:, None] + ctr_x[:, None], dy * heights[:, None] + ctr_y[:, None]
    pred_w, pred_h = torch.exp(dw) * widths[:, None], torch.exp(dh) * heights[:, None]
    out = torch.stack((pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h, pred_ctr_x + 0.5 * pred_w,
                       pred_ctr_y + 0.5 * pred_h), dim=-1)
    return out.reshape(deltas.shape)


def clip_boxes(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``Boxes.clip``: x to [0, W], y to [0, H]."""
    h, w = size
    return torch.stack((boxes[:, 0].clamp(min=0, max=w), boxes[:, 1].clamp(min=0, max=h),
                        boxes[:, 2].clamp(min=0, max=w), boxes[:, 3].clamp(min=0, max=h)), dim=-1)


def nonempty(boxes: torch.Tensor) -> torch.Tensor:
    """``Boxes.nonempty(threshold=0)``: width and height > 0."""
    return (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)


def cell_anchors(size: float, ratios: tuple[float, ...]) -> torch.Tensor:
    """``DefaultAnchorGenerator.generate_cell_anchors`` for one size: ``w = √(size² / r)``, ``h = r·w``, centred."""
    out = []
    for r in ratios:
        w = math.sqrt(size**2.0 / r)
        h = r * w
        out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(out)


def grid_anchors(base: torch.Tensor, shape: tuple[int, int], stride: int) -> torch.Tensor:
    """Anchors of one level, location-major (row, column), anchor-minor, offset 0."""
    xs = torch.arange(0.0, shape[1] * stride, step=stride, dtype=torch.float32)
    ys = torch.arange(0.0, shape[0] * stride, step=stride, dtype=torch.float32)
    sy, sx = torch.meshgrid(ys, xs, indexing="ij")
    sx, sy = sx.reshape(-1), sy.reshape(-1)
    shifts = torch.stack((sx, sy, sx, sy), dim=1)
    return (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)


class RPNHead(nn.Module):
    def __init__(self, channels: int, anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(channels, anchors, 1)
        self.anchor_deltas = nn.Conv2d(channels, anchors * 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = F.relu(self.conv(x))
        return self.objectness_logits(t), self.anchor_deltas(t)


class RPN(nn.Module):
    """``proposal_generator``: proposals of one image (``find_top_rpn_proposals``, test settings)."""

    def __init__(self, channels: int, anchors: int, cfg: D2RcnnConfig) -> None:
        super().__init__()
        self.rpn_head = RPNHead(channels, anchors)
        self.cfg = cfg

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        from torchvision.ops import batched_nms

        cfg, boxes, scores, levels = self.cfg, [], [], []
        for i, (x, anchor_size) in enumerate(zip(features, cfg.anchor_sizes, strict=True)):
            logits, deltas = self.rpn_head(x)
            logits = logits.permute(0, 2, 3, 1).flatten(1)[0]
            deltas = deltas.view(1, -1, 4, *x.shape[-2:]).permute(0, 3, 4, 1, 2).flatten(1, -2)[0]
            anchors = grid_anchors(cell_anchors(anchor_size, cfg.aspect_ratios), tuple(x.shape[-2:]), 2 ** (i + 2))
            proposals = apply_deltas(deltas, anchors.to(x.device), (1.0, 1.0, 1.0, 1.0))  # all, as detectron2
            top, idx = logits.topk(min(len(logits), cfg.rpn_pre_nms_topk))
            boxes.append(proposals[idx])
            scores.append(top)
            levels.append(torch.full((len(top),), i, dtype=torch.int64, device=x.device))
        boxes, scores, lvl = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        boxes, scores, lvl = clip_boxes(boxes[valid], size), scores[valid], lvl[valid]
        keep = nonempty(boxes)
        boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = batched_nms(boxes.float(), scores, lvl, cfg.rpn_nms_thresh)[: cfg.rpn_post_nms_topk]
        return boxes[keep]


class BoxHead(nn.Module):
    """``FastRCNNConvFCHead`` with FC layers only (``fc1``, ``fc2``, …, each + ReLU)."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        for k in range(1, len(dims)):
            self.add_module(f"fc{k}", nn.Linear(dims[k - 1], dims[k]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, start_dim=1)
        for layer in self.children():
            x = F.relu(layer(x))
        return x


class BoxPredictor(nn.Module):
    def __init__(self, dim: int, num_classes: int, box_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(dim, num_classes + 1)
        self.bbox_pred = nn.Linear(dim, box_classes * 4)


class ROIHeads(nn.Module):
    """``roi_heads``: ROIAlignV2 pooling by level, the box head and ``fast_rcnn_inference_single_image``."""

    def __init__(self, dims: list[int], pool: int, num_classes: int, box_classes: int, cfg: D2RcnnConfig) -> None:
        super().__init__()
        self.box_head = BoxHead(dims)
        self.box_predictor = BoxPredictor(dims[-1], num_classes, box_classes)
        self.pool, self.cfg = pool, cfg

    def pooled(self, features: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        """``ROIPooler``: each box on level ``clamp(floor(4 + log2(√area / 224 + 1e-8)), 2, 5)`` of p2..p5."""
        from torchvision.ops import roi_align

        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        levels = torch.clamp(torch.floor(4 + torch.log2(torch.sqrt(area) / 224 + 1e-8)), min=2, max=5)
        levels = levels.to(torch.int64) - 2
        rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], dim=1)
        x0 = features[0]
        out = torch.zeros((len(boxes), x0.shape[1], self.pool, self.pool), dtype=x0.dtype, device=x0.device)
        for level, x in enumerate(features[:4]):
            inds = torch.nonzero(levels == level, as_tuple=True)[0]
            pooled = roi_align(x, rois[inds].to(x.dtype), self.pool, 1.0 / 2 ** (level + 2), 0, True)
            out.index_put_((inds,), pooled)
        return out

    def forward(self, features: list[torch.Tensor], proposals: torch.Tensor,
                size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detections ``(boxes [D, 4], scores [D], classes [D])`` of one image, by descending score."""
        from torchvision.ops import batched_nms

        x = self.box_head(self.pooled(features, proposals))
        logits, deltas = self.box_predictor.cls_score(x), self.box_predictor.bbox_pred(x)
        scores = F.softmax(logits, dim=-1)
        boxes = apply_deltas(deltas, proposals, (10.0, 10.0, 5.0, 5.0))
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
        boxes, scores = boxes[valid], scores[valid][:, :-1]
        k = boxes.shape[1] // 4
        boxes = clip_boxes(boxes.reshape(-1, 4), size).view(-1, k, 4)
        mask = scores > self.cfg.score_thresh
        inds = mask.nonzero()
        boxes = boxes[inds[:, 0], 0] if k == 1 else boxes[mask]
        scores = scores[mask]
        keep = batched_nms(boxes.float(), scores, inds[:, 1], self.cfg.nms_thresh)[: self.cfg.detections_per_img]
        boxes, scores, classes = boxes[keep], scores[keep], inds[keep, 1]
        keep = nonempty(boxes)  # detector_postprocess (its rescale is ×1 and its clip a no-op: no test resize)
        return boxes[keep], scores[keep], classes[keep]


@dataclass(frozen=True)
class D2Shapes:
    """The architecture a detectron2 Faster R-CNN state dict implies."""

    stem: int
    blocks: list[int]
    widths: list[tuple[int, int]]
    fpn: int
    anchors: int
    fc: list[int]
    pool: int
    num_classes: int
    box_classes: int

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> D2Shapes:
        """Read off the shapes (KeyError for a missing key: the caller names the file)."""
        bu = "backbone.bottom_up."
        blocks = [1 + max(int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(bu)}res{i}\.(\d+)\.", k)))
                  for i in range(2, 6)]
        widths = [(state[f"{bu}res{i}.0.conv1.weight"].shape[0], state[f"{bu}res{i}.0.conv3.weight"].shape[0])
                  for i in range(2, 6)]
        n_fc = max(int(m.group(1)) for k in state if (m := re.match(r"roi_heads\.box_head\.fc(\d+)\.", k)))
        fc = [state["roi_heads.box_head.fc1.weight"].shape[1]]
        fc += [state[f"roi_heads.box_head.fc{k}.weight"].shape[0] for k in range(1, n_fc + 1)]
        fpn = state["backbone.fpn_lateral2.weight"].shape[0]
        return cls(stem=state[f"{bu}stem.conv1.weight"].shape[0], blocks=blocks, widths=widths, fpn=fpn,
                   anchors=state[D2_RCNN_KEYS[0]].shape[0], fc=fc, pool=round(math.sqrt(fc[0] // fpn)),
                   num_classes=state[D2_RCNN_KEYS[1]].shape[0] - 1,
                   box_classes=state["roi_heads.box_predictor.bbox_pred.weight"].shape[0] // 4)


class D2FasterRCNN(nn.Module):
    """detectron2's ``GeneralizedRCNN`` (Faster R-CNN, ResNet-FPN: RPN + box head) at inference, boxes of every
    class from a score map; sizes read off the checkpoint (:class:`D2Shapes`), stages as detectron2's (module doc).

    Input normalisation is S2M's, detectron2's ``(x − PIXEL_MEAN) / PIXEL_STD`` on the raw score: the released
    detector was trained on exactly that, so it must see it (our own detectors standardise per scorer instead:
    :class:`~oodseg.models.detector.ScoreDetector`)."""

    def __init__(self, shapes: D2Shapes, cfg: D2RcnnConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or D2RcnnConfig()
        if shapes.anchors != len(cfg.aspect_ratios):
            raise ValueError(f"{shapes.anchors} anchors per location, but {len(cfg.aspect_ratios)} aspect ratios")
        bottom_up = ResNet(shapes.stem, shapes.blocks, shapes.widths)
        self.backbone = FPN(bottom_up, [w[1] for w in shapes.widths], shapes.fpn)
        self.proposal_generator = RPN(shapes.fpn, shapes.anchors, cfg)
        self.roi_heads = ROIHeads(shapes.fc, shapes.pool, shapes.num_classes, shapes.box_classes, cfg)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(-1, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One ``[3, H, W]`` float image → ``(boxes, scores, classes)`` (``GeneralizedRCNN.inference``)."""
        size = (int(image.shape[-2]), int(image.shape[-1]))
        x = (image - self.pixel_mean) / self.pixel_std
        pad_h, pad_w = (-size[0]) % 32, (-size[1]) % 32  # ImageList.from_tensors, size_divisibility 32
        x = F.pad(x, [0, pad_w, 0, pad_h], value=0.0).unsqueeze_(0)
        features = self.backbone(x)
        proposals = self.proposal_generator(features, size)
        return self.roi_heads(features, proposals, size)

    @torch.no_grad()
    def detect(self, score_map: Any) -> Boxes:
        """Boxes of one ``[H, W]`` score map fed as S2M feeds it: the float32 map copied into 3 channels."""
        s = torch.as_tensor(score_map, dtype=torch.float32, device=self.pixel_mean.device)
        if s.ndim != 2:
            raise ValueError(f"detector: a score map must be [H, W]; got {tuple(s.shape)}")
        self.eval()
        boxes, scores, _ = self(s.unsqueeze(0).expand(3, -1, -1))
        return Boxes.ranked(boxes, scores)


def load_d2_rcnn(path: str | Path, device: str | torch.device = "cpu", **overrides: Any) -> D2FasterRCNN:
    """S2M's ``model_final.pth`` (or a detectron2-named ``.pkl``) → :class:`D2FasterRCNN` in eval mode; ``overrides``
    may set :data:`INFERENCE_FIELDS`. CheckpointError naming the file for another network or unfitting weights."""
    from oodseg.models.detectron2_weights import read_detectron2_weights

    bad = sorted(set(overrides) - set(INFERENCE_FIELDS))
    if bad:
        raise ValueError(f"detectron2 detector {path}: only {INFERENCE_FIELDS} may be overridden; got {bad}")
    state = read_detectron2_weights(path, "roi_heads.box_predictor.", "Faster R-CNN")
    try:
        model = D2FasterRCNN(D2Shapes.of(state), D2RcnnConfig(**overrides))
        model.load_state_dict(state, strict=True)
    except KeyError as e:
        raise CheckpointError(path, f"not a detectron2 Faster R-CNN R50/101-FPN state dict (no {e.args[0]})") from None
    except (ValueError, RuntimeError) as e:
        msg = " ".join(str(e).split())
        raise CheckpointError(path, f"not a detectron2 Faster R-CNN R50/101-FPN state dict ({msg[:300]})") from None
    return model.to(device).eval()
