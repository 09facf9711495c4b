"""SAOM's model side: SAM plus a class head, prompted with one grid point per object (Khan et al., "Segment Any
Object Model", ICIP 2024; code ``mariiak2021/SAOMv1-SAOMv2-and-PanoSAM``, cited below as ``SAOM:<path>``).

Each GT object mask of an image gets one positive point prompt, chosen by the nearest-neighbour assignment of
:func:`assign_points` (``SAOM:per_segment_anything/samwrapperpano.py`` ``compute_points``); SAM predicts 3 masks per
point and the one with the highest predicted IoU counts (:func:`best_of_three`); a linear class head on the decoder's
IoU token (:class:`SaomHead`) names the object. Training (the loss: :mod:`oodseg.losses.saom`; the task:
:mod:`oodseg.training.saom_task`) freezes the image encoder; point embeddings and the mask decoder learn
(:func:`select_saom_parameters`). Evaluation (``SAOM:eval_miou.py``) uses the same GT-derived prompts
(:func:`saom_predict`, scored by :class:`oodseg.scoring.metrics.SaomEval`). Everything mode over :func:`point_grid`:
:func:`oodseg.refine.everything.generate_everything`.

Deliberate differences from the released code (each also noted where it happens):

* grid points are scaled to the image's own size; ``compute_points`` scales the ``[0, 1]`` grid by 1024 whatever the
  image size, so on non-1024 images its prompts do not lie on the grid used in everything mode;
* the GT mask is resized to the feature grid as a binary mask (cell = area fraction ≥ ``min_fraction``); the released
  code normalises the mask with the image mean/std before a bilinear resize (a quirk) and drops objects that vanish at
  the grid resolution, here they keep their best-overlapping cells;
* the similarity map is upsampled pad-frame → crop → original size (SAM's ``postprocess_masks``) without the extra
  ×4 bilinear step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def point_grid(nx: int, ny: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """Cell-centred ``nx × ny`` grid ``[nx·ny, 2]`` (x, y), x fastest: ``((i + ½)/nx, (j + ½)/ny)``.

    SAM's ``build_point_grid`` for ``nx ≠ ny`` (``SAOM:per_segment_anything/utils/amg.py`` ``build_point_grid_pano``;
    32×32 SAOMv1, 64×64 SAOMv2, 320×64 PanoSAM). With ``size = (H, W)`` the points are in pixels of that image
    (``x·W``, ``y·H``), as in SAM's everything mode. Released quirk not reproduced: SAOM's training/eval prompts scale
    the grid by 1024 whatever the image size."""
    if nx < 1 or ny < 1:
        raise ValueError(f"point grid needs nx, ny ≥ 1, got {nx} × {ny}")
    xs = (np.arange(nx) + 0.5) / nx
    ys = (np.arange(ny) + 0.5) / ny
    gx, gy = np.meshgrid(xs, ys)
    grid = np.stack([gx, gy], axis=-1).reshape(-1, 2)
    if size is not None:
        grid = grid * np.array([size[1], size[0]], dtype=np.float64)
    return grid


def upsample_to_image(x: torch.Tensor, original_size: tuple[int, int], input_size: tuple[int, int] | None = None,
                      pad_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Maps over the padded input frame ``[N, h, w]`` → ``[N, H, W]``: bilinear to ``pad_size``, crop the
    ``input_size`` image region, bilinear to ``original_size`` (SAM ``postprocess_masks``). Without ``input_size``
    the grid covers exactly the image."""
    y = x[:, None].float()
    if input_size is not None:
        y = F.interpolate(y, size=tuple(pad_size or input_size), mode="bilinear", align_corners=False)
        y = y[..., : input_size[0], : input_size[1]]
    return F.interpolate(y, size=tuple(original_size), mode="bilinear", align_corners=False)[:, 0]


