"""TDOS decode head (the release's ``tqdmHead``, Mask2Former-style) in plain torch.

Sources: ``song1248/TextDrivenOODSegmentation:mmseg/models/decode_heads/tqdm_head.py`` and
``mmseg/models/plugins/tqdm_msdeformattn_pixel_decoder.py``; Mask2Former (Cheng et al., CVPR 2022).

* :class:`PixelDecoder`: the three coarsest levels (strides ``2p, p, p/2``) are projected (1×1 conv + GroupNorm),
  flattened with sine + level position embeddings and refined by ``layers`` post-norm blocks of
  (self-attention over all multi-scale tokens, cross-attention from pixels to the ``K`` text embeddings with a learned
  text position embedding, ReLU FFN). The finest level (``p/4``) gets an FPN lateral 1×1 conv plus the upsampled
  ``p/2`` output and a 3×3 conv; a 1×1 conv gives the mask features. **Lighter than the release, documented choice:**
  the release's self-attention is multi-scale *deformable* attention (mmcv op); here it is standard multi-head
  attention (``pixel_attn="global"``, O(T²) in the token count) or skipped (``pixel_attn="none"``: text
  cross-attention + FPN only), so no custom CUDA op is needed.
* :class:`MaskDecoder`: ``K`` queries initialised from the text embeddings (``Linear, ReLU, Linear``) with a learned
  query position embedding; ``layers`` post-norm blocks of (masked cross-attention to one level, round robin from
  the coarsest, self-attention, FFN). Masked attention: a query attends only where its previous mask prediction,
  resized to that level, has ``sigmoid ≥ 0.5`` (all positions if none). After the initial queries and after every
  layer the shared head (final LayerNorm, ``Linear → C + 1`` classes, 3-layer MLP mask embedding dotted with the
  mask features) gives a prediction: ``layers + 1`` predictions for deep supervision.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

PIXEL_ATTN = ("global", "none")


def sine_position(h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """DETR sine position encoding ``[1, dim, h, w]`` (normalised coordinates, scale 2π, temperature 10⁴)."""
    half = dim // 2
    y = torch.arange(1, h + 1, device=device, dtype=torch.float32)[:, None].expand(h, w) / (h + 1e-6) * 2 * math.pi
    x = torch.arange(1, w + 1, device=device, dtype=torch.float32)[None, :].expand(h, w) / (w + 1e-6) * 2 * math.pi
    t = 10000 ** (2 * (torch.arange(half, device=device) // 2) / half)

    def enc(c: torch.Tensor) -> torch.Tensor:
        v = c[..., None] / t
        return torch.stack([v[..., 0::2].sin(), v[..., 1::2].cos()], dim=-1).flatten(-2)

    pos = torch.cat([enc(y), enc(x)], dim=-1).permute(2, 0, 1)[None]
    if pos.shape[1] < dim:  # odd dim: pad the last channel
        pos = F.pad(pos, (0, 0, 0, 0, 0, dim - pos.shape[1]))
    return pos.to(dtype)


def _gn(dim: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, dim), dim)


def _ffn(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


class _PixelLayer(nn.Module):
    """Post-norm: [self-attention over pixels], cross-attention to text, FFN."""

    def __init__(self, dim: int, heads: int, ffn: int, self_attn: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True) if self_attn else None
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = _ffn(dim, ffn)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, text: torch.Tensor, text_pos: torch.Tensor) -> torch.Tensor:
        if self.self_attn is not None:
            q = x + pos
            x = self.norm1(x + self.self_attn(q, q, x, need_weights=False)[0])
        x = self.norm2(x + self.cross_attn(x + pos, text + text_pos, text, need_weights=False)[0])
        return self.norm3(x + self.ffn(x))


class PixelDecoder(nn.Module):
    """Multi-scale pixel decoder with text cross-attention."""

    def __init__(self, in_dim: int, dim: int, heads: int, layers: int, ffn: int, text_dim: int, n_text: int,
                 attn: str = "global") -> None:
        super().__init__()
        if attn not in PIXEL_ATTN:
            raise ValueError(f"pixel_attn must be one of {PIXEL_ATTN}, got {attn!r}")
        self.input_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(in_dim, dim, 1), _gn(dim)) for _ in range(3))
        self.level_embed = nn.Embedding(3, dim)
        self.text_proj = nn.Linear(text_dim, dim)
        self.text_pos = nn.Embedding(n_text, dim)
        self.layers = nn.ModuleList(_PixelLayer(dim, heads, ffn, attn == "global") for _ in range(layers))
        self.lateral = nn.Sequential(nn.Conv2d(in_dim, dim, 1, bias=False), _gn(dim))
        self.output = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), _gn(dim), nn.ReLU(inplace=True))
        self.mask_feature = nn.Conv2d(dim, dim, 1)
        nn.init.normal_(self.level_embed.weight)

    def forward(self, feats: list[torch.Tensor], text: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``feats`` at strides ``p/4 … 2p``, ``text`` ``[B, K, D]`` → (mask features, 3 levels coarse → fine)."""
        tokens, pos, shapes = [], [], []
        for i, f in enumerate(reversed(feats[1:])):  # strides 2p, p, p/2
            x = self.input_convs[i](f)
            h, w = x.shape[-2:]
            p = sine_position(h, w, x.shape[1], x.device, x.dtype) + self.level_embed.weight[i].view(1, -1, 1, 1)
            tokens.append(x.flatten(2).transpose(1, 2))
            pos.append(p.flatten(2).transpose(1, 2).expand(x.shape[0], -1, -1))
            shapes.append((h, w))
        x, p = torch.cat(tokens, 1), torch.cat(pos, 1)
        t = self.text_proj(text)
        tp = self.text_pos.weight[None].expand(t.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, p, t, tp)
        levels = [m.transpose(1, 2).reshape(m.shape[0], -1, h, w)
                  for m, (h, w) in zip(x.split([h * w for h, w in shapes], 1), shapes, strict=True)]
        fine = self.lateral(feats[0])
        fine = self.output(fine + F.interpolate(levels[-1], size=fine.shape[-2:], mode="bilinear", align_corners=False))
        return self.mask_feature(fine), levels


