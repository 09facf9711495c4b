"""Text side of TDOS: learned-context prompts through the frozen CLIP text tower, and DenseCLIP's context decoder.

Prompt layout (CoOp, Zhou et al. IJCV 2022; DenseCLIP, Rao et al. CVPR 2022; TDOS
``song1248/TextDrivenOODSegmentation:models/backbones/clip/models.py`` ``CLIPTextContextEncoder``): every class name is
tokenised to ``name_len`` ids ``SOT name… EOT pad…``; ``n_ctx`` learned context vectors (shared by all prompts) are
inserted after SOT, so the sequence is ``SOT ctx_1..ctx_n name… EOT pad…`` (length ``name_len + n_ctx``). The
``n_negative`` negative prompt slots have ``neg_len`` learned token vectors in place of a class name, then EOT:
``SOT ctx… neg_1..neg_m EOT pad…``. Token embeddings then go through the frozen tower exactly as CLIP does
(position embeddings, causal encoder, final LayerNorm) and are pooled at the EOT position, *shifted by ``n_ctx``*, then
projected (``text_projection``). With ``n_ctx = 0`` this is ``CLIPModel.get_text_features`` (tested).

Deviation from the release, on purpose: its encoder drops the position embedding and pools at the un-shifted EOT
index, which then lies inside the context block; under the causal mask that token never sees the class name, so
names with equal token counts get identical embeddings, and every negative slot (token ids 0, pooled at index 0)
depends on its first vector only. transformers 5.x ``CLIPTextModel.forward`` no longer takes ``inputs_embeds``, so the
tower's sub-modules are called directly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

#: the 19 Cityscapes classes (mmseg ``CityscapesDataset.CLASSES`` spelling) plus TDOS's ``ood`` class, id 19
CITYSCAPES_OOD_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle", "ood",
)
OOD_INDEX = 19


def check_class_names(class_names: Any) -> tuple[str, ...]:
    """20 non-empty names with ``'ood'`` at index 19, else a one-line ``ValueError`` naming the option."""
    names = tuple(str(c) for c in class_names)
    if len(names) != len(CITYSCAPES_OOD_CLASSES) or names[OOD_INDEX] != "ood" or not all(n.strip() for n in names):
        raise ValueError(f"class_names: expected the 19 Cityscapes classes plus 'ood' at index 19 (20 names), got "
                         f"{len(names)} names ending in {names[-1:]!r}")
    return names


def eot_positions(ids: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Index of the first EOT in each row of ``ids`` ``[K, L]``; rows without one raise."""
    hit = ids == eot_id
    if not bool(hit.any(-1).all()):
        raise ValueError(f"every prompt needs an EOT token ({eot_id}); increase name_len")
    return hit.int().argmax(-1)


class PromptTextEncoder(nn.Module):
    """``K = C + n_negative`` text embeddings ``[K, D]`` from the frozen CLIP text tower."""

    def __init__(self, clip: Any, class_ids: torch.Tensor, sot_id: int, eot_id: int, n_ctx: int, n_negative: int,
                 neg_len: int) -> None:
        super().__init__()
        self.clip = [clip]  # not a sub-module: the TDOS model owns the tower (one copy in the state dict)
        width = clip.text_model.config.hidden_size
        name_len = int(class_ids.shape[1])
        max_pos = clip.text_model.config.max_position_embeddings
        if name_len + n_ctx > max_pos:
            raise ValueError(f"name_len {name_len} + n_ctx {n_ctx} exceeds the text tower's {max_pos} positions")
        if n_negative and not 1 <= neg_len <= name_len - 2:
            raise ValueError(f"neg_len must be in 1..name_len-2 = {name_len - 2}, got {neg_len}")
        self.n_ctx, self.n_negative, self.neg_len = int(n_ctx), int(n_negative), int(neg_len)
        neg_ids = torch.full((n_negative, name_len), sot_id, dtype=torch.long)
        neg_ids[:, 1 + neg_len] = eot_id
        self.register_buffer("ids", torch.cat([class_ids.long(), neg_ids]), persistent=False)
        eot = torch.cat([eot_positions(class_ids, eot_id), torch.full((n_negative,), 1 + neg_len)])
        self.register_buffer("eot", eot, persistent=False)
        # CoOp initialisation N(0, 0.02²) (the release uses trunc_normal_ with std 1, far above CLIP's token scale)
        self.ctx = nn.Parameter(torch.randn(n_ctx, width) * 0.02)
        self.neg = nn.Parameter(torch.randn(n_negative, neg_len, width) * 0.02)

    def token_embeddings(self) -> torch.Tensor:
        """``[K, name_len + n_ctx, W]``: SOT, context, then name (or learned negative) tokens."""
        emb = self.clip[0].text_model.embeddings.token_embedding(self.ids)
        c = emb.shape[0] - self.n_negative
        if self.n_negative:
            neg = torch.cat([emb[c:, :1], self.neg.to(emb.dtype), emb[c:, 1 + self.neg_len:]], dim=1)
            emb = torch.cat([emb[:c], neg])
        ctx = self.ctx.to(emb.dtype).expand(emb.shape[0], -1, -1)
        return torch.cat([emb[:, :1], ctx, emb[:, 1:]], dim=1)

    def forward(self) -> torch.Tensor:
        return encode_embeddings(self.clip[0], self.token_embeddings(), self.eot + self.n_ctx)


