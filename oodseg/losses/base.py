"""Loss registry and the input handling every loss shares.

Label conventions (:mod:`oodseg.labels`): the semantic target is ``[B, H, W]`` with class ids ``0..C-1``,
``IGNORE_ID = 255`` (void) and ``OUTLIER_ID = 254`` (pixel of a pasted outlier object). The optional
``outlier_mask`` is ``0`` inlier / ``1`` outlier / ``255`` ignore; without it, outliers are ``target == 254``.
Model outputs whose resolution differs from the target are resized to it bilinearly
(``align_corners=False``) before any loss term is computed.

A registration carries the facts the trainer needs about a loss (:class:`LossInfo`): its Tune ``space`` (with
per-output-kind overrides), model changes it implies (``model_cfg`` such as EIM's IsoMax+ head, and the ``fresh``
parameters that therefore start untrained), how it combines with a model's own loss (``combine``), and which models
it is made for.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oodseg.labels import IGNORE_ID, OUTLIER_ID
from oodseg.outputs import MaskOutputs, ModelOutputs
from oodseg.registry import Registry
from oodseg.scoring.scorers import pixel_class_scores

LossOutputs = torch.Tensor | ModelOutputs

LOSSES: Registry[nn.Module] = Registry("loss")
COMBINE = ("sum", "model_loss")


@dataclass(frozen=True)
class LossInfo:
    """Registered facts of a loss.

    ``space`` / ``kind_space``: Tune search space (scorer-space format) and per-output-kind overrides (``"pixel"`` /
    ``"mask"``) where a hyper-parameter's scale depends on it (RbA thresholds). ``model_cfg``: model keyword
    arguments the loss needs (EIM: ``{"head": "isomax"}``), applied unless the run sets them itself; ``fresh``:
    parameter prefixes that are new under ``model_cfg`` and so start untrained when loading a checkpoint.
    ``combine``: with a model that has a loss of its own (``SegModel.own_loss``, EoMT's mask-classification loss),
    ``"sum"`` adds this loss to it and ``"model_loss"`` means the model's own loss *is* this objective (``ce``).
    ``models``: the models the loss is made for (None: any). ``kinds``: the output kinds it is computed on
    (``"pixel"`` logits, ``"mask"`` outputs); a ``combine="model_loss"`` loss needs none for a model with a loss of
    its own.
    """

    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    kind_space: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    model_cfg: dict[str, Any] = field(default_factory=dict)
    fresh: tuple[str, ...] = ()
    combine: str = "sum"
    models: tuple[str, ...] | None = None
    kinds: tuple[str, ...] = ("pixel", "mask")


def register_loss(name: str, **facts: Any) -> Callable:
    """Decorator registering a loss factory under ``name`` with its :class:`LossInfo` facts (``space``,
    ``kind_space``, ``model_cfg``, ``fresh``, ``combine``, ``models``, ``kinds``; each explained there)."""
    info = LossInfo(**facts)
    if info.combine not in COMBINE:
        raise ValueError(f"loss {name!r}: combine must be one of {COMBINE}, got {info.combine!r}")
    return LOSSES.register(name, info=info)


def loss_info(name: str) -> LossInfo:
    return LOSSES.meta(name)["info"]


def create_loss(name: str, **cfg: Any) -> nn.Module:
    """Build the registered loss ``name`` with constructor arguments ``cfg`` (the keys of its Tune space).

    Returns:
        An ``nn.Module`` called as ``loss(outputs, target, outlier_mask=None)`` → scalar tensor, where ``outputs``
        are raw logits ``[B,C,h,w]`` / :class:`PixelLogits` / :class:`MaskOutputs` (resized bilinearly to the
        target; ``tdos`` takes TDOS's training outputs), ``target`` is int ``[B,H,W]`` class ids with 255 = void
        and 254 = pasted outlier, and ``outlier_mask`` (optional, ``[B,H,W]``) is 0 inlier / 1 outlier / 255 ignore.
    """
    try:
        return LOSSES.create(name, **cfg)
    except TypeError as e:
        raise TypeError(f"loss {name!r}: {e}") from None


def list_losses() -> list[str]:
    return LOSSES.list()


def loss_space(name: str, output_kind: str | None = None) -> dict[str, dict[str, Any]]:
    """Tune search space of loss ``name`` (a copy; empty when the loss has no hyper-parameters), with the
    overrides the loss declares for ``output_kind`` (``"pixel"`` / ``"mask"``; None: the generic space)."""
    if output_kind not in (None, "pixel", "mask"):
        raise ValueError(f"output_kind must be 'pixel', 'mask' or None, got {output_kind!r}")
    info = loss_info(name)
    space = {**info.space, **info.kind_space.get(output_kind, {})}
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
        # the scoring layer owns the mask → pixel combination (and crop stitching)
        return pixel_class_scores(outputs, size=size), True
    if not isinstance(outputs, torch.Tensor) and hasattr(outputs, "logits"):
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