class _DecoderLayer(nn.Module):
    """Post-norm Mask2Former layer: masked cross-attention, self-attention, FFN."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = _ffn(dim, ffn)

    def forward(self, q: torch.Tensor, qpos: torch.Tensor, mem: torch.Tensor, mpos: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        q = self.norm1(q + self.cross_attn(q + qpos, mem + mpos, mem, attn_mask=mask, need_weights=False)[0])
        k = q + qpos
        q = self.norm2(q + self.self_attn(k, k, q, need_weights=False)[0])
        return self.norm3(q + self.ffn(q))


class MaskDecoder(nn.Module):
    """Text-initialised masked-attention transformer decoder + class / mask heads."""

    def __init__(self, dim: int, heads: int, layers: int, ffn: int, text_dim: int, n_queries: int,
                 n_classes: int) -> None:
        super().__init__()
        self.heads = heads
        self.query_init = nn.Sequential(nn.Linear(text_dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
        self.query_pos = nn.Embedding(n_queries, dim)
        self.level_embed = nn.Embedding(3, dim)
        self.layers = nn.ModuleList(_DecoderLayer(dim, heads, ffn) for _ in range(layers))
        self.post_norm = nn.LayerNorm(dim)
        self.cls_embed = nn.Linear(dim, n_classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim),
                                        nn.ReLU(inplace=True), nn.Linear(dim, dim))

    def head(self, q: torch.Tensor, mask_features: torch.Tensor,
             size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(class logits ``[B, K, C+1]``, mask logits ``[B, K, h, w]``, attention mask ``[B·heads, K, size]``)."""
        q = self.post_norm(q)
        cls = self.cls_embed(q)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(q), mask_features)
        att = F.interpolate(masks.detach(), size=size, mode="bilinear", align_corners=False)
        att = (att.sigmoid() < 0.5).flatten(2).repeat_interleave(self.heads, dim=0)
        att[att.all(-1)] = False  # a query with an empty mask attends everywhere
        return cls, masks, att

    def forward(self, text: torch.Tensor, mask_features: torch.Tensor,
                levels: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per prediction (initial + one per layer): class logits and mask logits, all ``K`` queries."""
        b = text.shape[0]
        mem, mpos = [], []
        for i, lv in enumerate(levels):
            h, w = lv.shape[-2:]
            mem.append(lv.flatten(2).transpose(1, 2) + self.level_embed.weight[i])
            pos = sine_position(h, w, lv.shape[1], lv.device, lv.dtype)
            mpos.append(pos.flatten(2).transpose(1, 2).expand(b, -1, -1))
        q = self.query_init(text)
        qpos = self.query_pos.weight[None].expand(b, -1, -1)
        cls, masks, att = self.head(q, mask_features, tuple(levels[0].shape[-2:]))
        all_cls, all_masks = [cls], [masks]
        for i, layer in enumerate(self.layers):
            lvl = i % len(levels)
            q = layer(q, qpos, mem[lvl], mpos[lvl], att)
            nxt = tuple(levels[(i + 1) % len(levels)].shape[-2:])
            cls, masks, att = self.head(q, mask_features, nxt)
            all_cls.append(cls)
            all_masks.append(masks)
        return all_cls, all_masks
