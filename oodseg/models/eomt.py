"""EoMT — Encoder-only Mask Transformer (Kerssies et al., "Your ViT is Secretly an Image Segmentation Model",
CVPR 2025) through transformers' ``EomtForUniversalSegmentation``.

Weights: ``pretrained`` = a hub id (e.g. ``tue-mps/cityscapes_semantic_eomt_large_1024``) or a local directory,
loaded with ``from_pretrained`` (``HF_HUB_OFFLINE=1`` → ``local_files_only``); or ``config`` = an ``EomtConfig``
(dict / instance) for a randomly initialised model (tests, and rebuilding a fine-tuned model from safetensors).

Input convention = the checkpoint's image processor (``AutoImageProcessor``; ``EomtImageProcessor`` defaults when the
directory has none): RGB rescaled by 1/255 and normalised with its ``image_mean`` / ``image_std`` (ImageNet by
default). The network only accepts ``S × S`` inputs, ``S = config.image_size``.

Semantic inference as the reference does it for Cityscapes (transformers ``EomtImageProcessor`` with
``do_split_image=True`` + ``post_process_semantic_segmentation``): resize the image (bilinear, antialiased, on the uint8
image) so its short side is ``S`` (long side ``int(S · long / short)``); cut ``n = ceil(long / S)`` square windows
along the long side starting at ``int(i · (S − o))`` with ``o = (n·S − long) / (n − 1)`` (evenly spread overlap,
first at 0, last ending at the border); run every window. ``predict`` returns them as one
:class:`~oodseg.outputs.MaskOutputs` row per window: ``class_logits [N,Q,C+1]`` (last = no-object),
``mask_logits [N,Q,S,S]``, ``crops [N,5]`` = ``(image_index, top, left, S, S)`` in the resized frame (CPU int64,
ordered by image then window), ``frame_size`` = resized size, ``size`` = input ``(H, W)``, ``n_images`` = B.
The reference upsamples each window's mask *logits* to ``S × S`` (bilinear) before the sigmoid, forms
``Σ_q softmax(class)[c] · sigmoid(mask)``, averages the windows over their overlaps and bilinearly resizes to the
image size. ``predict`` returns mask logits at their native resolution (4 × the patch grid, ``S/4`` for patch 16;
``upsample_masks=False``, the default): the scoring layer upsamples each crop's mask logits to its box before the
sigmoid (``oodseg.scoring.scorers._stitch_crops``), which matches the reference exactly while moving 16× less data
(26 MB instead of 420 MB per 1024² window with 100 queries in fp32) through the object store and the output cache.
``upsample_masks=True`` hands over window-size logits instead (same scores, more memory).

Features (``predict(images, features=True)``): the per-pixel mask embeddings of the last layer, i.e. the output of
``upscale_block`` that the final ``mask_logits = einsum(mask_head(queries), embeddings)`` reads, ``[N, hidden, h, w]``
per window at the mask logits' resolution (4 × the patch grid: S/4 for patch 16) (captured by a forward hook during the same pass; the query features are not exposed). EoMT has no
per-pixel classifier, so ``react`` (and ``odin``) do not apply to it; ``mahalanobis`` / ``knn`` score these embeddings.

``param_groups()``: ``backbone`` = patch/position embeddings, cls/register tokens, all ViT ``layers`` and the final
``layernorm``; ``queries`` = the learned query embeddings; ``head`` = ``class_predictor`` + ``mask_head`` +
``upscale_block``; ``blocks.<i>`` = ViT layer ``i`` (subsets of ``backbone``). Masked-attention annealing during
training is driven by the wrapped model's ``attn_mask_probs`` buffer (``model.hf.attn_mask_probs``).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oodseg.models.base import MeanStdInput, SegModel, to_nchw_uint8
from oodseg.models.factory import register_model
from oodseg.outputs import MaskOutputs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def window_starts(length: int, size: int) -> list[int]:
    """Start offsets of the reference's overlapping windows of ``size`` covering ``length``."""
    if length < size:
        raise ValueError(f"cannot tile length {length} with windows of {size}")
    n = math.ceil(length / size)
    overlap = (n * size - length) / (n - 1) if n > 1 else 0.0
    return [int(i * (size - overlap)) for i in range(n)]


def resized_frame(height: int, width: int, short: int) -> tuple[int, int]:
    """Short side → ``short``, long side ``int(short · long / short_orig)`` (transformers' aspect-preserving resize)."""
    if min(height, width) == short:
        return height, width
    if width < height:
        return int(short * height / width), short
    return short, int(short * width / height)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in {"1", "ON", "YES", "TRUE"}


