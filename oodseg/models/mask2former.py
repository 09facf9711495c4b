"""Mask2Former (Cheng et al., "Masked-attention Mask Transformer for Universal Image Segmentation", CVPR 2022)
through transformers' ``Mask2FormerForUniversalSegmentation``: Swin-T/S/B/L or ResNet backbones, any number of
decoder layers and queries, and 1–3 feature levels in the pixel decoder and the masked-attention decoder.

Weights: ``pretrained`` = a hub id (``facebook/mask2former-swin-large-cityscapes-semantic``) or a local directory
(``HF_HUB_OFFLINE=1`` → ``local_files_only``), e.g. one written by ``convert-checkpoint --format
detectron2-mask2former`` from a detectron2 ``config.yaml`` + ``model_final.pth`` (RbA's model zoo); ``config`` = a
``Mask2FormerConfig`` (dict / instance); or ``backbone`` = a named random architecture (``tiny`` for tests,
``swin-t|s|b|l``, ``r50``) with keyword overrides in ``arch``.

Feature levels: transformers fixes the pixel decoder's deformable encoder and the decoder's cross-attention at the
three coarsest backbone levels (``res3..res5``); the reference counts them from
``SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES``, and RbA's single-decoder-layer models use only ``res5``
(RbA ``mask2former/modeling/pixel_decoder/msdeformattn.py``, ``transformer_decoder/mask2former_transformer_decoder.py``:
``num_feature_levels = len(DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES)``; the FPN then adds lateral/output convs
for every finer level). ``config.num_feature_levels`` (an extra config attribute, default 3) rebuilds exactly those
modules (:func:`set_feature_levels`); the forward code of transformers already loops over ``num_feature_levels``.

Input convention (detectron2 ``MaskFormer.forward``): RGB, ``(x − mean) / std`` in 0..255 units (the checkpoint's
``PIXEL_MEAN`` / ``PIXEL_STD``, saved as the image processor's ``image_mean`` / ``image_std`` fractions), zero padding
of the *normalised* image at the bottom/right to a multiple of ``size_divisibility`` (32). Semantic inference as the
reference: mask logits upsampled (bilinear) to the padded size, cropped to the image, sigmoid, ``Σ_q softmax(class)[c]
· sigmoid(mask)`` (no-object dropped), then resized to the output size. ``predict`` returns one crop per image
(``crops = (i, 0, 0, h, w)`` in the frame ``(h, w)`` the network saw), so the scoring layer upsamples the mask logits
to the frame, combines, and resizes the class scores to the input size — the reference order exactly. Without padding
the mask logits stay at ¼ resolution; with padding they are upsampled to the padded size and cropped here (the only
exact form; ``Q × h × w`` floats).

Test size: ``test_size=None`` (default) runs at the input size, as RbA's ``evaluate_ood.py`` does; ``(short, long)``
or ``"checkpoint"`` (the image processor's ``shortest_edge`` / ``longest_edge``, i.e. ``INPUT.MIN_SIZE_TEST`` /
``MAX_SIZE_TEST``) first resizes as detectron2's ``ResizeShortestEdge`` (bilinear, antialiased, on uint8).

``param_groups()`` (Swin's final LayerNorm, unused by the backbone's feature maps, stays frozen and in no group):
``backbone`` = the backbone; ``decoder`` = pixel decoder + transformer decoder layers, their final
LayerNorm, level embeddings, input projections; ``queries`` = the learned query features and positions; ``head`` =
class predictor + mask-embedding MLP (RbA's outlier fine-tuning trains exactly these: ``class_embed`` + ``mask_embed``,
``FREEZE_TRANSFORMER_DECODER_EXCEPT_MLP`` in RbA ``train_net.py``); ``blocks.<i>`` = backbone stages
(embeddings with stage 0), then the pixel decoder, then each masked-attention decoder layer.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oodseg.models.base import MeanStdInput, SegModel, to_nchw_uint8
from oodseg.models.eomt import IMAGENET_MEAN, IMAGENET_STD, _offline, mask_classification_forward
from oodseg.models.factory import register_model
from oodseg.models.mask2former_arch import (
    BACKBONES,
    build_hf,
    hf_config,
    load_hf,
    processor_settings,
)
from oodseg.outputs import MaskOutputs

_BLOCK_PATTERNS = (
    re.compile(r"model\.pixel_level_module\.encoder\.(?:swin\.encoder\.layers|encoder\.stages)\.(\d+)\."),
    re.compile(r"model\.pixel_level_module\.encoder\.hidden_states_norms\.stage(\d+)\."),
)


def shortest_edge_size(height: int, width: int, short: int, longest: int) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge.get_output_shape``: short side → ``short``, capped so the long side ≤
    ``longest``; rounded half up."""
    scale = short / min(height, width)
    if max(height, width) * scale > longest:
        scale = longest / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


