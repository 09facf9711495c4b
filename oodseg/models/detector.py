"""S2M's prompt generator: a class-agnostic Faster R-CNN that sees only the anomaly score map.

Two networks, told apart from the file by :func:`load_detector`: :class:`ScoreDetector` (below), the detector this
project trains (``s2m_detector`` task), and :class:`~oodseg.models.d2_rcnn.D2FasterRCNN`, S2M's *released* detectron2
checkpoint run exactly as S2M runs it (raw ``s − PIXEL_MEAN`` input, detectron2's layers and box filters).

Follows WenjieZhao1/S2M (configs/OE/OE.yaml on detectron2's faster_rcnn_R_50_FPN_3x, tools/plain_train_net.py,
detectron2/data/dataset_mapper.py, tools/inference.py) with torchvision's ``FasterRCNN`` (detectron2 is not on PyPI):

* Input: the score map copied into 3 channels (S2M: ``np.tile(score, (3, 1, 1))``), never the RGB image.
* Normalisation (ours): ``x = clip((s − location) / scale, ±clip)`` with the scorer's inlier median / IQR scale
  (:class:`~oodseg.scoring.calibration.ScoreCalibration`), stored in the config and so in the checkpoint header.
  S2M feeds ``s − PIXEL_MEAN`` (≈ −110) with std 1, which ties the network to one scorer's raw units; the robust
  standardisation puts every scorer's in-distribution bulk at O(1) and the clip bounds the anomaly tail. So ours
  stays the default for detectors trained here (from random weights, ImageNet statistics mean nothing for a score
  map, and the same recipe then serves msp in [0, 1], energies near −20 and logit sums in the hundreds), while S2M's
  released weights get S2M's own input, since that is what they were trained on.
* Training augmentation: each element of the 3-channel raw input is multiplied by U(1 − noise, 1 + noise)
  (S2M ``do_train``: ``rand * 0.02 + 0.99``), before the normalisation; detectron2's horizontal flip: :func:`hflip`.
  Training resizes the shortest edge to ``min_size`` (≤ ``max_size``) as ``ResizeShortestEdge(800, 1333)``.
* Test: no resize unless ``resize_test`` (S2M calls the model on the full-resolution map, bypassing the mapper);
  boxes with score > 0.05, class-wise NMS 0.5, ≤ 100 per image; one foreground class (S2M's second class, id 1 of
  ``NUM_CLASSES: 2``, never occurs in its data, so its class-wise NMS is class-agnostic already).

Differences to detectron2 that remain (documented, not configurable in torchvision): box regression losses are
smooth-L1 with β = 1/9 (detectron2: β = 0, i.e. L1); RoIAlign uses ``aligned=False`` (detectron2: ROIAlignV2);
the R50/R18-FPN starts from random weights with GroupNorm or BatchNorm (S2M: ImageNet R-50 with FrozenBN).
Matched: RPN post-NMS top-k 1000 in training (torchvision default 2000), 512 RoIs per image at 25 % positives,
RPN 256 anchors at 50 %, IoU thresholds 0.7/0.3 (RPN) and 0.5 (RoI), FPN anchors 32–512 × ratios {0.5, 1, 2}.
S2M's schedule (for the training job): SGD momentum 0.9, lr 0.0025 at batch 4, weight decay 1e-4, 1000 warm-up
iterations, ×0.1 at 60k and 80k, 148.3k iterations on 700×700 Cityscapes crops with one pasted COCO object.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from oodseg.models.checkpoint import CheckpointError, load_checkpoint, read_safetensors_metadata
from oodseg.outputs import Boxes, mask_box

if TYPE_CHECKING:
    from oodseg.models.d2_rcnn import D2FasterRCNN

BACKBONES = ("tiny", "resnet18", "resnet50")
NORMS = ("gn", "bn")
META_DETECTOR = "oodseg.detector"
#: Config fields that only affect inference and may be overridden when loading a checkpoint.
INFERENCE_FIELDS = ("score_thresh", "nms_thresh", "detections_per_img", "resize_test")


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture, normalisation and box filters of a :class:`ScoreDetector` (the checkpoint header holds it)."""

    backbone: str = "resnet50"
    norm: str = "gn"
    location: float = 0.0
    scale: float = 1.0
    clip: float = 10.0
    noise: float = 0.01
    min_size: int = 800
    max_size: int = 1333
    resize_test: bool = False
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    rpn_post_nms_top_n_train: int = 1000
    box_batch_size_per_image: int = 512

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES or self.norm not in NORMS:
            raise ValueError(f"detector: backbone must be one of {BACKBONES} and norm one of {NORMS}; got "
                             f"{self.backbone!r}, {self.norm!r}")
        if not (math.isfinite(self.location) and self.scale > 0 and self.clip > 0 and 0 <= self.noise < 1):
            raise ValueError(f"detector: needs finite location, scale > 0, clip > 0, 0 ≤ noise < 1; got "
                             f"location={self.location}, scale={self.scale}, clip={self.clip}, noise={self.noise}")
        if not (0 < self.min_size <= self.max_size and 0 <= self.score_thresh < 1 and 0 < self.nms_thresh <= 1
                and self.detections_per_img > 0):
            raise ValueError(f"detector: invalid sizes or box filters in {self}")


