"""The registered losses: ``ce``, ``oe`` (RbA outlier exposure), ``logitnorm`` and ``eim`` (IsoMax+).

Every loss is called as ``loss(outputs, target, outlier_mask=None) -> scalar`` (see ``oodseg.losses.base`` for the
label conventions and resizing). ``ce``, ``logitnorm`` and ``eim`` need per-pixel logits; ``oe`` also accepts
``MaskOutputs`` (EoMT), for which it returns only the outlier term because the mask-classification loss is the
model's own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from oodseg.losses.base import LossOutputs, PixelBatch, pixel_batch, register_loss
from oodseg.losses.functional import logit_normalize, masked_cross_entropy, rba_bce, rba_squared_hinge
from oodseg.outputs import MaskOutputs
from oodseg.scoring.scorers import rba_score


def _per_pixel_batch(
    name: str, outputs: LossOutputs, target: torch.Tensor, outlier_mask: torch.Tensor | None
) -> PixelBatch:
    if isinstance(outputs, MaskOutputs):
        raise TypeError(
            f"loss {name!r} needs per-pixel logits; mask-classification models (MaskOutputs) are trained with "
            "their own mask loss, optionally plus the 'oe' term"
        )
    return pixel_batch(outputs, target, outlier_mask)


@register_loss("ce", combine="model_loss", kinds=("pixel",))
class CrossEntropyLoss(nn.Module):
    """Pixel cross-entropy ``Σ_i w_{y_i}·(−log softmax(z_i)[y_i]) / Σ_i w_{y_i}`` over labelled pixels.

    Pixels with target 255 (void) or 254 (pasted outlier) are ignored; ``class_weights`` (length C) default to 1.
    """

    def __init__(self, class_weights: Sequence[float] | torch.Tensor | None = None) -> None:
        super().__init__()
        weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        if weight is not None and (weight.ndim != 1 or bool((weight < 0).any())):
            raise ValueError(f"class_weights must be a 1-D non-negative sequence, got {class_weights!r}")
        self.register_buffer("class_weights", weight)

    def forward(
        self, outputs: LossOutputs, target: torch.Tensor, outlier_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b = _per_pixel_batch("ce", outputs, target, outlier_mask)
        if self.class_weights is not None and self.class_weights.numel() != b.scores.shape[1]:
            raise ValueError(f"{self.class_weights.numel()} class_weights for {b.scores.shape[1]} classes")
        return masked_cross_entropy(b.scores, b.target, b.labeled, self.class_weights)


@register_loss(
    "oe",
    space={
        "weight": {"type": "loguniform", "low": 0.01, "high": 10.0},
        "tau_in": {"type": "choice", "values": [-2.0, -1.0, 0.0]},
        "tau_out": {"type": "choice", "values": [1.0, 3.0, 5.0]},
    },
    # per-pixel logits, 19 classes: s = −Σ tanh(z_c) ∈ [−19, 19] and a confident inlier sits near 17, so the
    # thresholds live just below / above that (fine-tuning the demo ERFNet worked with 15 / 18.5 and weight 0.03)
    kind_space={
        "pixel": {
            "weight": {"type": "loguniform", "low": 0.003, "high": 1.0},
            "tau_in": {"type": "choice", "values": [13.0, 15.0, 16.0]},
            "tau_out": {"type": "choice", "values": [17.5, 18.5, 18.9]},
        }
    },
)
class OutlierExposureLoss(nn.Module):
    """Outlier exposure with the RbA objective (Nayal et al., ICCV 2023; github.com/NazirNayal8/RbA).

    With per-pixel class scores ``L`` (logits, or for ``MaskOutputs``
    ``L[c] = Σ_q softmax(class_logits_q)[c]·sigmoid(mask_logits_q)`` from ``oodseg.scoring.pixel_class_scores``)
    and the RbA score ``s = −Σ_c tanh(L_c)`` (higher = more anomalous):

    * ``variant="squared_hinge"``: ``OE = ½·[mean_in relu(s − τ_in)² + mean_out relu(τ_out − s)²]``
    * ``variant="bce"``: ``OE = ½·mean_{in ∪ out} BCE(sigmoid(s), 1[outlier])``

    Total: per-pixel logits → ``CE(inlier pixels) + weight·OE``; ``MaskOutputs`` → ``weight·OE`` only (the trainer
    adds EoMT's own mask-classification loss). Defaults follow RbA's released COCO-OE checkpoint (``τ_in = 0``,
    ``τ_out = 5``, weight 1, squared hinge). Note that for mask outputs ``L ≥ 0`` so ``s ≤ 0``: with these
    defaults the inlier hinge never fires and the outlier hinge always does. Unlike RbA, which computes ``s`` at
    the mask resolution and then resizes it, ``L`` is resized to the target first. Empty pixel sets contribute 0.
    """

    def __init__(
        self, weight: float = 1.0, tau_in: float = 0.0, tau_out: float = 5.0, variant: str = "squared_hinge"
    ) -> None:
        super().__init__()
        if variant not in ("squared_hinge", "bce"):
            raise ValueError(f"oe variant must be 'squared_hinge' or 'bce', got {variant!r}")
        if weight < 0:
            raise ValueError(f"oe weight must be >= 0, got {weight}")
        self.weight = float(weight)
        self.tau_in = float(tau_in)
        self.tau_out = float(tau_out)
        self.variant = variant

    def outlier_term(self, batch: PixelBatch) -> torch.Tensor:
        """The unweighted OE term of one resolved batch."""
        score = rba_score(batch.scores)
        if self.variant == "bce":
            return rba_bce(score, batch.inlier, batch.outlier)
        return rba_squared_hinge(score, batch.inlier, batch.outlier, self.tau_in, self.tau_out)

    def forward(
        self, outputs: LossOutputs, target: torch.Tensor, outlier_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b = pixel_batch(outputs, target, outlier_mask)
        oe = self.weight * self.outlier_term(b)
        if b.from_masks:
            return oe
        return masked_cross_entropy(b.scores, b.target, b.labeled) + oe

    def extra_repr(self) -> str:
        return f"weight={self.weight}, tau_in={self.tau_in}, tau_out={self.tau_out}, variant={self.variant!r}"


@register_loss("logitnorm", space={"temperature": {"type": "loguniform", "low": 0.01, "high": 1.0}}, kinds=("pixel",))
class LogitNormLoss(nn.Module):
    """LogitNorm: cross-entropy on ``z / (τ·(‖z‖₂ + 1e-7))`` per pixel, norm over classes.

    Wei et al., "Mitigating Neural Network Overconfidence with Logit Normalization", ICML 2022. Default
    ``τ = 0.04`` is the paper's CIFAR-10 value. Pixels with target 255/254 are ignored.
    """

    def __init__(self, temperature: float = 0.04) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"logitnorm temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(
        self, outputs: LossOutputs, target: torch.Tensor, outlier_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b = _per_pixel_batch("logitnorm", outputs, target, outlier_mask)
        return masked_cross_entropy(logit_normalize(b.scores, self.temperature), b.target, b.labeled)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


@register_loss("eim", space={"entropic_scale": {"type": "loguniform", "low": 1.0, "high": 30.0}},
               model_cfg={"head": "isomax"}, fresh=("head.",), models=("erfnet", "timm_seg"), kinds=("pixel",))
class EnhancedIsotropyMaximizationLoss(nn.Module):
    """IsoMax+ / Enhanced Isotropy Maximization loss: ``CE(E_s · logits)`` with entropic scale ``E_s = 10``.

    Macêdo & Ludermir, "Enhanced Isotropy Maximization Loss", 2021 (arXiv:2105.14399). ``logits`` come from
    the IsoMax+ head (``oodseg.models.heads``): ``−|s|·‖f̂ − p̂_c‖`` with learnable prototypes and distance
    scale; ``E_s`` is used only in training (inference scores use the raw logits). Targets 255/254 are ignored.
    The registration gives the model that head (``model_cfg={"head": "isomax"}``, started fresh on a checkpoint).
    """

    def __init__(self, entropic_scale: float = 10.0) -> None:
        super().__init__()
        if entropic_scale <= 0:
            raise ValueError(f"eim entropic_scale must be > 0, got {entropic_scale}")
        self.entropic_scale = float(entropic_scale)

    def forward(
        self, outputs: LossOutputs, target: torch.Tensor, outlier_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b = _per_pixel_batch("eim", outputs, target, outlier_mask)
        return masked_cross_entropy(self.entropic_scale * b.scores, b.target, b.labeled)

    def extra_repr(self) -> str:
        return f"entropic_scale={self.entropic_scale}"