def mask_cells(masks: torch.Tensor, grid_hw: tuple[int, int], input_size: tuple[int, int] | None = None,
               pad_size: tuple[int, int] | None = None, min_fraction: float = 0.5) -> torch.Tensor:
    """Binary masks ``[K, H, W]`` → feature-grid cells ``[K, h, w]`` they cover: the mask is resized into the
    padded input frame (antialiased), each cell's covered fraction computed, cells ≥ ``min_fraction`` kept; a
    non-empty mask with no such cell keeps its cells of maximal fraction.

    Args:
        masks: ``[K, H, W]`` bool / {0, 1} masks at the original image size.
        grid_hw: ``(h, w)`` of the feature grid.
        input_size: ``(H', W')`` of the resized image inside the padded input frame; None: the masks' own size.
        pad_size: ``(H_pad, W_pad)`` input frame the image is zero-padded to (bottom / right); None: no padding.
        min_fraction: covered fraction in ``[0, 1]`` from which a cell counts.

    Returns:
        Bool ``[K, h, w]``.
    """
    fracs = []
    for part in masks.split(32):  # bounded memory for full-resolution masks
        m = part.float()[:, None]
        if input_size is not None and tuple(input_size) != tuple(masks.shape[-2:]):
            m = F.interpolate(m, size=tuple(input_size), mode="bilinear", align_corners=False, antialias=True)
        if pad_size is not None:
            m = F.pad(m, (0, pad_size[1] - m.shape[-1], 0, pad_size[0] - m.shape[-2]))
        fracs.append(F.adaptive_avg_pool2d(m, tuple(grid_hw))[:, 0])
    frac = torch.cat(fracs) if fracs else masks.new_zeros((0, *grid_hw), dtype=torch.float32)
    cells = frac >= min_fraction
    best = frac.flatten(1).amax(1)
    weak = ~cells.flatten(1).any(1) & (best > 0)
    cells[weak] = frac[weak] >= best[weak, None, None]
    return cells


