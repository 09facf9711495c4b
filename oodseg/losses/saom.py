"""Mask losses of SAM training: SAOM's objective and SAM's own promptable objective.

Logits and targets are ``[K, H, W]`` (one row per prompted mask). SAOM (Khan et al., ICIP 2024; code
``mariiak2021/SAOMv1-SAOMv2-and-PanoSAM``, cited as ``SAOM:<path>``) sums Dice and focal over the masks and adds the
class head's cross-entropy (:func:`saom_loss`); the from-scratch promptable objective (:func:`promptable_mask_loss`)
keeps one value per mask so that the lowest-loss of SAM's 3 point-prompt masks can be chosen. Not registered with
``register_loss``: these act on SAM's prompted masks, not on a segmentation model's pixel outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oodseg.losses.functional import mask_dice


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """:func:`mask_dice` summed over the masks (``SAOM:misc.py calculate_dice_loss``)."""
    return mask_dice(logits, targets).sum()


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
    head over the masks.

    Args:
        mask_logits, masks: ``[K, H, W]`` raw mask logits and binary target masks, one row per prompted mask.
        class_logits, classes: ``[K, C]`` class-head logits and ``[K]`` integer class ids.

    Returns:
        ``dice``, ``focal``, ``ce`` and their sum ``loss``, each a scalar tensor.
    """
    terms = {"dice": dice_loss(mask_logits, masks), "focal": focal_loss(mask_logits, masks),
             "ce": F.cross_entropy(class_logits, classes.long())}
    terms["loss"] = terms["dice"] + terms["focal"] + terms["ce"]
    return terms


def promptable_mask_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask Dice + mean per-pixel BCE ``[K]``: the from-scratch objective (BCE rather than SAM's focal term,
    which left a tiny from-scratch SAM at its start loss; :mod:`oodseg.training.saom_task`)."""
    bce = F.binary_cross_entropy_with_logits(logits.flatten(1), targets.float().flatten(1), reduction="none")
    return mask_dice(logits, targets) + bce.mean(1)