@register_model("mask2former")
class Mask2Former(MeanStdInput, SegModel):
    """Mask2Former (transformers) as a mask-classification :class:`SegModel`: per-query class and mask logits,
    detectron2's input convention (mean/std in 0..255, zero padding to ``size_divisibility``) and its own
    Hungarian-matched loss in training. Weights, feature levels, test size: module docstring."""

    output_kind = "mask"
    own_loss = True

    def __init__(
        self,
        pretrained: str | None = None,
        config: Any = None,
        backbone: str | None = None,
        arch: dict[str, Any] | None = None,
        image_mean: tuple[float, float, float] | list[float] | None = None,
        image_std: tuple[float, float, float] | list[float] | None = None,
        size_divisibility: int | None = None,
        test_size: str | tuple[int, int] | list[int] | None = None,
    ) -> None:
        stored: dict[str, Any] = {}
        if pretrained:
            hf = load_hf(pretrained)
            stored = processor_settings(pretrained, local_files_only=_offline())
        elif config is not None or backbone is not None:
            hf = build_hf(config if config is not None else hf_config(backbone, **(arch or {})))
        else:
            raise ValueError(
                f"mask2former needs pretrained=<hub id or local dir>, config=<Mask2FormerConfig dict> or "
                f"backbone=<{' | '.join(BACKBONES)}>"
            )
        super().__init__(hf.config.num_labels)
        self.hf = hf
        for p in self._unused():
            p.requires_grad_(False)  # permanently frozen: DDP would wait for their gradients
        mean = [float(v) for v in (image_mean or stored.get("image_mean") or IMAGENET_MEAN)]
        std = [float(v) for v in (image_std or stored.get("image_std") or IMAGENET_STD)]
        self._mean, self._std = mean, std
        divisor = size_divisibility if size_divisibility is not None else stored.get("size_divisor", 32)
        self.size_divisibility = max(int(divisor), 1)  # 0 (a ResNet's own): no padding
        if test_size == "checkpoint":
            if "test_size" not in stored:
                raise ValueError(f"test_size='checkpoint': {pretrained or 'this model'} has no image processor size")
            test_size = stored["test_size"]
        if test_size is not None and (isinstance(test_size, str) or len(test_size) != 2):
            raise ValueError(f"test_size must be None, 'checkpoint' or (short, long), got {test_size!r}")
        self.test_size = None if test_size is None else (int(test_size[0]), int(test_size[1]))
        self._set_mean_std(mean, std)

    def export_cfg(self) -> dict[str, Any]:
        return {
            "config": json.loads(self.hf.config.to_json_string()),
            "image_mean": self._mean,
            "image_std": self._std,
            "size_divisibility": self.size_divisibility,
            "test_size": None if self.test_size is None else list(self.test_size),
        }

    def forward(
        self, x: torch.Tensor, target: torch.Tensor | None = None
    ) -> MaskOutputs | tuple[MaskOutputs, torch.Tensor]:
        """Normalised ``[N, 3, H, W]`` → per-query class logits ``[N, Q, C+1]`` and ¼-resolution mask logits.

        With ``target`` (semantic trainIds ``[N, H, W]``) also returns Mask2Former's own loss as transformers computes
        it (Hungarian matching on class + sampled-point mask BCE + dice costs; class CE with ``no_object_weight``,
        point-sampled mask BCE and dice, summed over every decoder layer's auxiliary prediction with
        ``class_weight`` / ``mask_weight`` / ``dice_weight``; Cheng et al., CVPR 2022), from one binary mask per
        class present (:func:`~oodseg.models.eomt.semantic_to_mask_labels`)."""
        return mask_classification_forward(self.hf, x, target, self.num_classes)

    @torch.no_grad()
    def predict(self, images_uint8: torch.Tensor) -> MaskOutputs:
        """(Resize to the test size,) pad to ``size_divisibility``, run; one crop per image.

        Returns:
            :class:`MaskOutputs`: ``class_logits [B,Q,C+1]`` (last = no-object), raw ``mask_logits`` (before the
            sigmoid) at ¼ of the frame ``(fh, fw)`` the network saw, or, when padding was needed, upsampled to the
            padded size and cropped to ``[B,Q,fh,fw]``; ``crops`` ``(i, 0, 0, fh, fw)``, ``size`` = input ``(H, W)``.
        """
        x8 = to_nchw_uint8(images_uint8).to(self.device, non_blocking=True)
        b, _, h, w = x8.shape
        fh, fw = (h, w) if self.test_size is None else shortest_edge_size(h, w, *self.test_size)
        if (fh, fw) != (h, w):
            from torchvision.transforms.v2 import functional as tvF

            x8 = tvF.resize(x8, [fh, fw], interpolation=tvF.InterpolationMode.BILINEAR, antialias=True)
        d = self.size_divisibility
        ph, pw = -(-fh // d) * d, -(-fw // d) * d
        x = F.pad(self._normalise(x8), (0, pw - fw, 0, ph - fh))
        out = self(x)
        masks = out.mask_logits
        if (ph, pw) != (fh, fw):
            masks = F.interpolate(masks, size=(ph, pw), mode="bilinear", align_corners=False)[..., :fh, :fw]
        crops = torch.tensor([(i, 0, 0, fh, fw) for i in range(b)], dtype=torch.int64)
        return MaskOutputs(class_logits=out.class_logits, mask_logits=masks, size=(int(h), int(w)), crops=crops,
                           frame_size=(int(fh), int(fw)), n_images=int(b))

    def _unused(self) -> list[nn.Parameter]:
        """Swin's final LayerNorm: ``SwinModel`` applies it to its pooled output, which the backbone's feature maps
        (``hidden_states_norms``) never use."""
        swin = getattr(self.hf.model.pixel_level_module.encoder, "swin", None)
        return list(swin.layernorm.parameters()) if swin is not None else []

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        prefixes = {
            "backbone": ("model.pixel_level_module.encoder.",),
            "queries": ("model.transformer_module.queries_",),
            "head": ("class_predictor.", "model.transformer_module.decoder.mask_predictor."),
            "decoder": ("model.pixel_level_module.decoder.", "model.transformer_module."),
        }
        groups: dict[str, list[nn.Parameter]] = {k: [] for k in prefixes}
        blocks: dict[int, list[nn.Parameter]] = {}
        n_stages = len(self.hf.config.backbone_config.out_features)
        unused = {id(p) for p in self._unused()}
        for name, p in self.hf.named_parameters():
            if id(p) in unused:
                continue
            group = next((g for g, pre in prefixes.items() if name.startswith(pre)), None)
            if group is None:
                raise RuntimeError(f"Mask2Former parameter {name!r} fits no parameter group")
            groups[group].append(p)
            index = self._block_index(name, n_stages)
            if index is not None:
                blocks.setdefault(index, []).append(p)
        return {**groups, **{f"blocks.{i}": blocks[i] for i in sorted(blocks)}}

    @staticmethod
    def _block_index(name: str, n_stages: int) -> int | None:
        """Backbone stage ``i`` → ``i`` (embeddings → 0), pixel decoder → ``n_stages``, decoder layer ``j`` →
        ``n_stages + 1 + j``; other parameters belong to no block."""
        if m := _BLOCK_PATTERNS[0].match(name):
            return int(m.group(1))
        if m := _BLOCK_PATTERNS[1].match(name):
            return int(m.group(1)) - 1
        if name.startswith(tuple(f"model.pixel_level_module.encoder.{e}." for e in ("embedder", "swin.embeddings"))):
            return 0
        if name.startswith("model.pixel_level_module.decoder."):
            return n_stages
        if m := re.match(r"model\.transformer_module\.decoder\.layers\.(\d+)\.", name):
            return n_stages + 1 + int(m.group(1))
        return None

