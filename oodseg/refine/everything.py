"""SAM's automatic ("everything") mask generation, :func:`generate_everything` (SAM's and SAOM's), and its pieces:
crop layers, per-crop mask filtering, small-region cleanup.

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
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from oodseg.models.saom import point_grid

EDGE_ATOL = 20.0  # is_box_near_crop_edge's tolerance (px)


def crop_boxes(h: int, w: int, n_layers: int, overlap_ratio: float) -> tuple[list[list[int]], list[int]]:
    """SAM's crop boxes ``[x0, y0, x1, y1]`` and their layer indexes."""
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
    """Bool masks ``[N, H, W]`` in the image frame and predicted IoUs ``[N]`` from one crop.

    Args:
        sam: a :class:`~oodseg.models.sam.SamSegmenter` (or anything with its ``embed`` / ``mask_logits_from_points``).
        image: the whole uint8 ``[H, W, 3]`` RGB image; only ``crop_box`` of it is encoded.
        crop_box: ``[x0, y0, x1, y1]`` in image pixels (from :func:`crop_boxes`).
        grid: ``[G, 2]`` xy points in ``[0, 1]``, scaled to the crop's width and height.
        points_per_batch: points prompted per decoder call (a memory / speed knob).
        pred_iou_thresh: keep masks with predicted IoU ``>`` this (``0`` turns the filter off).
        stability_score_thresh: keep masks with stability ``≥`` this (``0`` turns the filter off).
        stability_offset: ``o`` of the stability score ``|logit > o| / |logit > −o|``.
        box_nms_thresh: IoU threshold of the box NMS among this crop's masks.
    """
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


def layer_grids(grid: Sequence[int], n_layers: int, downscale: int) -> list[np.ndarray]:
    """SAM's ``build_all_layer_point_grids`` for an ``nx × ny`` grid (SAOM's ``build_all_layer_point_grids_pano``):
    layer ``i`` gets ``int(nx / downscale^i) × int(ny / downscale^i)`` points in ``[0, 1]``."""
    return [point_grid(int(grid[0] / downscale ** i), int(grid[1] / downscale ** i)) for i in range(n_layers + 1)]


@torch.no_grad()
def generate_everything(
    sam: Any, image: np.ndarray, grid: Sequence[int] = (32, 32), points_per_batch: int = 64,
    pred_iou_thresh: float = 0.3, stability_score_thresh: float = 0.95, box_nms_thresh: float = 0.3,
    min_area: float = 150, stability_offset: float = 1.0, *, point_grids: Sequence[Any] | None = None,
    crop_n_layers: int = 0, crop_overlap_ratio: float = 512 / 1500, crop_n_points_downscale_factor: int = 1,
    crop_nms_thresh: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM/SAOM everything mode (SAOM's defaults: ``SamAutomaticMaskGenerator3_panoPhD``; the pieces above).

    Points: ``point_grids`` (one ``[G, 2]`` grid in ``[0, 1]`` per crop layer, as the release's generator takes them)
    or the ``nx × ny`` ``grid`` (:func:`point_grid`) thinned per layer by ``crop_n_points_downscale_factor``. Crops:
    the whole image plus ``crop_n_layers`` layers of overlapping crops, each encoded on its own; per crop every point
    gives 3 masks, kept when predicted IoU ``> pred_iou_thresh`` and stability ``|logit > o| / |logit > −o|``
    (``o = stability_offset``) ``≥ stability_score_thresh`` and not cut by a crop edge, then box NMS at
    ``box_nms_thresh``; across crops box NMS at ``crop_nms_thresh`` preferring smaller crops; with ``min_area > 0``
    holes and islands below ``min_area`` px are cleaned and NMS rerun (threshold ``max(box_nms_thresh,
    crop_nms_thresh)``) preferring unchanged masks. Returns bool masks ``[N, H, W]`` and their predicted IoUs ``[N]``,
    by decreasing IoU.

    Args:
        sam: a :class:`~oodseg.models.sam.SamSegmenter` (or anything with its ``embed`` / ``mask_logits_from_points``).
        image: uint8 ``[H, W, 3]`` RGB image.
        points_per_batch: points prompted per decoder call (a memory / speed knob).
        crop_overlap_ratio: crop overlap as a fraction of the image's short side at layer 1 (halved per layer).
    """
    from torchvision.ops import batched_nms, masks_to_boxes

    grids = ([np.asarray(g, dtype=np.float64) for g in point_grids] if point_grids is not None
             else layer_grids(grid, crop_n_layers, crop_n_points_downscale_factor))
    if len(grids) != crop_n_layers + 1 or any(g.ndim != 2 or g.shape[-1] != 2 for g in grids):
        raise ValueError(f"point_grids: need crop_n_layers + 1 = {crop_n_layers + 1} grids of shape [G, 2], got "
                         f"{[tuple(g.shape) for g in grids]}")
    h, w = image.shape[:2]
    boxes, layers = crop_boxes(h, w, crop_n_layers, crop_overlap_ratio)
    parts = [masks_in_crop(sam, image, box, grids[layer], points_per_batch, pred_iou_thresh, stability_score_thresh,
                           stability_offset, box_nms_thresh) for box, layer in zip(boxes, layers, strict=True)]
    masks, scores = torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts])
    if len(boxes) > 1 and len(masks):
        area = torch.cat([torch.full((len(s),), float((b[2] - b[0]) * (b[3] - b[1]))) for (_, s), b in
                          zip(parts, boxes, strict=True)])
        keep = batched_nms(masks_to_boxes(masks).float(), (1 / area).to(masks.device), torch.zeros_like(scores),
                           crop_nms_thresh)
        masks, scores = masks[keep], scores[keep]
    if len(masks) and min_area > 0:
        masks, keep = drop_small_regions(masks, min_area, max(box_nms_thresh, crop_nms_thresh))
        masks, scores = masks[keep], scores[keep]
    order = torch.argsort(scores, descending=True, stable=True)
    return masks[order], scores[order]
