"""Loss registry and the input handling every loss shares.

Label conventions (docs/architecture.md): the semantic target is ``[B, H, W]`` with class ids ``0..C-1``,
``IGNORE_ID = 255`` (void) and ``OUTLIER_ID = 254`` (pixel of a pasted outlier object). The optional
``outlier_mask`` is ``0`` inlier / ``1`` outlier / ``255`` ignore; without it, outliers are ``target == 254``.
Model outputs whose resolution differs from the target are resized to it bilinearly
(``align_corners=False``) before any loss term is computed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oodseg.data.paste import IGNORE_ID, OUTLIER_ID
from oodseg.outputs import MaskOutputs, PixelLogits
from oodseg.registry import Registry

LossOutputs = torch.Tensor | PixelLogits | MaskOutputs

_LOSSES: Registry[nn.Module] = Registry("loss")


def register_loss(
    name: str | None = None,
    *,
    space: dict[str, dict[str, Any]] | None = None,
    kind_space: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> Callable:
    """Decorator registering a loss factory under ``name`` with its Tune search ``space``.

    ``space`` maps constructor argument → ``{"type": "loguniform", "low", "high"}`` or
    ``{"type": "choice", "values": [...]}`` (the scorer-space format that the Tune layer reads). ``kind_space``
    overrides entries per model output kind (``"pixel"`` / ``"mask"``) where a hyper-parameter's scale depends on
    it (e.g. RbA thresholds: per-pixel logits vs mask-classification scores).
    """
    return _LOSSES.register(name, space=dict(space or {}), kind_space=dict(kind_space or {}))


def create_loss(name: str, **cfg: Any) -> nn.Module:
    """Build the registered loss ``name`` with constructor arguments ``cfg``."""
    return _LOSSES.create(name, **cfg)


def list_losses() -> list[str]:
    return _LOSSES.list()


def loss_space(name: str, output_kind: str | None = None) -> dict[str, dict[str, Any]]:
    """Tune search space of loss ``name`` (a copy; empty when the loss has no hyper-parameters), with the
    overrides the loss declares for ``output_kind`` (``"pixel"`` / ``"mask"``; None: the generic space)."""
    if output_kind not in (None, "pixel", "mask"):
        raise ValueError(f"output_kind must be 'pixel', 'mask' or None, got {output_kind!r}")
    meta = _LOSSES.meta(name)
    space = {**meta["space"], **meta["kind_space"].get(output_kind, {})}
    return {k: copy.deepcopy(v) for k, v in space.items()}


@dataclass(frozen=True)
class PixelBatch:
    """Per-pixel view of one loss call, everything at the target resolution ``[B, H, W]``.

    ``scores`` are class logits (per-pixel models) or class scores ``L`` (mask models), ``[B, C, H, W]`` in float32
    or float64;
    ``labeled`` marks pixels carrying a class id (not 255/254, not flagged outlier); ``inlier`` / ``outlier`` are
    the two sets of the outlier-exposure term.
    """

    scores: torch.Tensor
    target: torch.Tensor
    labeled: torch.Tensor
    inlier: torch.Tensor
    outlier: torch.Tensor
    from_masks: bool


def _class_map(outputs: LossOutputs, size: tuple[int, int]) -> tuple[torch.Tensor, bool]:
    if isinstance(outputs, MaskOutputs):
        # Imported lazily: the scoring layer owns the mask → pixel combination (and crop stitching); it resizes
        # the class scores L (not the mask logits) straight to the target size.
        from oodseg.scoring import pixel_class_scores

        return pixel_class_scores(outputs, size=size), True
    if isinstance(outputs, PixelLogits):
        return outputs.logits, False
    if isinstance(outputs, torch.Tensor):
        return outputs, False
    raise TypeError(f"loss expects a logits tensor, PixelLogits or MaskOutputs, got {type(outputs).__name__}")


def pixel_batch(outputs: LossOutputs, target: torch.Tensor, outlier_mask: torch.Tensor | None = None) -> PixelBatch:
    """Validate the inputs, resize the class map to the target and derive the pixel sets."""
    if target.ndim != 3:
        raise ValueError(f"target must be [B, H, W], got shape {tuple(target.shape)}")
    scores, from_masks = _class_map(outputs, (int(target.shape[-2]), int(target.shape[-1])))
    if scores.ndim != 4:
        raise ValueError(f"class map must be [B, C, H, W], got shape {tuple(scores.shape)}")
    if target.shape[0] != scores.shape[0]:
        raise ValueError(f"target must be [B, H, W] with B={scores.shape[0]}, got shape {tuple(target.shape)}")
    if outlier_mask is not None and outlier_mask.shape != target.shape:
        raise ValueError(f"outlier_mask shape {tuple(outlier_mask.shape)} != target shape {tuple(target.shape)}")
    if scores.dtype in (torch.float16, torch.bfloat16):  # losses are computed in (at least) float32
        scores = scores.float()
    if scores.shape[-2:] != target.shape[-2:]:
        scores = F.interpolate(scores, size=tuple(target.shape[-2:]), mode="bilinear", align_corners=False)
    target = target.long()
    if outlier_mask is None:
        outlier = target == OUTLIER_ID
        inlier = (target != OUTLIER_ID) & (target != IGNORE_ID)
    else:
        outlier = outlier_mask == 1
        inlier = outlier_mask == 0
    labeled = (target != IGNORE_ID) & (target != OUTLIER_ID) & ~outlier
    num_classes = scores.shape[1]
    bad = labeled & ((target < 0) | (target >= num_classes))
    if bad.any():
        values = torch.unique(target[bad])[:8].tolist()
        raise ValueError(f"target has class ids {values} outside 0..{num_classes - 1} (and not 254/255)")
    return PixelBatch(scores, target, labeled, inlier, outlier, from_masks)
