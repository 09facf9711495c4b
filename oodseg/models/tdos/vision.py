"""Vision side of TDOS: the frozen CLIP ViT as a 4-level feature pyramid plus dense CLIP embeddings.

As in the release (``song1248/TextDrivenOODSegmentation:models/backbones/clip/models.py``, ``CLIPVisionTransformer``):
the patch tokens after blocks ``feature_blocks`` (ViT-B/16: 3, 5, 7, 11) are reshaped to the patch grid and brought
to strides ``p/4, p/2, p, 2p`` (``p`` = patch size; 4/8/16/32 for patch 16) by ``fpn1`` = deconv ×2, BatchNorm, GELU,
deconv ×2; ``fpn2`` = deconv ×2; ``fpn3`` = identity; ``fpn4`` = 2×2 max-pool. Dense embeddings are CLIP's own image
embedding applied to every token, ``visual_projection(post_layernorm(tokens))`` (the release's ``ln_post @ proj``),
with the CLS token giving the global embedding. The encoder layers are run one by one (same result as
``vision_model(pixel_values, interpolate_pos_encoding=True)``, tested) so that the OOD semantic augmentation can act
on the hidden states entering chosen blocks. Unlike the release, whose ``fpn1..4`` sit inside the frozen backbone
and so stay at their random initialisation, the adapters here are trainable (they have no pretrained weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

#: the release's ViT-B/16 feature blocks, for a 12-block ViT
BASE_BLOCKS = (3, 5, 7, 11)


def scaled_blocks(n_layers: int, blocks: Sequence[int] = BASE_BLOCKS, depth: int = 12) -> tuple[int, ...]:
    """Map block indices of a ``depth``-block ViT onto ``n_layers`` blocks: ``round((b + 1) · n / depth) − 1``."""
    return tuple(max(0, min(n_layers - 1, round((b + 1) * n_layers / depth) - 1)) for b in blocks)


class Adapters(nn.Module):
    """``fpn1..4``: token grids ``[B, W, h, w]`` → strides ``p/4, p/2, p, 2p``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(width, width, 2, stride=2), nn.BatchNorm2d(width), nn.GELU(),
                                  nn.ConvTranspose2d(width, width, 2, stride=2))
        self.fpn2 = nn.ConvTranspose2d(width, width, 2, stride=2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, stride=2)

    def forward(self, grids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [op(g) for op, g in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), grids, strict=True)]


class VisionFeatures(nn.Module):
    """Frozen CLIP ViT → (4 feature maps, global embedding ``[B, D]``, dense embeddings ``[B, D, h, w]``)."""

    def __init__(self, clip: Any, feature_blocks: Sequence[int]) -> None:
        super().__init__()
        self.clip = [clip]  # owned by the TDOS model (one copy in the state dict)
        cfg = clip.vision_model.config
        self.patch = int(cfg.patch_size)
        self.n_layers = int(cfg.num_hidden_layers)
        blocks = tuple(int(b) for b in feature_blocks)
        if len(blocks) != 4 or not all(0 <= b < self.n_layers for b in blocks):
            raise ValueError(f"feature_blocks must be 4 block indices in 0..{self.n_layers - 1}, got {blocks}")
        self.blocks = blocks
        self.adapters = Adapters(int(cfg.hidden_size))

    def forward(
        self, pixels: torch.Tensor, perturb: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """``perturb(i, hidden)`` (training augmentation) may replace the hidden states entering block ``i``."""
        clip = self.clip[0]
        vm = clip.vision_model
        b, _, h, w = pixels.shape
        gh, gw = h // self.patch, w // self.patch
        tower_grad = any(p.requires_grad for m in (vm, clip.visual_projection) for p in m.parameters())
        taps: dict[int, torch.Tensor] = {}
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_grad):  # frozen tower: no activations kept
            x = vm.pre_layrnorm(vm.embeddings(pixels, interpolate_pos_encoding=True))
            for i, layer in enumerate(vm.encoder.layers):
                if perturb is not None:
                    x = perturb(i, x)
                x = layer(x, None)
                if i in self.blocks:
                    taps[i] = x[:, 1:].transpose(1, 2).reshape(b, -1, gh, gw)
            emb = clip.visual_projection(vm.post_layernorm(x))
        feats = self.adapters([taps[i] for i in self.blocks])
        dense = emb[:, 1:].transpose(1, 2).reshape(b, -1, gh, gw)
        return feats, emb[:, 0], dense
