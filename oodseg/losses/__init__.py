"""Training losses: ``ce``, ``oe`` (RbA outlier exposure), ``energy_oe`` (energy-bounded OE), ``logitnorm``, ``eim``
(IsoMax+), ``tdos`` (TDOS).

``create_loss(name, **cfg)(outputs, target, outlier_mask=None) -> scalar``; ``loss_info(name)`` holds the facts a
registration declares (Tune space, model changes, how it combines with a model's own loss); ``loss_space(name,
output_kind)`` is its Tune search space. Conventions (255 ignore, 254 pasted outlier, bilinear resizing) are in
``base``. A new loss is one file (a module with ``@register_loss``) plus its import line here.
"""

from oodseg.losses import energy, modules, tdos  # noqa: F401  (register ce, oe, logitnorm, eim; energy_oe; tdos)
from oodseg.losses.base import (
    LOSSES,
    LossInfo,
    PixelBatch,
    create_loss,
    list_losses,
    loss_info,
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
from oodseg.losses.tdos import TdosLoss

__all__ = [
    "LOSSES",
    "CrossEntropyLoss",
    "EnhancedIsotropyMaximizationLoss",
    "LogitNormLoss",
    "LossInfo",
    "OutlierExposureLoss",
    "PixelBatch",
    "TdosLoss",
    "create_loss",
    "list_losses",
    "loss_info",
    "loss_space",
    "pixel_batch",
    "register_loss",
]