def encode_embeddings(clip: Any, embeds: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """CLIP text features ``[K, D]`` of token embeddings ``[K, L, W]`` pooled at positions ``eot`` ``[K]``."""
    from transformers.masking_utils import create_causal_mask

    tm = clip.text_model
    h = tm.embeddings(inputs_embeds=embeds)
    mask = create_causal_mask(config=tm.config, inputs_embeds=h, attention_mask=None, cache=None)
    z = tm.final_layer_norm(tm.encoder(inputs_embeds=h, attention_mask=mask, is_causal=True).last_hidden_state)
    return clip.text_projection(z[torch.arange(z.shape[0], device=z.device), eot])


class ContextAttention(nn.Module):
    """Multi-head attention with bias-free ``q_proj`` / ``k_proj`` / ``v_proj`` and a biased output ``proj``, as the
    release's DenseCLIP ``Attention(qkv_bias=False)`` (``models/backbones/clip/models.py``); scale ``d_head^-½``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"context decoder: width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width, bias=False) for _ in range(3))
        self.proj = nn.Linear(width, width)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        def split(x: torch.Tensor) -> torch.Tensor:  # [B, N, C] → [B, heads, N, C / heads]
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(q)), split(self.k_proj(k)), split(self.v_proj(v)))
        return self.proj(out.transpose(1, 2).flatten(2))


class _ContextLayer(nn.Module):
    """Pre-norm decoder layer: self-attention over text, cross-attention to visual context, GELU MLP (× 4)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = ContextAttention(width, heads)
        self.cross_attn = ContextAttention(width, heads)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        q = self.norm1(x)
        x = x + self.drop(self.self_attn(q, q, q))
        q = self.norm2(x)
        x = x + self.drop(self.cross_attn(q, mem, mem))
        return x + self.drop(self.mlp(self.norm3(x)))


class ContextDecoder(nn.Module):
    """DenseCLIP context decoder: ``text ← text + γ · Dec(text, [CLS; dense])`` (``[B, K, D]``).

    Memory and text are projected to ``width`` (LayerNorm, Linear), refined by ``layers`` :class:`_ContextLayer`
    blocks (attention: :class:`ContextAttention`, q/k/v without bias as released) and projected back. ``γ`` starts at 1e-4 (DenseCLIP; the TDOS release overwrites it with a
    ``trunc_normal_`` draw, std 1).
    """

    def __init__(self, dim: int, width: int, heads: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.memory_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.LayerNorm(width))
        self.text_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
        self.layers = nn.ModuleList(_ContextLayer(width, heads, dropout) for _ in range(layers))
        self.out_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        self.gamma = nn.Parameter(torch.full((dim,), 1e-4))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """``text`` ``[K, D]`` or ``[B, K, D]``, ``visual`` ``[B, 1 + HW, D]`` → refined text ``[B, K, D]``."""
        if text.ndim == 2:
            text = text.expand(visual.shape[0], -1, -1)
        mem = self.memory_proj(visual)
        x = self.text_proj(text)
        for layer in self.layers:
            x = layer(x, mem)
        return text + self.gamma * self.out_proj(x)
