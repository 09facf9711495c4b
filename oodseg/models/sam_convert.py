"""Segment-anything-format SAM checkpoints → transformers ``SamModel`` (our own key mapping).

Accepted files: the official ``sam_vit_b_01ec64.pth`` / ``sam_vit_l_0b3195.pth`` / ``sam_vit_h_4b8939.pth``
(``facebookresearch/segment-anything``: a bare ``Sam.state_dict()``), the same dict under a wrapper key
(``{"model": ...}`` / ``{"state_dict": ...}``), and SAOM's fine-tuned checkpoints
(``mariiak2021/SAOMv1-SAOMv2-and-PanoSAM:finetuneSAM.py`` saves ``{"model": SamWrapper.state_dict(), "optimizer",
"lr_scheduler", "epoch", "args": argparse.Namespace}``; ``SamWrapper`` holds the SAM as ``model.*`` and its class
head as ``classifier.*``, which is not part of SAM and is dropped). Files are read with
``torch.load(weights_only=True)``; ``argparse.Namespace`` is the one extra class allowed (SAOM's ``args``).

Key layouts (segment-anything ``segment_anything/modeling/*.py`` → transformers ``models/sam/modeling_sam.py``):

* ``image_encoder.*`` → ``vision_encoder.*``: ``patch_embed.proj`` → ``patch_embed.projection``;
  ``blocks.i.norm{1,2}`` → ``layers.i.layer_norm{1,2}`` (``attn.qkv / attn.proj / attn.rel_pos_{h,w} / mlp.lin{1,2}``
  keep their names); ``neck.{0,1,2,3}`` (``Conv, LayerNorm2d, Conv, LayerNorm2d``) → ``neck.{conv1, layer_norm1,
  conv2, layer_norm2}``.
* ``prompt_encoder.*``: ``pe_layer.positional_encoding_gaussian_matrix`` → ``shared_image_embedding.
  positional_embedding`` (tied to ``prompt_encoder.shared_embedding.positional_embedding``);
  ``point_embeddings.i`` → ``point_embed.i``; ``mask_downscaling.{0,1,3,4,6}`` → ``mask_embed.{conv1, layer_norm1,
  conv2, layer_norm2, conv3}``; ``not_a_point_embed`` / ``no_mask_embed`` unchanged.
* ``mask_decoder.*``: ``transformer.layers.i.norm{1..4}`` → ``layer_norm{1..4}``; ``transformer.norm_final_attn`` →
  ``layer_norm_final_attn``; ``output_upscaling.{0,1,3}`` → ``upscale_conv1, upscale_layer_norm, upscale_conv2``;
  an MLP's ``layers.{0, 1..n-2, n-1}`` (``output_hypernetworks_mlps.j``, ``iou_prediction_head``) → ``proj_in,
  layers.{0..n-3}, proj_out``; attention projections, ``iou_token``, ``mask_tokens`` unchanged.

The architecture is read off the shapes (:func:`sam_config`): encoder width = ``pos_embed``'s last dim, depth = the
number of ``blocks``, heads = width / ``rel_pos_h``'s head dim, global-attention blocks = those whose relative
position table spans the whole ``image_size / patch`` grid (``2·grid − 1`` rows; windowed blocks have
``2·window − 1``), MLP width, patch and image size, neck / prompt / decoder widths, decoder depth, the attention
down-sampling rate and the IoU head. The decoder's head count is not in the weights: 8, as every released SAM
(``segment_anything/build_sam.py``: ``TwoWayTransformer(num_heads=8)``). The two-way blocks' LayerNorms use eps 1e-5
(``segment_anything/modeling/transformer.py``: ``nn.LayerNorm`` defaults), not transformers' 1e-6 default, which
alone moves low-res logits by ~1e-5. ViT-B gives width 768, depth 12, 12 heads,
global blocks (2, 5, 8, 11); ViT-L 1024 / 24 / 16 / (5, 11, 17, 23); ViT-H 1280 / 32 / 16 / (7, 15, 23, 31).
Every problem (unknown, missing or mis-shaped key) is a one-line :class:`CheckpointError` naming the key and file.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from oodseg.models.checkpoint import CheckpointError, read_state_dict

DECODER_HEADS = 8  # segment_anything/build_sam.py; not recoverable from the weights
TWO_WAY_NORM_EPS = 1e-5  # TwoWayAttentionBlock's nn.LayerNorm default eps (transformers' SamMaskDecoderConfig: 1e-6)
_ANCHOR = "image_encoder.patch_embed.proj.weight"
_DROPPED = ("classifier.",)  # SAOM's class head on the IoU token (SamWrapper.classifier), not part of SAM
_RENAMES = [  # (segment-anything pattern, transformers replacement), applied to the whole key
    (r"image_encoder\.patch_embed\.proj\.(\w+)", r"vision_encoder.patch_embed.projection.\1"),
    (r"image_encoder\.pos_embed", r"vision_encoder.pos_embed"),
    (r"image_encoder\.blocks\.(\d+)\.norm([12])\.(\w+)", r"vision_encoder.layers.\1.layer_norm\2.\3"),
    (r"image_encoder\.blocks\.(\d+)\.(attn\.(?:qkv|proj)\.\w+|attn\.rel_pos_[hw]|mlp\.lin[12]\.\w+)",
     r"vision_encoder.layers.\1.\2"),
    (r"prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix", r"shared_image_embedding.positional_embedding"),
    (r"prompt_encoder\.point_embeddings\.(\d+)\.weight", r"prompt_encoder.point_embed.\1.weight"),
    (r"prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder.\1.weight"),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.norm([1-4])\.(\w+)",
     r"mask_decoder.transformer.layers.\1.layer_norm\2.\3"),
    ((r"mask_decoder\.transformer\.layers\.(\d+)\.((?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
      r"\.(?:q|k|v|out)_proj\.\w+|mlp\.lin[12]\.\w+)"), r"mask_decoder.transformer.layers.\1.\2"),
    (r"mask_decoder\.transformer\.final_attn_token_to_image\.((?:q|k|v|out)_proj\.\w+)",
     r"mask_decoder.transformer.final_attn_token_to_image.\1"),
    (r"mask_decoder\.transformer\.norm_final_attn\.(\w+)", r"mask_decoder.transformer.layer_norm_final_attn.\1"),
    (r"mask_decoder\.(iou_token|mask_tokens)\.weight", r"mask_decoder.\1.weight"),
]
_SEQUENTIAL = {  # segment-anything nn.Sequential → (transformers parent, {index: module name}); activations skipped
    "image_encoder.neck": ("vision_encoder.neck", {0: "conv1", 1: "layer_norm1", 2: "conv2", 3: "layer_norm2"}),
    "prompt_encoder.mask_downscaling": ("prompt_encoder.mask_embed",
                                        {0: "conv1", 1: "layer_norm1", 3: "conv2", 4: "layer_norm2", 6: "conv3"}),
    "mask_decoder.output_upscaling": ("mask_decoder", {0: "upscale_conv1", 1: "upscale_layer_norm", 3: "upscale_conv2"}),
}
_SEQ = re.compile(r"(image_encoder\.neck|prompt_encoder\.mask_downscaling|mask_decoder\.output_upscaling)\.(\d+)\.(\w+)")
_MLP = re.compile(r"(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.(\w+)")
_TIED = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")


def read_segment_anything(path: str | Path, meta: bool = False) -> dict[str, torch.Tensor]:
    """The segment-anything-layout SAM weights in ``path``: wrapper keys unwrapped, a
    ``SamWrapper``-style prefix (``model.``) stripped, SAOM's ``classifier.*`` dropped. ``meta=True``: names and
    shapes only (cheap check before work starts)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = read_state_dict(path, meta=meta)
    anchors = [k for k in raw if k.endswith(_ANCHOR)]
    if len(anchors) != 1:
        raise CheckpointError(path, f"not a segment-anything SAM checkpoint: no unique '{_ANCHOR}' key "
                                    f"({len(anchors)} found)")
    prefix = anchors[0][: -len(_ANCHOR)]
    out = {}
    for key, value in raw.items():
        if key.startswith(prefix):
            out[key[len(prefix):]] = value
        elif not key.startswith(_DROPPED):
            raise CheckpointError(path, f"unexpected key {key!r} outside the SAM weights (prefix {prefix!r})")
    return out