def assign_points(
    features: torch.Tensor, masks: torch.Tensor | np.ndarray, grid_xy: np.ndarray | torch.Tensor,
    input_size: tuple[int, int] | None = None, pad_size: tuple[int, int] | None = None, min_fraction: float = 0.5,
    chunk: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """SAOM's nearest-neighbour prompt assignment (``SAOM:per_segment_anything/samwrapperpano.py compute_points``).

    For each GT mask: pool the encoder features ``[C, h, w]`` over its cells (:func:`mask_cells`),
    ``target = L2norm(½·max + ½·mean)`` (PerSAM's location prior), cosine similarity to every location, upsample to
    the image (:func:`upsample_to_image`), take the arg-max pixel and snap it to the nearest grid point ``grid_xy``
    ``[G, 2]`` (pixels; ``scipy.spatial.cKDTree``). Returns ``points [K, 2]`` (NaN rows for dropped masks) and
    ``keep [K]`` (False for masks with no pixel).

    Args:
        features: one image's encoder embeddings ``[C, h, w]`` (over the padded input frame, as SAM's).
        masks: GT object masks ``[K, H, W]`` (bool / {0, 1}) at the original image size.
        grid_xy: ``[G, 2]`` (x, y) candidate prompt points in original-image pixels.
        input_size, pad_size, min_fraction: as in :func:`mask_cells` (SAM: ``SamImage.input_size``, ``sam.pad_size``).
        chunk: masks per similarity batch (bounds memory).
    """
    from scipy.spatial import cKDTree

    masks_t = torch.as_tensor(masks, device=features.device).bool()
    k, hh, ww = masks_t.shape
    c, h, w = features.shape
    cells = mask_cells(masks_t, (h, w), input_size, pad_size, min_fraction).flatten(1)
    keep = cells.any(1)
    feats = features.float().reshape(c, h * w).T  # [hw, C]
    normed = F.normalize(feats, dim=1)
    xy = np.full((k, 2), np.nan)
    idx = torch.nonzero(keep).flatten()
    for part in idx.split(chunk):
        inside = cells[part]
        peak = torch.where(inside[..., None], feats[None], float("-inf")).amax(1)
        mean = (inside.float() @ feats) / inside.sum(1, keepdim=True)
        target = F.normalize(0.5 * peak + 0.5 * mean, dim=1)
        sim = (target @ normed.T).reshape(-1, h, w)
        flat = upsample_to_image(sim, (hh, ww), input_size, pad_size).flatten(1).argmax(1)
        xy[part.cpu().numpy()] = torch.stack([flat % ww, flat // ww], 1).cpu().numpy()
    grid = np.asarray(grid_xy.cpu() if isinstance(grid_xy, torch.Tensor) else grid_xy, dtype=np.float64)
    points = np.full((k, 2), np.nan)
    kept = keep.cpu().numpy()
    if kept.any():
        _, nearest = cKDTree(grid).query(xy[kept])
        points[kept] = grid[nearest]
    return points, kept



class SaomHead(nn.Module):
    """Linear class head on the mask decoder's IoU-token output (``Linear(256, 55)`` in SAOM)."""

    def __init__(self, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.fc = nn.Linear(int(hidden), self.num_classes)

    def forward(self, iou_token: torch.Tensor) -> torch.Tensor:
        return self.fc(iou_token)


def select_saom_parameters(sam: Any, train_encoder: bool = False, head: nn.Module | None = None) -> list[nn.Parameter]:
    """Set ``requires_grad`` as SAOM trains and return the parameters to optimise (plus ``head``'s).

    Trained: ``prompt_points`` and ``prompt_other`` (of these only the positive-point, padding-point and no-mask
    embeddings receive gradients from point prompts, as in SAOM whose optimiser gets every parameter), ``decoder``.
    Frozen: ``encoder`` (unless ``train_encoder``, for from-scratch demos), ``positional`` (a fixed buffer in the
    original SAM, a parameter in transformers), ``iou_head`` (no loss reaches it; SAOM only uses it for the arg-max)."""
    groups = sam.param_groups()
    train = ["prompt_points", "prompt_other", "decoder"] + (["encoder"] if train_encoder else [])
    for name, params in groups.items():
        for p in params:
            p.requires_grad_(name in train)
    params = [p for name in train for p in groups[name]]
    return params + (list(head.parameters()) if head is not None else [])


def saom_prompts(sam: Any, img: Any, masks: torch.Tensor | np.ndarray, grid: np.ndarray,
                 min_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """:func:`assign_points` for an embedded image (``SamImage``) with the ``[0, 1]`` ``grid`` scaled to its size.

    Args:
        sam: the :class:`~oodseg.models.sam.SamSegmenter` that embedded ``img`` (gives ``pad_size``).
        img: ``sam.embed(image)``.
        masks: GT object masks ``[K, H, W]`` at ``img.original_size``.
        grid: ``[G, 2]`` (x, y) points in ``[0, 1]`` (:func:`point_grid`).
        min_fraction: as in :func:`mask_cells`.

    Returns:
        ``points [K, 2]`` (x, y) original-image pixels (NaN rows for dropped masks) and ``keep [K]`` bool.
    """
    h, w = img.original_size
    grid_px = np.asarray(grid, dtype=np.float64) * np.array([w, h], dtype=np.float64)
    return assign_points(img.embeddings[0].detach(), masks, grid_px, img.input_size, sam.pad_size, min_fraction)


def best_of_three(sam: Any, img: Any, points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-IoU mask logits ``[K, H, W]`` of the 3 per point, and the IoU tokens ``[K, D]``."""
    labels = np.ones((len(points), 1), dtype=np.int64)
    logits, iou, token = sam.mask_logits_from_points(img, points[:, None, :], labels, multimask=True)
    best = iou.argmax(-1)
    return logits[torch.arange(len(best), device=logits.device), best], token



@torch.no_grad()
def saom_predict(sam: Any, head: nn.Module | None, image: np.ndarray, masks: torch.Tensor | np.ndarray,
                 grid: np.ndarray, min_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """SAOM evaluation prompts: one predicted mask per GT mask (logit > 0 of the best-IoU output) and its predicted
    class (-1 without ``head``); dropped (empty) GT masks get an empty prediction and class -1.

    Args:
        sam: a :class:`~oodseg.models.sam.SamSegmenter`.
        head: the :class:`SaomHead` on the IoU token, or None.
        image: uint8 ``[H, W, 3]`` RGB.
        masks: GT object masks ``[K, H, W]`` (bool / {0, 1}), one prompt each.
        grid, min_fraction: as in :func:`saom_prompts`.

    Returns:
        Bool masks ``[K, H, W]`` and int64 classes ``[K]``, on the model's device.
    """
    img = sam.embed(image)
    points, keep = saom_prompts(sam, img, masks, grid, min_fraction)
    k = len(keep)
    h, w = img.original_size
    dev = img.embeddings.device
    pred = torch.zeros(k, h, w, dtype=torch.bool, device=dev)
    cls = torch.full((k,), -1, dtype=torch.long, device=dev)
    if keep.any():
        logits, token = best_of_three(sam, img, points[keep])
        sel = torch.as_tensor(keep, device=dev)
        pred[sel] = logits > 0
        if head is not None:
            cls[sel] = head(token).argmax(-1)
    return pred, cls

