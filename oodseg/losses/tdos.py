"""TDOS training loss (Song & Lee, IROS 2025; ``song1248/TextDrivenOODSegmentation``), one function per term.

Called as ``TdosLoss()(outputs, target, outlier_mask=None)`` with the :class:`~oodseg.models.tdos.TdosOutputs` of
``TDOS.forward`` in training mode and the semantic target ``[B, H, W]`` (0..18 classes, 254 pasted outlier → class
19 ``ood``, 255 ignore; with ``outlier_mask``, its 1-pixels are ``ood``). Total (release weights as defaults):

``Σ_{predictions} [2·class_CE + 5·mask_BCE + 5·dice] + 1·pixel_text_CE + 1·textual_reg``

* :func:`identity_targets`: query ``i`` ↔ class ``i`` (the release's ``IdentityAssigner``, no Hungarian matching):
  query ``i`` is labelled ``i`` with the binary mask of class ``i`` when the class is present, else no-object (20).
  Void pixels (255) belong to no mask (``ToMask``), so masks are pushed to 0 there. Mask targets are sampled at
  the points straight from the label map (:func:`indicator_sample`, no ``[M, H, W]`` masks are built).
* :func:`class_loss`: weighted CE ``Σ w_y·CE / Σ w_y`` over all queries, ``w = [1]·19 + [w_ood] + [0.1]``;
  ``ood_weight`` is ``w_ood`` (default 10) or the name of a benchmark whose release config sets it
  (:data:`RELEASE_OOD_WEIGHTS`, from the ViT-B configs ``configs/tdos/text_driven_ood_seg_vit-b_1e-5_20k-c2*-512.py``:
  10 for Cityscapes and SMIYC-AT, 4 for FS L&F, FS Static, Road Anomaly and SMIYC-OT; the release trains one model
  per benchmark, e.g. ``loss_cfg: {ood_weight: fs_lost_found}``).
* :func:`importance_points` + :func:`mask_point_losses`: BCE and naive Dice (``1 − (2Σpt + 1)/(Σp + Σt + 1)``) on
  ``num_points`` points per present mask chosen as in Mask2Former (``oversample · P`` uniform candidates, the
  ``importance · P`` most uncertain (``−|logit|``) kept, the rest uniform), averaged over masks.
* :func:`deep_supervision`: the per-prediction loss summed over the initial and every decoder-layer prediction.
* :func:`pixel_text_loss`: CE of the merged 20-channel pixel–text score map divided by ``τ = 0.07``, bilinearly
  upsampled to the target, void ignored (mean over labelled pixels; mmseg 0.x's default also counts void pixels in
  the denominator); ``align_pixels > 0`` estimates it from that many random labelled pixels per image (CPU runs).
* :func:`textual_regulariser`: CE over ``norm(text_k) · T0ᵀ`` with target ``k``: each learned text embedding must
  stay closest to its frozen CLIP anchor (``"a clean origami of a {class}"``, negative-group means).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from oodseg.labels import IGNORE_ID, OUTLIER_ID
from oodseg.losses.base import register_loss
from oodseg.losses.functional import mask_dice

NUM_CLASSES = 20
OOD_CLASS = 19
#: the release's ``ood`` class weight per benchmark (ViT-B configs; keys are our dataset names)
RELEASE_OOD_WEIGHTS = {"cityscapes": 10.0, "road_anomaly_21": 10.0, "fs_lost_found": 4.0, "fs_static": 4.0,
                       "road_anomaly": 4.0, "road_obstacle_21": 4.0}


def ood_class_weight(ood_weight: float | str) -> float:
    """A number, or a benchmark name looked up in :data:`RELEASE_OOD_WEIGHTS`."""
    if isinstance(ood_weight, str):
        if ood_weight not in RELEASE_OOD_WEIGHTS:
            raise ValueError(f"ood_weight {ood_weight!r}: not a benchmark of the release's configs "
                             f"({sorted(RELEASE_OOD_WEIGHTS)}); or give a number")
        return RELEASE_OOD_WEIGHTS[ood_weight]
    return float(ood_weight)


def semantic_with_ood(target: torch.Tensor, outlier_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Target with pasted-outlier pixels (254, or ``outlier_mask == 1``) set to class 19; 255 stays void."""
    t = target.long().clone()
    t[t == OUTLIER_ID] = IGNORE_ID if outlier_mask is not None else OOD_CLASS
    if outlier_mask is not None:
        t[outlier_mask == 1] = OOD_CLASS
    bad = (t != IGNORE_ID) & ((t < 0) | (t >= NUM_CLASSES))
    if bool(bad.any()):
        raise ValueError(f"target has class ids {torch.unique(t[bad])[:8].tolist()} outside 0..18 (and not 254/255)")
    return t