def convert_key(key: str, mlp_depth: Mapping[str, int]) -> str | None:
    """segment-anything key → transformers key; ``None`` when the key is not part of SAM."""
    m = _MLP.fullmatch(key)
    if m:
        mlp, i, leaf = m.group(1), int(m.group(2)), m.group(3)
        last = mlp_depth[mlp] - 1
        return f"{mlp}.{'proj_in' if i == 0 else 'proj_out' if i == last else f'layers.{i - 1}'}.{leaf}"
    m = _SEQ.fullmatch(key)
    if m:
        parent, names = _SEQUENTIAL[m.group(1)]
        name = names.get(int(m.group(2)))
        return f"{parent}.{name}.{m.group(3)}" if name else None
    for pattern, repl in _RENAMES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def _mlp_depths(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    depth: dict[str, int] = {}
    for key in state:
        m = _MLP.fullmatch(key)
        if m:
            depth[m.group(1)] = max(depth.get(m.group(1), 0), int(m.group(2)) + 1)
    return depth


def convert_state_dict(state: Mapping[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """Rename every key; the Fourier matrix fills both tied transformers keys."""
    depth = _mlp_depths(state)
    out = {}
    for key, value in state.items():
        new = convert_key(key, depth)
        if new is None:
            raise CheckpointError(path, f"unknown segment-anything key {key!r}")
        out[new] = value
    if _TIED[0] in out:
        out[_TIED[1]] = out[_TIED[0]]
    return out


def _need(state: Mapping[str, torch.Tensor], key: str, path: str | Path) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(path, f"missing segment-anything key {key!r}")
    return state[key]


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _vision_config(state: Mapping[str, torch.Tensor], path: str | Path) -> dict[str, Any]:
    pos = _need(state, "image_encoder.pos_embed", path)  # [1, grid, grid, width]
    patch = int(_need(state, _ANCHOR, path).shape[-1])
    grid, width = int(pos.shape[1]), int(pos.shape[-1])
    depth = _count(state, r"image_encoder\.blocks\.(\d+)\.")
    if depth == 0:
        raise CheckpointError(path, "missing segment-anything keys 'image_encoder.blocks.*'")
    tables = [int(_need(state, f"image_encoder.blocks.{i}.attn.rel_pos_h", path).shape[0]) for i in range(depth)]
    head_dim = int(state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1])
    windows = {(t + 1) // 2 for t in tables if t != 2 * grid - 1}
    if len(windows) > 1 or width % head_dim:
        raise CheckpointError(path, f"'image_encoder.blocks.*.attn.rel_pos_h' shapes {sorted(set(tables))} × "
                                    f"{head_dim} fit no SAM ViT of width {width}")
    pe = _need(state, "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", path)
    return {"hidden_size": width, "num_hidden_layers": depth, "num_attention_heads": width // head_dim,
            "global_attn_indexes": [i for i, t in enumerate(tables) if t == 2 * grid - 1],
            "window_size": windows.pop() if windows else 14, "image_size": grid * patch, "patch_size": patch,
            "mlp_dim": int(_need(state, "image_encoder.blocks.0.mlp.lin1.weight", path).shape[0]),
            "output_channels": int(_need(state, "image_encoder.neck.0.weight", path).shape[0]),
            "qkv_bias": "image_encoder.blocks.0.attn.qkv.bias" in state, "num_pos_feats": int(pe.shape[1])}


def sam_config(state: Mapping[str, torch.Tensor], path: str | Path) -> Any:
    """The transformers ``SamConfig`` of a segment-anything state dict, read off its shapes."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    vision = _vision_config(state, path)
    hidden = int(_need(state, "mask_decoder.iou_token.weight", path).shape[1])
    cross = _need(state, "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight", path)
    iou_hidden = _need(state, "mask_decoder.iou_prediction_head.layers.0.weight", path)
    decoder = SamMaskDecoderConfig(
        hidden_size=hidden, num_attention_heads=DECODER_HEADS, attention_downsample_rate=hidden // int(cross.shape[0]),
        mlp_dim=int(_need(state, "mask_decoder.transformer.layers.0.mlp.lin1.weight", path).shape[0]),
        num_hidden_layers=_count(state, r"mask_decoder\.transformer\.layers\.(\d+)\."),
        num_multimask_outputs=int(_need(state, "mask_decoder.mask_tokens.weight", path).shape[0]) - 1,
        iou_head_depth=_count(state, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\."),
        iou_head_hidden_dim=int(iou_hidden.shape[0]), layer_norm_eps=TWO_WAY_NORM_EPS)
    prompt = SamPromptEncoderConfig(
        hidden_size=int(_need(state, "prompt_encoder.no_mask_embed.weight", path).shape[1]),
        image_size=vision["image_size"], patch_size=vision["patch_size"],
        mask_input_channels=int(_need(state, "prompt_encoder.mask_downscaling.3.weight", path).shape[0]),
        num_point_embeddings=_count(state, r"prompt_encoder\.point_embeddings\.(\d+)\."))
    return SamConfig(vision_config=SamVisionConfig(**vision), prompt_encoder_config=prompt, mask_decoder_config=decoder)


def check_converted(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Every ``SamModel`` key present in the converted ``state`` with its shape; else a one-line CheckpointError."""
    for key, ref in own.items():
        if key not in state:
            raise CheckpointError(path, f"missing SAM weight for transformers key {key!r}")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(path, f"{key!r} has shape {list(state[key].shape)}, the SAM read off the file "
                                        f"needs {list(ref.shape)}")
    extra = sorted(set(state) - set(own))
    if extra:
        raise CheckpointError(path, f"converted key {extra[0]!r} has no place in SamModel")
