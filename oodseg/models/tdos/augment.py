"""OOD semantic augmentation for the TDOS ViT (training only): restyle pasted-outlier tokens towards inlier statistics.

Why not the released variant: ``ResidualAugmentedAttentionBlock`` (``song1248/TextDrivenOODSegmentation:
models/backbones/clip/models.py``, used in ViT block 11) adds noise to the *CLS query only*, computes
``attn(x_noisy, x, x)`` and keeps it for the tokens inside the OOD mask. Attention row ``j`` depends on query ``j``
alone, so every patch row of the noisy pass equals the clean pass: the combination is bit-identical to plain attention
(``mode="off"`` therefore reproduces the release exactly). The evident intent, and what the release's RN50 backbone
really does (``_apply_noise_and_style``: AdaIN of the OOD region to the non-OOD channel statistics, mixed in with
``α = 0.2`` half of the time), is implemented here on ViT tokens (``mode="adain"``):

for each image, with probability ``prob``, the patch tokens ``x_t`` inside the outlier mask ``O`` entering each block
in ``blocks`` become ``(1 − α) x_t + α [(x_t − μ_O) / σ_O · σ_I + μ_I] + β σ_I ε``, ``ε ~ N(0, 1)``, where
``μ, σ`` are per-channel statistics over the image's mask tokens ``O`` and its other patch tokens ``I``. CLS and all
tokens outside ``O`` are left untouched. A token belongs to ``O`` when at least half of its patch is outlier.
Statistics are per region (the release's RN50 normalises by whole-image content statistics); ``β`` (noise) has no
released counterpart for this form and is our choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

MODES = ("adain", "off")


@dataclass(frozen=True)
class AugmentConfig:
    mode: str = "adain"
    blocks: tuple[int, ...] = ()
    prob: float = 0.5
    alpha: float = 0.2
    noise: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"augment must be one of {MODES}, got {self.mode!r}")
        if not (0.0 <= self.prob <= 1.0 and 0.0 <= self.alpha <= 1.0 and self.noise >= 0.0):
            raise ValueError(f"augment_prob and augment_alpha must be in [0, 1] and augment_noise >= 0, got "
                             f"{self.prob}, {self.alpha}, {self.noise}")


def token_mask(outlier: torch.Tensor, patch: int) -> torch.Tensor:
    """Outlier pixels ``[N, H, W]`` (bool) → tokens ``[N, (H/p)·(W/p)]`` whose patch is at least half outlier."""
    frac = F.avg_pool2d(outlier[:, None].float(), kernel_size=patch, stride=patch)
    return (frac[:, 0] >= 0.5).flatten(1)


def _masked_stats(x: torch.Tensor, m: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and std of ``x`` ``[N, T, C]`` over tokens where ``m`` ``[N, T]``."""
    w = m[..., None].to(x.dtype)
    n = w.sum(1, keepdim=True).clamp_min(1.0)
    mean = (x * w).sum(1, keepdim=True) / n
    var = (((x - mean) * w) ** 2).sum(1, keepdim=True) / n
    return mean, torch.sqrt(var + eps)


def adain_tokens(hidden: torch.Tensor, mask: torch.Tensor, apply: torch.Tensor, alpha: float, noise: float
                 ) -> torch.Tensor:
    """Restyle masked patch tokens of ``hidden`` ``[N, 1 + T, C]`` (CLS first) in the images where ``apply`` ``[N]``.

    ``mask`` ``[N, T]`` marks the outlier tokens. Images with no outlier token or fewer than 2 inlier tokens are
    left unchanged (no statistics to transfer).
    """
    tok = hidden[:, 1:]
    inl = ~mask
    usable = apply & mask.any(1) & (inl.sum(1) >= 2)
    m = mask & usable[:, None]
    if not bool(m.any()):
        return hidden
    mu_o, sd_o = _masked_stats(tok, mask)
    mu_i, sd_i = _masked_stats(tok, inl)
    styled = (tok - mu_o) / sd_o * sd_i + mu_i
    new = (1.0 - alpha) * tok + alpha * styled + noise * sd_i * torch.randn_like(tok)
    return torch.cat([hidden[:, :1], torch.where(m[..., None], new, tok)], dim=1)


class OutlierTokenAugment:
    """Callable ``(block index, hidden) → hidden`` for :class:`~oodseg.models.tdos.vision.VisionFeatures`."""

    def __init__(self, cfg: AugmentConfig, mask: torch.Tensor) -> None:
        self.cfg, self.mask = cfg, mask
        self.apply = torch.rand(mask.shape[0], device=mask.device) < cfg.prob

    def __call__(self, block: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.cfg.mode == "off" or block not in self.cfg.blocks:
            return hidden
        return adain_tokens(hidden, self.mask, self.apply, self.cfg.alpha, self.cfg.noise)