def semantic_to_mask_labels(
    target: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Semantic targets ``[N, H, W]`` → per image one binary mask per class present (``mask_labels[i]``
    ``[n_i, H, W]``) and its class id (``class_labels[i]`` ``[n_i]``), the form transformers' mask-classification
    loss takes. Ids outside ``0..num_classes-1`` (255 void, 254 pasted outlier) belong to no mask, so every query is
    pushed towards "no mask" there."""
    masks, classes = [], []
    for t in target:
        ids = torch.unique(t)
        ids = ids[(ids >= 0) & (ids < num_classes)]
        classes.append(ids.long())
        masks.append((t[None] == ids[:, None, None]).to(dtype))
    return masks, classes


def mask_classification_forward(
    hf: nn.Module, x: torch.Tensor, target: torch.Tensor | None, num_classes: int
) -> MaskOutputs | tuple[MaskOutputs, torch.Tensor]:
    """A transformers universal-segmentation model (EoMT, Mask2Former) on ``x`` → :class:`MaskOutputs`; with a
    semantic ``target``, also the loss transformers computes from :func:`semantic_to_mask_labels`."""
    if target is None:
        out = hf(pixel_values=x)
        return MaskOutputs(class_logits=out.class_queries_logits, mask_logits=out.masks_queries_logits)
    masks, classes = semantic_to_mask_labels(target, num_classes, dtype=x.dtype)
    out = hf(pixel_values=x, mask_labels=masks, class_labels=classes)
    return MaskOutputs(class_logits=out.class_queries_logits, mask_logits=out.masks_queries_logits), out.loss


@register_model("eomt")
class EoMT(MeanStdInput, SegModel):
    """EoMT (transformers) as a mask-classification :class:`SegModel`: a plain ViT whose queries give per-query
    class and mask logits over overlapping ``S × S`` windows, with its own mask-classification loss in training.
    Windowing and weights: module docstring."""

    output_kind = "mask"
    own_loss = True
    has_features = True

    def __init__(
        self,
        pretrained: str | None = None,
        config: Any = None,
        image_mean: tuple[float, float, float] | list[float] | None = None,
        image_std: tuple[float, float, float] | list[float] | None = None,
        window_batch: int = 8,
        upsample_masks: bool = False,
    ) -> None:
        from transformers import EomtConfig, EomtForUniversalSegmentation

        if pretrained:
            hf = EomtForUniversalSegmentation.from_pretrained(pretrained, local_files_only=_offline())
            if image_mean is None or image_std is None:
                mean, std = self._processor_stats(pretrained)
                image_mean = image_mean if image_mean is not None else mean
                image_std = image_std if image_std is not None else std
        elif config is not None:
            cfg = config if isinstance(config, EomtConfig) else EomtConfig.from_dict(dict(config))
            hf = EomtForUniversalSegmentation(cfg)
        else:
            raise ValueError("eomt needs pretrained=<hub id or local dir> or config=<EomtConfig dict>")
        super().__init__(hf.config.num_labels)
        size = hf.config.image_size
        if not isinstance(size, int):
            if len(size) != 2 or size[0] != size[1]:
                raise ValueError(f"EoMT needs a square image_size, got {size}")
            size = int(size[0])
        self.image_size = int(size)
        self.window_batch = int(window_batch)
        self.upsample_masks = bool(upsample_masks)
        self.hf = hf
        mean = [float(v) for v in (image_mean if image_mean is not None else IMAGENET_MEAN)]
        std = [float(v) for v in (image_std if image_std is not None else IMAGENET_STD)]
        self._set_mean_std(mean, std)
        self._mean, self._std = mean, std

    @staticmethod
    def _processor_stats(source: str) -> tuple[list[float], list[float]]:
        """``image_mean`` / ``image_std`` of the checkpoint's image processor (EomtImageProcessor defaults if none)."""
        from transformers import AutoImageProcessor

        try:
            proc = AutoImageProcessor.from_pretrained(source, local_files_only=_offline())
        except (OSError, ValueError):
            return list(IMAGENET_MEAN), list(IMAGENET_STD)
        return list(proc.image_mean), list(proc.image_std)

    def export_cfg(self) -> dict[str, Any]:
        return dict(
            config=self.hf.config.to_dict(),
            image_mean=self._mean,
            image_std=self._std,
            window_batch=self.window_batch,
            upsample_masks=self.upsample_masks,
        )

    def forward(
        self, x: torch.Tensor, target: torch.Tensor | None = None
    ) -> MaskOutputs | tuple[MaskOutputs, torch.Tensor]:
        """Training path on normalised ``[N, 3, S, S]`` windows → per-query class and mask logits.

        With ``target`` (semantic trainIds ``[N, S, S]``), also returns EoMT's own mask-classification loss, which
        transformers computes inside the forward pass (Hungarian matching, class CE + mask BCE + dice, auxiliary terms
        of the masked-attention layers; Kerssies et al., CVPR 2025, following Mask2Former) from one binary mask per
        class present (:func:`semantic_to_mask_labels`)."""
        s = self.image_size
        if x.ndim != 4 or tuple(x.shape[-2:]) != (s, s):
            raise ValueError(f"EoMT takes [N, 3, {s}, {s}] inputs (config.image_size), got {tuple(x.shape)}")
        return mask_classification_forward(self.hf, x, target, self.num_classes)

    @torch.no_grad()
    def predict(self, images_uint8: torch.Tensor, features: bool = False) -> MaskOutputs:
        """Resize (short side → S), overlapping S×S windows along the long side, one output row per window;
        ``features=True``: also the last layer's per-pixel mask embeddings.

        Returns:
            :class:`MaskOutputs` with ``N`` = all windows: ``class_logits [N,Q,C+1]`` (last = no-object),
            raw ``mask_logits`` at 4× the patch grid (``[N,Q,S/4,S/4]`` for patch 16; ``[N,Q,S,S]`` with
            ``upsample_masks``), ``crops [N,5]`` =
            ``(image, top, left, S, S)`` in the resized ``frame_size``, ``size`` = input ``(H, W)``.
        """
        x8 = to_nchw_uint8(images_uint8).to(self.device, non_blocking=True)
        b, _, h, w = x8.shape
        s = self.image_size
        fh, fw = resized_frame(h, w, s)
        if (fh, fw) != (h, w):
            from torchvision.transforms.v2 import functional as tvF

            x8 = tvF.resize(x8, [fh, fw], interpolation=tvF.InterpolationMode.BILINEAR, antialias=True)
        x = self._normalise(x8)
        tiles, crops = [], []
        along_height = fh > fw  # the reference splits along height only for portrait frames
        for i in range(b):
            for start in window_starts(fh if along_height else fw, s):
                top, left = (start, 0) if along_height else (0, start)
                tiles.append(x[i, :, top : top + s, left : left + s])
                crops.append((i, top, left, s, s))
        windows = torch.stack(tiles)
        cls, masks, kept, seen = [], [], [], []
        hook = self.hf.upscale_block.register_forward_hook(lambda m, i, o: seen.append(o)) if features else None
        try:
            for chunk in windows.split(self.window_batch):
                seen.clear()
                out = self(chunk)
                cls.append(out.class_logits)
                m = out.mask_logits
                if self.upsample_masks:
                    m = F.interpolate(m, size=(s, s), mode="bilinear", align_corners=False)
                masks.append(m)
                if features:  # the last call is the final layer's (earlier ones: masked-attention layers)
                    kept.append(seen[-1])
        finally:
            if hook is not None:
                hook.remove()
        return MaskOutputs(
            class_logits=torch.cat(cls),
            mask_logits=torch.cat(masks),
            size=(int(h), int(w)),
            crops=torch.tensor(crops, dtype=torch.int64),
            frame_size=(int(fh), int(fw)),
            n_images=int(b),
            features=torch.cat(kept) if features else None,
        )

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        prefixes = {
            "backbone": ("embeddings.", "layers.", "layernorm."),
            "queries": ("query.",),
            "head": ("class_predictor.", "mask_head.", "upscale_block."),
        }
        groups: dict[str, list[nn.Parameter]] = {k: [] for k in prefixes}
        n_layers = len(self.hf.layers)
        blocks: dict[str, list[nn.Parameter]] = {f"blocks.{i}": [] for i in range(n_layers)}
        for name, p in self.hf.named_parameters():
            group = next((g for g, pre in prefixes.items() if name.startswith(pre)), None)
            if group is None:
                raise RuntimeError(f"EoMT parameter {name!r} fits no parameter group; update EoMT.param_groups")
            groups[group].append(p)
            if name.startswith("layers."):
                blocks[f"blocks.{name.split('.')[1]}"].append(p)
        return {**groups, **blocks}
