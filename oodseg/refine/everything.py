"""Pieces of SAM's automatic ("everything") mask generation that :func:`oodseg.refine.saom.generate_everything`
assembles: crop layers, per-crop mask filtering, small-region cleanup.

Facts from ``facebookresearch/segment-anything`` (``segment_anything/automatic_mask_generator.py``,
``segment_anything/utils/amg.py``); SAOM's ``SamAutomaticMaskGenerator3_panoPhD``
(``mariiak2021/SAOMv1-SAOMv2-and-PanoSAM:per_segment_anything/automatic_mask_generator.py``) is the same generator
with its own defaults (``pred_iou_thresh 0.3``, ``box_nms_thresh 0.3``, ``crop_nms_thresh 0.3``, ``min_mask_region_area
150``) and an explicit ``point_grids`` list, one ``[G, 2]`` grid in ``[0, 1]`` per crop layer.

* :func:`crop_boxes`: layer 0 is the whole image; layer ``i ≥ 1`` tiles it with ``2^i × 2^i`` crops overlapping by
  ``int(overlap_ratio · short_side · 2 / 2^i)`` px (``generate_crop_boxes``).
* :func:`masks_in_crop`: the crop is encoded on its own; its grid scaled to the crop's pixels; per batch of points,
  3 masks each, kept when predicted IoU ``> pred_iou_thresh`` and stability ``≥ stability_score_thresh``, then
  masks whose box lies within 20 px of a crop edge that is not an image edge are dropped
  (``is_box_near_crop_edge``); box NMS inside the crop on predicted IoU; masks pasted back into the image frame.
* :func:`drop_small_regions`: SAM's ``postprocess_small_regions`` (holes, then islands, below ``min_area`` px, then
  NMS preferring unchanged masks).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

EDGE_ATOL = 20.0  # is_box_near_crop_edge's tolerance (px)


def crop_boxes(h: int, w: int, n_layers: int, overlap_ratio: float) -> tuple[list[list[int]], list[int]]:
    """SAM's crop boxes ``[x0, y0, x1, y1]`` and their layer indexes (module docstring)."""
    boxes, layers = [[0, 0, w, h]], [0]
    for i in range(1, n_layers + 1):
        n = 2 ** i
        overlap = int(overlap_ratio * min(h, w) * (2 / n))
        cw, ch = (math.ceil((overlap * (n - 1) + side) / n) for side in (w, h))
        for x0 in ((cw - overlap) * k for k in range(n)):
            for y0 in ((ch - overlap) * k for k in range(n)):
                boxes.append([x0, y0, min(x0 + cw, w), min(y0 + ch, h)])
                layers.append(i)
    return boxes, layers


def near_crop_edge(boxes: torch.Tensor, crop_box: list[int], image_box: list[int]) -> torch.Tensor:
    """Image-frame xyxy boxes ``[N, 4]`` within :data:`EDGE_ATOL` px of an edge of ``crop_box`` that is not an edge
    of the image (``is_box_near_crop_edge``)."""
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)[None]
    image = torch.as_tensor(image_box, dtype=torch.float, device=boxes.device)[None]
    b = boxes.float()
    near_crop = torch.isclose(b, crop, atol=EDGE_ATOL, rtol=0)
    near_image = torch.isclose(b, image, atol=EDGE_ATOL, rtol=0)
    return (near_crop & ~near_image).any(1)


def _filter_batch(logits: torch.Tensor, iou: torch.Tensor, pred_iou_thresh: float, stability_score_thresh: float,
                  stability_offset: float) -> torch.Tensor:
    """Which of ``[M, h, w]`` mask logits pass the IoU and stability filters (empty masks never do)."""
    ok = (logits > 0).flatten(1).any(1)  # empty masks have no box; SAM's filters remove them too
    if pred_iou_thresh > 0:
        ok &= iou > pred_iou_thresh
    if stability_score_thresh > 0:
        inter = (logits > stability_offset).flatten(1).sum(1)
        union = (logits > -stability_offset).flatten(1).sum(1).clamp(min=1)
        ok &= inter / union >= stability_score_thresh
    return ok


def masks_in_crop(sam: Any, image: np.ndarray, crop_box: list[int], grid: np.ndarray, points_per_batch: int,
                  pred_iou_thresh: float, stability_score_thresh: float, stability_offset: float,
                  box_nms_thresh: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool masks ``[N, H, W]`` in the image frame and predicted IoUs ``[N]`` from one crop (module docstring)."""
    from torchvision.ops import batched_nms, masks_to_boxes

    h, w = image.shape[:2]
    x0, y0, x1, y1 = crop_box
    img = sam.embed(np.ascontiguousarray(image[y0:y1, x0:x1]))
    pts = np.asarray(grid, dtype=np.float64) * np.array([x1 - x0, y1 - y0], dtype=np.float64)
    offset = torch.tensor([x0, y0, x0, y0])
    masks, scores, boxes = [], [], []
    for start in range(0, len(pts), points_per_batch):
        p = pts[start:start + points_per_batch]
        logits, iou, _ = sam.mask_logits_from_points(img, p[:, None, :], np.ones((len(p), 1)), multimask=True)
        logits, iou = logits.flatten(0, 1), iou.flatten()
        ok = _filter_batch(logits, iou, pred_iou_thresh, stability_score_thresh, stability_offset)
        m = logits[ok] > 0
        b = masks_to_boxes(m).float() + offset.to(m.device)
        edge = near_crop_edge(b, crop_box, [0, 0, w, h])
        masks.append(m[~edge])
        scores.append(iou[ok][~edge])
        boxes.append(b[~edge])
    m, s, b = torch.cat(masks), torch.cat(scores), torch.cat(boxes)
    keep = batched_nms(b, s, torch.zeros_like(s), box_nms_thresh)
    return F.pad(m[keep], (x0, w - x1, y0, h - y1)), s[keep]


def remove_small_regions(mask: np.ndarray, min_area: float, mode: str) -> tuple[np.ndarray, bool]:
    """SAM's ``remove_small_regions`` (``segment_anything/utils/amg.py``) with scipy: ``holes`` fills background
    components < ``min_area`` px, ``islands`` drops foreground components < ``min_area`` (keeping the largest if all
    are small); 8-connectivity. Returns the mask and whether it changed."""
    from scipy import ndimage

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    regions, n = ndimage.label(mask != holes, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
    small = np.nonzero(sizes < min_area)[0] + 1
    if small.size == 0:
        return mask, False
    if holes:
        return mask | np.isin(regions, small), True
    big = np.setdiff1d(np.arange(1, n + 1), small)
    return np.isin(regions, big if big.size else [int(np.argmax(sizes)) + 1]), True


def drop_small_regions(masks: torch.Tensor, min_area: float, nms_thresh: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's ``postprocess_small_regions``: clean each mask, then box NMS preferring unchanged masks. Returns the
    cleaned masks and the kept indices."""
    from torchvision.ops import batched_nms, masks_to_boxes

    cleaned, unchanged = [], []
    for m in masks.cpu().numpy():
        m, c1 = remove_small_regions(m, min_area, "holes")
        m, c2 = remove_small_regions(m, min_area, "islands")
        cleaned.append(torch.from_numpy(m))
        unchanged.append(float(not (c1 or c2)))
    out = torch.stack(cleaned).to(masks.device)
    boxes = masks_to_boxes(out).float()
    keep = batched_nms(boxes, torch.tensor(unchanged, device=masks.device), torch.zeros(len(out), device=masks.device),
                       nms_thresh)
    return out, keep