def multiplicative_noise(x: torch.Tensor, noise: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x · U(1 − noise, 1 + noise)`` element-wise (S2M: ``noise = 0.01``)."""
    device = x.device if generator is None else generator.device
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
    return x * (1.0 - noise + 2.0 * noise * u)


class ScoreDetector(nn.Module):
    """Faster R-CNN over a score map. ``det(maps, targets)`` in train mode → loss dict; ``det.detect(map)`` → Boxes.

    ``maps``: a list of ``[H, W]`` score maps (sizes may differ) or a ``[B, H, W]`` tensor, raw scorer units.
    """

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        from oodseg.models.rcnn import build_rcnn  # torchvision's detection stack: ~2 s to import

        self.rcnn = build_rcnn(cfg)
        self.meta: dict[str, str] = {}

    def inputs(self, score_maps: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """Raw maps → normalised 3-channel network inputs (with the multiplicative noise in train mode)."""
        device = next(self.parameters()).device
        out = []
        for s in score_maps:
            s = torch.as_tensor(s, dtype=torch.float32, device=device)
            if s.ndim != 2:
                raise ValueError(f"detector: each score map must be [H, W]; got {tuple(s.shape)}")
            x = s.unsqueeze(0).expand(3, -1, -1)
            if self.training and self.cfg.noise > 0:
                x = multiplicative_noise(x, self.cfg.noise)
            out.append(((x - self.cfg.location) / self.cfg.scale).clamp(-self.cfg.clip, self.cfg.clip))
        return out

    def forward(self, score_maps: Sequence[torch.Tensor] | torch.Tensor,
                targets: Sequence[Mapping[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor] | list[Boxes]:
        """Train mode: torchvision's loss dict (``loss_objectness``, ``loss_rpn_box_reg``, ``loss_classifier``,
        ``loss_box_reg``) for one target per map, ``{"boxes": [G, 4] pixel-edge xyxy, "labels": [G] ones}``
        (:func:`detector_targets`); eval mode: one :class:`Boxes` per map, highest score first."""
        images = self.inputs(score_maps)
        if self.training:
            if targets is None or len(targets) != len(images):
                raise ValueError("detector: training needs one target dict per score map")
            device = images[0].device
            return self.rcnn(images, [{k: v.to(device) for k, v in t.items()} for t in targets])
        return [Boxes.ranked(d["boxes"], d["scores"]) for d in self.rcnn(images)]

    @torch.no_grad()
    def detect(self, score_map: Any) -> Boxes:
        """Boxes (xyxy, original pixels, descending score) of one ``[H, W]`` score map, in eval mode."""
        s = torch.as_tensor(score_map, dtype=torch.float32)
        was_training = self.training
        self.eval()
        try:
            return self.forward([s])[0]  # type: ignore[index]
        finally:
            self.train(was_training)


def build_detector(**cfg: Any) -> ScoreDetector:
    """``ScoreDetector(DetectorConfig(**cfg))`` (``location`` / ``scale``: a scorer's
    :class:`~oodseg.scoring.calibration.ScoreCalibration`)."""
    return ScoreDetector(DetectorConfig(**cfg))


def detector_targets(paste_mask: Any) -> dict[str, torch.Tensor]:
    """Training target of one pasted object: ``{"boxes": [1, 4] xyxy, "labels": [1]}`` (empty when no pixel)."""
    m = paste_mask.detach().cpu().numpy() if isinstance(paste_mask, torch.Tensor) else np.asarray(paste_mask)
    if m.ndim != 2:
        raise ValueError(f"detector_targets: paste mask must be [H, W]; got shape {m.shape}")
    box = mask_box(m.astype(bool))
    boxes = np.zeros((0, 4), np.float32) if box is None else box[None]
    return {"boxes": torch.from_numpy(boxes), "labels": torch.ones(len(boxes), dtype=torch.int64)}


def hflip(score_map: torch.Tensor, target: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Horizontal flip of a ``[H, W]`` map and its boxes (detectron2's default training ``RandomFlip``)."""
    w = score_map.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
    return score_map.flip(-1), {**target, "boxes": boxes}


