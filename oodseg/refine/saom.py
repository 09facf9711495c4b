"""SAOM core: fine-tune SAM so that one grid-point prompt returns the whole object (Khan et al., "Segment Any Object
Model", ICIP 2024; code ``mariiak2021/SAOMv1-SAOMv2-and-PanoSAM``, cited below as ``SAOM:<path>``).

Training (``SAOM:finetuneSAM.py``): each GT object mask of an image gets one positive point prompt, chosen by the
nearest-neighbour assignment of :func:`assign_points` (``SAOM:per_segment_anything/samwrapperpano.py``
``compute_points``); SAM predicts 3 masks per point, the one with the highest predicted IoU is compared with the GT
mask (Dice + focal), and a linear class head on the decoder's IoU token is trained with cross-entropy. The image
encoder is frozen; point embeddings and the mask decoder learn (:func:`select_saom_parameters`).

Evaluation (``SAOM:eval_miou.py``): the same GT-derived prompts, one predicted mask per GT instance, Σ∩ / Σ∪ / ΣGT
pooled per class (:class:`SaomEval`). Everything mode (``SAOM:per_segment_anything/automatic_mask_generator.py``):
:func:`generate_everything`.

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

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from oodseg.refine.everything import crop_boxes, drop_small_regions, masks_in_crop
from oodseg.scoring.metrics.base import MergeableMetric, as_numpy, register_metric


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
    non-empty mask with no such cell keeps its cells of maximal fraction."""
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
    ``keep [K]`` (False for masks with no pixel)."""
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
    grid = np.asarray(as_numpy(grid_xy), dtype=np.float64)
    points = np.full((k, 2), np.nan)
    kept = keep.cpu().numpy()
    if kept.any():
        _, nearest = cKDTree(grid).query(xy[kept])
        points[kept] = grid[nearest]
    return points, kept


# -- losses ----------------------------------------------------------------------------------------------------------
def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``Σ_masks 1 − (2Σpt + 1)/(Σp + Σt + 1)``, p = sigmoid(logits) (``SAOM:misc.py calculate_dice_loss``)."""
    p, t = logits.sigmoid().flatten(1), targets.float().flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).sum()


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al., ICCV 2017), mean over pixels, summed over masks
    (``SAOM:misc.py calculate_sigmoid_focal_loss``)."""
    x, t = logits.flatten(1), targets.float().flatten(1)
    p = x.sigmoid()
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss.mean(1).sum()


def saom_loss(mask_logits: torch.Tensor, masks: torch.Tensor, class_logits: torch.Tensor,
              classes: torch.Tensor) -> dict[str, torch.Tensor]:
    """``loss = dice + focal + ce`` (weights 1; ``SAOM:finetuneSAM.py``); ``ce`` = mean cross-entropy of the class
    head over the masks."""
    terms = {"dice": dice_loss(mask_logits, masks), "focal": focal_loss(mask_logits, masks),
             "ce": F.cross_entropy(class_logits, classes.long())}
    terms["loss"] = terms["dice"] + terms["focal"] + terms["ce"]
    return terms


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
    """:func:`assign_points` for an embedded image (``SamImage``) with the ``[0, 1]`` ``grid`` scaled to its size."""
    h, w = img.original_size
    grid_px = np.asarray(grid, dtype=np.float64) * np.array([w, h], dtype=np.float64)
    return assign_points(img.embeddings[0].detach(), masks, grid_px, img.input_size, sam.pad_size, min_fraction)


def _best_of_three(sam: Any, img: Any, points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-IoU mask logits ``[K, H, W]`` of the 3 per point, and the IoU tokens ``[K, D]``."""
    labels = np.ones((len(points), 1), dtype=np.int64)
    logits, iou, token = sam.mask_logits_from_points(img, points[:, None, :], labels, multimask=True)
    best = iou.argmax(-1)
    return logits[torch.arange(len(best), device=logits.device), best], token


def saom_image_loss(sam: Any, head: nn.Module, image: np.ndarray, masks: torch.Tensor | np.ndarray,
                    classes: torch.Tensor | np.ndarray, grid: np.ndarray,
                    min_fraction: float = 0.5) -> dict[str, torch.Tensor] | None:
    """SAOM's loss terms on one image with all its GT masks ``[K, H, W]`` (classes ``[K]``) as one prompt batch
    (the ``[0, 1]`` ``grid`` comes from :func:`point_grid`); None when no mask is usable."""
    encoder_grad = any(p.requires_grad for p in sam.param_groups()["encoder"])
    img = sam.embed(image, grad=encoder_grad)
    points, keep = saom_prompts(sam, img, masks, grid, min_fraction)
    if not keep.any():
        return None
    dev = img.embeddings.device
    gt = torch.as_tensor(masks, device=dev)[torch.as_tensor(keep, device=dev)]
    cls = torch.as_tensor(classes, device=dev).long()[torch.as_tensor(keep, device=dev)]
    n_cls = getattr(head, "num_classes", None)
    if n_cls is not None and (cls.min() < 0 or cls.max() >= n_cls):
        raise ValueError(f"SAOM classes must be in [0, {n_cls}), got {sorted(set(cls.tolist()))}")
    logits, token = _best_of_three(sam, img, points[keep])
    return {**saom_loss(logits, gt, head(token), cls), "n_masks": torch.tensor(float(keep.sum()))}


def saom_step(sam: Any, head: nn.Module, optimizer: torch.optim.Optimizer, image: np.ndarray,
              masks: torch.Tensor | np.ndarray, classes: torch.Tensor | np.ndarray, grid: np.ndarray,
              min_fraction: float = 0.5) -> dict[str, float]:
    """One optimizer step of :func:`saom_image_loss` on one image. Returns the loss terms and ``n_masks``; with
    no usable mask no step is taken (terms 0, ``n_masks`` 0)."""
    terms = saom_image_loss(sam, head, image, masks, classes, grid, min_fraction)
    if terms is None:
        return {"loss": 0.0, "dice": 0.0, "focal": 0.0, "ce": 0.0, "n_masks": 0.0}
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    return {k: float(v.detach()) for k, v in terms.items()}


