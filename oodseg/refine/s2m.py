"""S2M refinement (Zhao et al., "Segment Every Out-of-Distribution Object", CVPR 2024): score map → box prompts →
SAM masks → a whole-object anomaly map (WenjieZhao1/S2M:tools/inference.py, ``do_test_score``).

The refined map is piecewise constant: 0 outside every SAM mask, a box's score inside its mask. An image with no
box gets an all-zero map; that is the whole reason S2M "produces no mask on in-distribution images": its detector
finds nothing above its 0.05 score threshold there.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from oodseg.outputs import Boxes
from oodseg.refine.prompters import Prompter
from oodseg.scoring.calibration import ScoreCalibration


class BoxSegmenter(Protocol):
    """What :func:`refine_s2m` needs from SAM (:class:`oodseg.models.sam.SamSegmenter`)."""

    def embed(self, image: np.ndarray) -> Any: ...

    def masks_from_boxes(self, sam_image: Any, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def assemble_masks(masks: Any, scores: Any) -> torch.Tensor:
    """S2M's mask assembly: float32 ``[H, W]`` that starts at 0 and where each mask's pixels take its box score,
    masks visited by descending score (stable sort), so on overlaps the later, lower score wins (S2M's detections
    arrive in descending order and ``anomaly[mask] = score`` overwrites). ``masks`` bool ``[K, H, W]`` (numpy or
    torch), ``scores`` ``[K]``; the result is on the masks' device. ``K = 0`` needs ``[0, H, W]`` masks → zeros."""
    m = torch.as_tensor(masks)
    s = torch.as_tensor(scores, dtype=torch.float32).to(m.device).reshape(-1)
    if m.ndim != 3 or m.dtype != torch.bool or s.shape[0] != m.shape[0]:
        raise ValueError(f"assemble_masks: needs bool masks [K, H, W] and scores [K]; got {m.dtype} "
                         f"{tuple(m.shape)} and {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("assemble_masks: box scores must be finite")
    out = torch.zeros(m.shape[1:], dtype=torch.float32, device=m.device)
    for k in torch.sort(s, descending=True, stable=True).indices.tolist():
        out[m[k]] = s[k]
    return out


def refine_s2m(image: Any, score_map: Any, prompter: Prompter, sam: BoxSegmenter,
               calibration: ScoreCalibration | None = None) -> tuple[torch.Tensor, Boxes]:
    """One image: ``prompter`` boxes → ``sam.masks_from_boxes`` on one embedding → :func:`assemble_masks`.

    ``image`` uint8 ``[H, W, 3]`` RGB, ``score_map`` ``[H, W]`` (the prompter's input, same size). Returns the
    refined float32 ``[H, W]`` map on the CPU and the boxes used. No box → all zeros and SAM is not run.

    Args:
        prompter: score map → :class:`Boxes` (xyxy original pixels, scores in ``[0, 1]``; ``create_prompter``).
        sam: the box-promptable SAM (:class:`~oodseg.models.sam.SamSegmenter`).
        calibration: the scorer's statistics on a calibration split, passed to ``prompter`` (for thresholds / scale
            it was not given); None: the prompter's own settings only.
    """
    img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"refine_s2m: image must be uint8 [H, W, 3]; got {img.dtype} {img.shape}")
    if tuple(score_map.shape) != img.shape[:2]:
        raise ValueError(f"refine_s2m: score map {tuple(score_map.shape)} and image {img.shape[:2]} differ in size")
    boxes = prompter(score_map, image=img, calibration=calibration)
    if len(boxes) == 0:
        return torch.zeros(img.shape[:2], dtype=torch.float32), boxes
    masks, _ = sam.masks_from_boxes(sam.embed(img), boxes.xyxy)
    return assemble_masks(masks, boxes.scores).cpu(), boxes