def save_detector(det: ScoreDetector, path: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Write weights + config (``oodseg.detector``) + ``meta`` (e.g. the scorer's name) into one safetensors file."""
    from safetensors.torch import save_file

    header = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (meta or {}).items()}
    header[META_DETECTOR] = json.dumps(asdict(det.cfg))
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in det.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return path


def load_detector(path: str | Path, device: str | torch.device = "cpu",
                  **overrides: Any) -> ScoreDetector | D2FasterRCNN:
    """The detector in ``path``, recognised from the file's bytes (eval mode): a :class:`ScoreDetector` safetensors
    file (header ``oodseg.detector``; ``overrides`` may change :data:`INFERENCE_FIELDS`) or S2M's released detectron2
    Faster R-CNN ``model_final.pth`` / ``.pkl`` (:func:`~oodseg.models.d2_rcnn.load_d2_rcnn`).

    Raises :class:`CheckpointError` (naming the file) for an unreadable file, a missing/invalid config header or
    weights that do not fit the config (missing / unexpected keys, shapes)."""
    if not _is_safetensors(path):
        from oodseg.models.d2_rcnn import load_d2_rcnn

        return load_d2_rcnn(path, device, **overrides)
    bad = sorted(set(overrides) - set(INFERENCE_FIELDS))
    if bad:
        raise ValueError(f"load_detector: only {INFERENCE_FIELDS} may be overridden; got {bad}")
    meta = read_safetensors_metadata(path)
    if META_DETECTOR not in meta:
        raise CheckpointError(path, f"no {META_DETECTOR!r} config in the header: not a ScoreDetector checkpoint "
                                    "(a detector is our .safetensors or S2M's detectron2 model_final.pth)")
    try:
        raw = json.loads(meta.pop(META_DETECTOR))
        known = {f.name for f in fields(DetectorConfig)}
        if not isinstance(raw, dict) or set(raw) - known:
            raise ValueError(f"unknown fields {sorted(set(raw) - known) if isinstance(raw, dict) else raw}")
        cfg = replace(DetectorConfig(**raw), **overrides)
    except (ValueError, TypeError) as e:
        raise CheckpointError(path, f"invalid {META_DETECTOR} config: {e}") from e
    det = ScoreDetector(cfg)
    load_checkpoint(det, path)
    det.meta = meta
    return det.to(device).eval()


def _is_safetensors(path: str | Path) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian) and the header's ``{``; the
    length must fit in the file. (Torch files are zip archives, ``PK``, or pickles, ``0x80``: read as a length, those
    bytes exceed any file. The first byte alone decides nothing: a header of 128 + 256·k bytes starts with ``0x80``.)"""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint file not found")
    with path.open("rb") as f:
        head = f.read(9)
    n = int.from_bytes(head[:8], "little")
    return len(head) == 9 and head[8:9] == b"{" and n + 8 <= path.stat().st_size
