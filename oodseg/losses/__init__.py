"""Training losses: ``ce``, ``oe`` (RbA outlier exposure), ``logitnorm``, ``eim`` (IsoMax+).

``create_loss(name, **cfg)(outputs, target, outlier_mask=None) -> scalar``; ``loss_space(name)`` is the Tune
search space of a loss. Conventions (255 ignore, 254 pasted outlier, bilinear resizing) are in ``base``.
"""

from oodseg.losses import functional
from oodseg.losses.base import (
    IGNORE_ID,
    OUTLIER_ID,
    PixelBatch,
    create_loss,
    list_losses,
    loss_space,
    pixel_batch,
    register_loss,
)
from oodseg.losses.modules import (
    CrossEntropyLoss,
    EnhancedIsotropyMaximizationLoss,
    LogitNormLoss,
    OutlierExposureLoss,
)

__all__ = [
    "IGNORE_ID",
    "OUTLIER_ID",
    "CrossEntropyLoss",
    "EnhancedIsotropyMaximizationLoss",
    "LogitNormLoss",
    "OutlierExposureLoss",
    "PixelBatch",
    "create_loss",
    "functional",
    "list_losses",
    "loss_space",
    "pixel_batch",
    "register_loss",
]