@torch.no_grad()
def saom_predict(sam: Any, head: nn.Module | None, image: np.ndarray, masks: torch.Tensor | np.ndarray,
                 grid: np.ndarray, min_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """SAOM evaluation prompts: one predicted mask per GT mask (logit > 0 of the best-IoU output) and its predicted
    class (-1 without ``head``); dropped (empty) GT masks get an empty prediction and class -1."""
    img = sam.embed(image)
    points, keep = saom_prompts(sam, img, masks, grid, min_fraction)
    k = len(keep)
    h, w = img.original_size
    dev = img.embeddings.device
    pred = torch.zeros(k, h, w, dtype=torch.bool, device=dev)
    cls = torch.full((k,), -1, dtype=torch.long, device=dev)
    if keep.any():
        logits, token = _best_of_three(sam, img, points[keep])
        sel = torch.as_tensor(keep, device=dev)
        pred[sel] = logits > 0
        if head is not None:
            cls[sel] = head(token).argmax(-1)
    return pred, cls


@register_metric("saom")
class SaomEval(MergeableMetric):
    """SAOM's per-class pooled mask quality (``SAOM:eval_miou.py``): over all GT instances of class c (each paired
    with its predicted mask, empty if none), ``IoU_c = Σ|P∩G| / Σ|P∪G|`` and ``Acc_c = Σ|P∩G| / Σ|G|`` (pixel
    recall); ``miou`` / ``macc`` average the classes with at least one non-empty GT instance. The predicted class is
    not used (as released)."""

    columns: ClassVar[dict[str, str]] = {"miou": "saom_miou", "macc": "saom_macc"}

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        z = np.zeros(self.num_classes, dtype=np.int64)
        self.inter, self.union, self.gt, self.count = z.copy(), z.copy(), z.copy(), z.copy()

    def config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def update(self, pred_masks: Any, gt_masks: Any, classes: Any) -> SaomEval:
        """Add instances: predicted and GT bool masks ``[K, H, W]`` (paired by index) and GT classes ``[K]``."""
        p, g, c = as_numpy(pred_masks).astype(bool), as_numpy(gt_masks).astype(bool), as_numpy(classes)
        if p.shape != g.shape or p.ndim != 3 or c.shape != (p.shape[0],):
            raise ValueError(f"SaomEval: pred {p.shape} and gt {g.shape} must be [K, H, W], classes {c.shape} [K]")
        c = c.astype(np.int64)
        if c.size and (c.min() < 0 or c.max() >= self.num_classes):
            raise ValueError(f"SaomEval: classes must be in [0, {self.num_classes}), got {sorted(set(c.tolist()))}")
        n = self.num_classes
        area = g.sum((1, 2))
        self.inter += np.bincount(c, (p & g).sum((1, 2)), n).astype(np.int64)
        self.union += np.bincount(c, (p | g).sum((1, 2)), n).astype(np.int64)
        self.gt += np.bincount(c, area, n).astype(np.int64)
        self.count += np.bincount(c[area > 0], minlength=n).astype(np.int64)
        return self

    def _state(self) -> dict[str, Any]:
        return {k: getattr(self, k).copy() for k in ("inter", "union", "gt", "count")}

    def _load(self, state: Mapping[str, Any]) -> None:
        for k in ("inter", "union", "gt", "count"):
            setattr(self, k, np.asarray(state[k], dtype=np.int64).copy())

    def _merge(self, other: SaomEval) -> None:
        for k in ("inter", "union", "gt", "count"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def _compute(self) -> dict[str, Any]:
        """``miou``, ``macc``, ``iou_per_class`` / ``acc_per_class`` (NaN for absent classes), ``n_classes``."""
        present = self.count > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(present, self.inter / self.union, np.nan)
            acc = np.where(present, self.inter / self.gt, np.nan)
        return {
            "miou": float(iou[present].mean()) if present.any() else float("nan"),
            "macc": float(acc[present].mean()) if present.any() else float("nan"),
            "iou_per_class": iou.tolist(),
            "acc_per_class": acc.tolist(),
            "n_classes": int(present.sum()),
        }


# -- everything mode ---------------------------------------------------------------------------------------------------
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
    """SAM/SAOM everything mode (SAOM's defaults: ``SamAutomaticMaskGenerator3_panoPhD``; :mod:`.everything`).

    Points: ``point_grids`` (one ``[G, 2]`` grid in ``[0, 1]`` per crop layer, as the release's generator takes them)
    or the ``nx × ny`` ``grid`` (:func:`point_grid`) thinned per layer by ``crop_n_points_downscale_factor``. Crops:
    the whole image plus ``crop_n_layers`` layers of overlapping crops, each encoded on its own; per crop every point
    gives 3 masks, kept when predicted IoU ``> pred_iou_thresh`` and stability ``|logit > o| / |logit > −o|``
    (``o = stability_offset``) ``≥ stability_score_thresh`` and not cut by a crop edge, then box NMS at
    ``box_nms_thresh``; across crops box NMS at ``crop_nms_thresh`` preferring smaller crops; with ``min_area > 0``
    holes and islands below ``min_area`` px are cleaned and NMS rerun (threshold ``max(box_nms_thresh,
    crop_nms_thresh)``) preferring unchanged masks. Returns bool masks ``[N, H, W]`` and their predicted IoUs ``[N]``,
    by decreasing IoU."""
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