def identity_targets(target: torch.Tensor, n_classes: int = NUM_CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """``target`` ``[B, H, W]`` (0..C−1, 255) → labels ``[B, C]`` (query ``i`` → class ``i`` when present, else ``C``
    = no-object) and present ``[B, C]`` (bool)."""
    present = torch.stack([torch.bincount(t[t != IGNORE_ID], minlength=n_classes)[:n_classes] > 0
                           for t in target.long()])
    classes = torch.arange(n_classes, device=target.device).expand_as(present)
    return torch.where(present, classes, torch.full_like(classes, n_classes)), present


def class_loss(class_logits: torch.Tensor, labels: torch.Tensor, class_weight: torch.Tensor) -> torch.Tensor:
    """``Σ_q w[y_q]·CE(logits_q, y_q) / Σ_q w[y_q]`` over all queries of the batch."""
    logits, y = class_logits.flatten(0, 1).float(), labels.flatten()
    ce = F.cross_entropy(logits, y, reduction="none")
    w = class_weight.to(logits)[y]
    return (w * ce).sum() / w.sum().clamp_min(1e-12)


def point_sample(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of maps ``x`` ``[M, H, W]`` at normalised ``(x, y) ∈ [0, 1]²`` points ``[M, P, 2]`` → ``[M, P]``
    (``grid_sample``, ``align_corners=False``, as mmcv / detectron2 ``point_sample``)."""
    grid = (2.0 * coords - 1.0)[:, :, None]
    return F.grid_sample(x[:, None].float(), grid, mode="bilinear", align_corners=False)[:, 0, :, 0]


@torch.no_grad()
def importance_points(mask_logits: torch.Tensor, n_points: int, oversample: float = 3.0,
                      importance: float = 0.75) -> torch.Tensor:
    """Mask2Former point selection ``[M, P, 2]``: most uncertain of ``oversample·P`` uniform draws plus uniform."""
    m = mask_logits.shape[0]
    cand = torch.rand(m, max(int(n_points * oversample), 1), 2, device=mask_logits.device)
    uncertainty = -point_sample(mask_logits, cand).abs()
    n_imp = min(int(importance * n_points), cand.shape[1])
    idx = uncertainty.topk(n_imp, dim=1).indices
    picked = torch.gather(cand, 1, idx[..., None].expand(-1, -1, 2))
    rest = torch.rand(m, n_points - n_imp, 2, device=mask_logits.device)
    return torch.cat([picked, rest], dim=1)


def indicator_sample(target: torch.Tensor, image: torch.Tensor, cls: torch.Tensor,
                     coords: torch.Tensor) -> torch.Tensor:
    """:func:`point_sample` of the binary masks ``target[image[m]] == cls[m]`` (zero padding) without building them:
    the bilinear weights of the 4 neighbouring pixels whose label is ``cls[m]``, ``[M, P]``."""
    h, w = target.shape[-2:]
    x, y = coords[..., 0] * w - 0.5, coords[..., 1] * h - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    out = torch.zeros_like(x)
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            xi, yi = (x0 + dx).long(), (y0 + dy).long()
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            lab = target[image[:, None], yi.clamp(0, h - 1), xi.clamp(0, w - 1)]
            out = out + wx * wy * (inside & (lab == cls[:, None])).to(out.dtype)
    return out


def mask_point_losses(pred: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean BCE over all points, mean naive Dice over masks) of point logits ``[M, P]`` vs point targets."""
    return F.binary_cross_entropy_with_logits(pred, tgt), mask_dice(pred, tgt).mean()


@dataclass(frozen=True)
class _Weights:
    cls: float
    mask: float
    dice: float


def prediction_loss(class_logits: torch.Tensor, mask_logits: torch.Tensor, target: torch.Tensor,
                    labels: torch.Tensor, present: torch.Tensor, class_weight: torch.Tensor, w: _Weights,
                    n_points: int, oversample: float, importance: float) -> torch.Tensor:
    """One prediction's ``w.cls·class_CE + w.mask·BCE + w.dice·Dice`` under the identity assignment (masks of the
    present (image, class) pairs only, sampled at :func:`importance_points`).

    Args:
        class_logits: ``[B, Q, C + 1]`` query class logits (Q = C queries, 20 in TDOS; last column no-object).
        mask_logits: ``[B, Q, h, w]`` query mask logits (any resolution; sampled at normalised points).
        target: ``[B, H, W]`` class ids 0..C−1 (TDOS: 19 = ``ood``), 255 void (:func:`semantic_with_ood`).
        labels: ``[B, Q]`` query labels from :func:`identity_targets` (``C`` = no-object).
        present: ``[B, Q]`` bool, class ``q`` present in image ``b`` (:func:`identity_targets`).
        class_weight: ``[C + 1]`` CE weight per class (``ood`` and no-object included).
        w: the class / mask-BCE / Dice term weights.
        n_points: points sampled per present mask.
        oversample, importance: as in :func:`importance_points`.
    """
    loss = w.cls * class_loss(class_logits, labels, class_weight)
    if not bool(present.any()):
        return loss + 0.0 * mask_logits.sum()
    image, cls = present.nonzero(as_tuple=True)
    pred = mask_logits[image, cls]
    coords = importance_points(pred.detach(), n_points, oversample, importance)
    bce, dice = mask_point_losses(point_sample(pred, coords), indicator_sample(target, image, cls, coords))
    return loss + w.mask * bce + w.dice * dice


def deep_supervision(predictions: list[tuple[torch.Tensor, torch.Tensor]], target: torch.Tensor,
                     class_weight: torch.Tensor, w: _Weights, n_points: int, oversample: float,
                     importance: float) -> torch.Tensor:
    """Sum of :func:`prediction_loss` over every prediction (initial queries and each decoder layer).

    Args:
        predictions: ``(class_logits [B, Q, C + 1], mask_logits [B, Q, h, w])`` per prediction.
        target: ``[B, H, W]`` class ids 0..C−1, 255 void; ``C = class_weight.numel() − 1`` (no-object weight last).
        class_weight, w, n_points, oversample, importance: as in :func:`prediction_loss`.
    """
    labels, present = identity_targets(target, class_weight.numel() - 1)
    return sum(prediction_loss(c, m, target, labels, present, class_weight, w, n_points, oversample, importance)
               for c, m in predictions)


def pixel_text_loss(score_map: torch.Tensor, target: torch.Tensor, tau: float, n_pixels: int = 0) -> torch.Tensor:
    """CE of ``score_map / τ`` (``[B, C, h, w]``, upsampled bilinearly to the target) over labelled pixels.

    ``n_pixels > 0``: an unbiased estimate from ``n_pixels`` labelled pixels per image drawn uniformly with
    replacement, image means weighted by their labelled counts; :func:`point_sample` at pixel centres with border
    clamping gives exactly the upsampled logits there, so only the full-size softmax is skipped (a CPU saving).
    """
    valid = target != IGNORE_ID
    if not bool(valid.any()):
        return 0.0 * score_map.sum()
    if n_pixels <= 0:
        logits = F.interpolate(score_map.float() / tau, size=tuple(target.shape[-2:]), mode="bilinear",
                               align_corners=False)
        return F.cross_entropy(logits, target, ignore_index=IGNORE_ID)
    h, w = target.shape[-2:]
    counts = valid.flatten(1).sum(1)
    idx = torch.multinomial(valid.flatten(1).float() + (counts == 0)[:, None].float(), n_pixels, replacement=True)
    coords = torch.stack([(idx % w + 0.5) / w, (idx // w + 0.5) / h], dim=-1)
    grid = (2.0 * coords - 1.0)[:, :, None]
    logits = F.grid_sample(score_map.float() / tau, grid, mode="bilinear", padding_mode="border",
                           align_corners=False)[..., 0]
    ce = F.cross_entropy(logits, torch.gather(target.flatten(1), 1, idx), reduction="none").mean(1)
    return (ce * counts).sum() / counts.sum()


def textual_regulariser(text: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``mean_{b,k} CE(norm(text[b, k]) · anchorsᵀ, k)`` over the ``R`` anchored rows (``text`` ``[B, K, D]``,
    ``anchors`` ``[R, D]``, ``R ≤ K``; no temperature, as released)."""
    r = anchors.shape[0]
    scores = F.normalize(text[:, :r].float(), dim=-1) @ anchors.float().T
    target = torch.arange(r, device=text.device).expand(text.shape[0], -1)
    return F.cross_entropy(scores.flatten(0, 1), target.flatten())


@register_loss(
    "tdos",
    space={
        "ood_weight": {"type": "loguniform", "low": 2.0, "high": 30.0},
        "tau": {"type": "choice", "values": [0.03, 0.07, 0.1]},
    },
    models=("tdos",),
)
class TdosLoss(nn.Module):
    """``Σ_predictions [2·class_CE + 5·mask_BCE + 5·dice] + pixel_text_CE + textual_reg`` on identity-assigned
    queries (class ``i`` ↔ query ``i``, ``ood`` included); every weight defaults to the release's value."""

    def __init__(self, class_weight: float = 2.0, ood_weight: float | str = 10.0, no_object_weight: float = 0.1,
                 mask_weight: float = 5.0, dice_weight: float = 5.0, num_points: int = 12544, oversample: float = 3.0,
                 importance: float = 0.75, tau: float = 0.07, align_weight: float = 1.0, align_pixels: int = 0,
                 text_reg_weight: float = 1.0, deep_supervision: bool = True) -> None:
        super().__init__()
        if tau <= 0 or num_points < 1 or not 0.0 <= importance <= 1.0 or oversample < 1.0:
            raise ValueError(f"tdos loss: need tau > 0, num_points >= 1, importance in [0, 1], oversample >= 1; got "
                             f"{tau}, {num_points}, {importance}, {oversample}")
        weights = [1.0] * (NUM_CLASSES - 1) + [ood_class_weight(ood_weight), float(no_object_weight)]
        self.register_buffer("class_weights", torch.tensor(weights), persistent=False)
        self.w = _Weights(float(class_weight), float(mask_weight), float(dice_weight))
        self.num_points, self.oversample, self.importance = int(num_points), float(oversample), float(importance)
        self.tau, self.align_weight, self.text_reg_weight = float(tau), float(align_weight), float(text_reg_weight)
        self.align_pixels = int(align_pixels)
        self.deep_supervision = bool(deep_supervision)

    def forward(self, outputs: object, target: torch.Tensor, outlier_mask: torch.Tensor | None = None) -> torch.Tensor:
        if getattr(outputs, "score_map", None) is None or getattr(outputs, "text_embeddings", None) is None:
            raise TypeError(f"tdos loss needs the TdosOutputs of TDOS.forward in training mode, got "
                            f"{type(outputs).__name__}")
        if target.ndim != 3 or target.shape[0] != outputs.class_logits.shape[0]:
            raise ValueError(f"target must be [B, H, W] with B={outputs.class_logits.shape[0]}, got "
                             f"{tuple(target.shape)}")
        t = semantic_with_ood(target, outlier_mask)
        preds = [(outputs.class_logits, outputs.mask_logits)]
        if self.deep_supervision:
            preds = list(zip(outputs.aux_class_logits, outputs.aux_mask_logits, strict=True)) + preds
        loss = deep_supervision(preds, t, self.class_weights, self.w, self.num_points, self.oversample,
                                self.importance)
        if self.align_weight:
            loss = loss + self.align_weight * pixel_text_loss(outputs.score_map, t, self.tau, self.align_pixels)
        if self.text_reg_weight and outputs.reg_targets is not None:
            loss = loss + self.text_reg_weight * textual_regulariser(outputs.text_embeddings, outputs.reg_targets)
        return loss
