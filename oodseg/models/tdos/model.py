"""TDOS — "Leveraging Text-Driven Semantic Variation for Robust OOD Segmentation" (Song & Lee, IROS 2025) as a
:class:`~oodseg.models.base.SegModel` (``output_kind="mask"``), after ``song1248/TextDrivenOODSegmentation``.

Pipeline (ViT variant): frozen CLIP ViT → 4-level pyramid + dense CLIP embeddings (:mod:`.vision`); frozen CLIP text
tower with learned context and ``n_negative`` learned negative prompts → ``K = 20 + n_negative`` text embeddings
(:mod:`.text`); DenseCLIP context decoder refines them per image; pixel–text score map = cosine(dense, text);
Mask2Former-style head with text-initialised queries (:mod:`.decoder`); the ``ood`` query and the negative queries
merge into class 19 (:mod:`.merge`). Classes: the 19 Cityscapes classes + ``ood`` (``ood_channels = (19,)``).

* ``forward(x, target=None, outlier_mask=None)`` on normalised ``[N, 3, H, W]`` (``H, W`` multiples of the patch
  size): in training a :class:`TdosOutputs` (merged final prediction + per-layer merged predictions, merged pixel–text
  score map, refined text embeddings, frozen regulariser targets) for :class:`oodseg.losses.tdos.TdosLoss`; the
  semantic ``target`` (254 = pasted outlier) or ``outlier_mask`` (1 = outlier) drives the OOD semantic augmentation
  (:mod:`.augment`). In eval mode: plain merged :class:`~oodseg.outputs.MaskOutputs`.
* ``predict(images_uint8)``, ``protocol="windows"`` (default): resize so the short side is ``frame_short`` (default
  ``window``; transformers' aspect-preserving resize), tile the frame with square ``window`` crops
  (``oodseg.models.eomt.window_starts`` along each side: evenly spread overlap), one :class:`MaskOutputs` row per
  crop with ``class_logits [N, 20, 21]`` and mask logits at stride ``p/4``. ``protocol="release"``: the release's
  test protocol (:mod:`.release`): keep-ratio resize into ``test_scale`` (``[long, short]`` or a benchmark name,
  e.g. ``"road_anomaly"`` → 512×512), ``window`` crops with ``stride`` (default ``2·window/3``: 512 / 341), mask
  probabilities upsampled to each window before the per-query sum. The anomaly read-out of the release is p(``ood``)
  after a softmax over the 20 per-pixel class scores (the ``p_ood`` scorer).
* ``clip``: ``"tiny"`` (random tiny CLIP and the ``tiny`` size preset), a hub id / local directory (``base``
  preset: the release's ViT-B/16 sizes), or a ``CLIPConfig`` dict (``export_cfg``). ``negatives``: a negatives file
  (:mod:`.negatives`) or its word groups; ``None`` restricts the textual regulariser to the 20 class prompts.
  ``export_cfg()`` stores the CLIP config, the tokenised class names and the word groups, so the model is rebuilt
  with no download or tokenizer; the frozen regulariser targets are a persistent buffer, restored from the checkpoint.

The ``base`` preset has the release's ViT-B/16 sizes (``configs/tdos/text_driven_ood_seg_vit-b_1e-5_20k-c2c-512.py``):
256-d decoders with 8 heads, 6 pixel-decoder layers with FFN 2048 (the config's layer-level
``feedforward_channels=2048`` overrides the 1024 of its ``ffn_cfgs``), 9 transformer-decoder layers with FFN 2048,
a 3-layer context decoder of width 256 with 4 heads and q/k/v projections without bias. The release's per-benchmark
OOD class weight is a loss option (:data:`oodseg.losses.tdos.RELEASE_OOD_WEIGHTS`). Remaining deviations, each
chosen on purpose:

* **CLS token added once**, as CLIP does (transformers' tower): the release's ``CLIPVisionTransformer.forward``
  prepends ``class_embedding`` and then adds ``pos[0] + class_embedding`` to it, i.e. the class embedding twice.
  We keep transformers' tower unchanged so hub CLIP weights load and behave as CLIP was trained (the doubled
  class embedding shifts the CLS token, and through attention every token, away from CLIP's own features).
* **Bicubic position-embedding resize** (transformers' ``interpolate_pos_encoding``) from CLIP's 14×14 grid; the
  release resizes it bilinearly (``F.interpolate(mode='bilinear')`` when loading, 14×14 → 32×32 for 512 inputs).
  Same reason: no fork of the tower for the interpolation mode of the position codes.
* **No extra pixel-decoder LayerNorm**: the release's pixel-decoder encoder is mmdet's ``DetrTransformerDecoder``
  with ``return_intermediate=True``, which passes the last layer's output through its ``post_norm`` LayerNorm;
  our post-norm layers already end in a LayerNorm (:mod:`.decoder`), so the second one would only re-normalise.
* **Global instead of deformable attention** in the pixel decoder (:mod:`.decoder`): multi-scale deformable
  attention is an mmcv CUDA op; standard attention needs no custom kernel, at O(T²) cost.
* **Text pooling** follows DenseCLIP / CoOp, not the release's shifted-EOT quirk (:mod:`.text`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from oodseg.labels import OUTLIER_ID
from oodseg.models.base import SegModel, to_nchw_uint8
from oodseg.models.eomt import resized_frame, window_starts
from oodseg.models.factory import register_model
from oodseg.models.tdos.augment import AugmentConfig, OutlierTokenAugment, token_mask
from oodseg.models.tdos.clip import CLIP_MEAN, CLIP_STD, load_clip, load_tokenizer, text_features
from oodseg.models.tdos.decoder import MaskDecoder, PixelDecoder
from oodseg.models.tdos.merge import merge_queries, merge_score_map
from oodseg.models.tdos.negatives import read_groups
from oodseg.models.tdos.release import (
    PROTOCOLS,
    keep_ratio_size,
    pad_to_multiple,
    resolve_test_scale,
    slide_windows,
    window_mask_logits,
)
from oodseg.models.tdos.text import (
    CITYSCAPES_OOD_CLASSES,
    OOD_INDEX,
    ContextDecoder,
    PromptTextEncoder,
    check_class_names,
)
from oodseg.models.tdos.vision import VisionFeatures, scaled_blocks
from oodseg.outputs import MaskOutputs

NUM_CLASSES = 20
REG_TEMPLATE = "a clean origami of a {}"


@dataclass(frozen=True)
class TdosConfig:
    """Sizes and options (``None`` block lists: scaled from the release's ViT-B/16 choice)."""

    n_ctx: int = 20
    name_len: int = 20
    neg_len: int = 18
    n_negative: int = 50
    feature_blocks: tuple[int, ...] | None = None
    dim: int = 256
    heads: int = 8
    decoder_layers: int = 9
    decoder_ffn: int = 2048
    pixel_layers: int = 6
    pixel_ffn: int = 2048
    pixel_attn: str = "global"
    context_width: int = 256
    context_heads: int = 4
    context_layers: int = 3
    context_dropout: float = 0.1
    window: int = 512
    frame_short: int | None = None
    window_batch: int = 8
    protocol: str = "windows"
    test_scale: tuple[int, int] | None = None
    stride: int | None = None
    augment: str = "adain"
    augment_blocks: tuple[int, ...] | None = None
    augment_prob: float = 0.5
    augment_alpha: float = 0.2
    augment_noise: float = 0.1


PRESETS = {
    "base": TdosConfig(),
    "tiny": TdosConfig(n_ctx=4, name_len=8, neg_len=4, dim=32, heads=2, decoder_layers=3, decoder_ffn=64,
                       pixel_layers=1, pixel_ffn=64, pixel_attn="none", context_width=32, context_heads=2,
                       context_layers=1, context_dropout=0.0, window=256),
}


@dataclass(frozen=True)
class TdosOutputs(MaskOutputs):
    """Training outputs: the merged final prediction (``MaskOutputs`` fields) plus what :class:`TdosLoss` needs.

    ``aux_*``: merged predictions of the initial queries and every decoder layer but the last (deep supervision);
    ``score_map`` ``[N, 20, h, w]``: pixel–text cosine(dense, text) at the patch grid, ``ood`` + negative channels
    merged by max (release: ``score_map_method='max'``); ``text_embeddings`` ``[N, K, D]``: text after the context
    decoder; ``reg_targets`` ``[R, D]``: frozen regulariser targets (R = 20, or K with negatives).
    """

    aux_class_logits: tuple[torch.Tensor, ...] = ()
    aux_mask_logits: tuple[torch.Tensor, ...] = ()
    score_map: torch.Tensor | None = None
    text_embeddings: torch.Tensor | None = None
    reg_targets: torch.Tensor | None = field(default=None, repr=False)


def _resolve(clip: Any, options: dict[str, Any]) -> TdosConfig:
    preset = PRESETS["tiny" if clip == "tiny" else "base"]
    opts = {k: tuple(int(b) for b in v) if k in ("feature_blocks", "augment_blocks") and v is not None else v
            for k, v in options.items()}
    if "test_scale" in opts:
        opts["test_scale"] = resolve_test_scale(opts["test_scale"])
    try:
        cfg = replace(preset, **opts)
    except TypeError as e:
        raise TypeError(f"tdos: unknown option ({e}); options are {sorted(asdict(preset))}") from None
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"tdos: protocol must be one of {PROTOCOLS}, got {cfg.protocol!r}")
    if cfg.stride is not None and not 0 < cfg.stride <= cfg.window:
        raise ValueError(f"tdos: stride must be in 1..window={cfg.window}, got {cfg.stride}")
    return cfg


def _groups(negatives: Any, n_negative: int) -> list[list[str]] | None:
    if negatives is None:
        return None
    if isinstance(negatives, (str, Path)):
        return read_groups(negatives, n_negative)
    groups = [[str(w) for w in g] for g in negatives]
    if len(groups) != n_negative or not all(groups):
        raise ValueError(f"negatives: {len(groups)} word groups given for n_negative={n_negative} (all non-empty)")
    return groups


@register_model("tdos")
class TDOS(SegModel):
    """TDOS as a mask-classification :class:`SegModel`: frozen CLIP towers, learned class / negative prompts and a
    Mask2Former-style head; 19 Cityscapes classes + ``ood`` (channel 19), negative queries merged into ``ood``.
    Trained with :class:`~oodseg.losses.tdos.TdosLoss` (its outputs in training: :class:`TdosOutputs`)."""

    output_kind = "mask"
    own_loss = False
    wants_targets = True
    ood_channels = (OOD_INDEX,)

    def __init__(self, clip: str | dict[str, Any] = "tiny", class_names: Any = CITYSCAPES_OOD_CLASSES,
                 negatives: str | Path | list[list[str]] | None = None, class_token_ids: list[list[int]] | None = None,
                 sot_id: int | None = None, eot_id: int | None = None, freeze_towers: bool = True,
                 image_mean: Any = CLIP_MEAN, image_std: Any = CLIP_STD, **options: Any) -> None:
        super().__init__(NUM_CLASSES)
        cfg = _resolve(clip, options)
        self.class_names = check_class_names(class_names)
        self.groups = _groups(negatives, cfg.n_negative)
        self.clip, pretrained = load_clip(clip)
        # CLIP's contrastive logit scale is unused (TDOS's alignment has its own τ); as a 0-dim parameter it would
        # also break DeepSpeed's initial parameter broadcast (which views every parameter as bytes)
        del self.clip.logit_scale
        tok = load_tokenizer(clip, self.clip)
        ids, self.sot_id, self.eot_id = self._class_ids(tok, class_token_ids, sot_id, eot_id, cfg.name_len)
        self.freeze_towers = bool(freeze_towers)
        for name, p in self.clip.named_parameters():
            p.requires_grad_(not self.freeze_towers)
        n_layers = self.clip.vision_model.config.num_hidden_layers
        blocks = cfg.feature_blocks if cfg.feature_blocks is not None else scaled_blocks(n_layers)
        aug_blocks = cfg.augment_blocks if cfg.augment_blocks is not None else (n_layers - 1,)
        self.cfg = replace(cfg, feature_blocks=tuple(blocks), augment_blocks=tuple(aug_blocks))
        self.augment = AugmentConfig(cfg.augment, tuple(aug_blocks), cfg.augment_prob, cfg.augment_alpha,
                                     cfg.augment_noise)
        self.text = PromptTextEncoder(self.clip, ids, self.sot_id, self.eot_id, cfg.n_ctx, cfg.n_negative, cfg.neg_len)
        self.vision = VisionFeatures(self.clip, blocks)
        d, k = int(self.clip.config.projection_dim), NUM_CLASSES + cfg.n_negative
        width = int(self.clip.vision_model.config.hidden_size)
        self.context_decoder = ContextDecoder(d, cfg.context_width, cfg.context_heads, cfg.context_layers,
                                              cfg.context_dropout)
        self.pixel_decoder = PixelDecoder(width, cfg.dim, cfg.heads, cfg.pixel_layers, cfg.pixel_ffn, d, k,
                                          cfg.pixel_attn)
        self.mask_decoder = MaskDecoder(cfg.dim, cfg.heads, cfg.decoder_layers, cfg.decoder_ffn, d, k, NUM_CLASSES)
        rows = NUM_CLASSES + (cfg.n_negative if self.groups else 0)
        reg = self._reg_targets(tok) if pretrained and tok is not None else torch.zeros(rows, d)
        self.register_buffer("reg_targets", reg)
        if cfg.window % self.vision.patch or (cfg.frame_short is not None and cfg.frame_short < cfg.window):
            raise ValueError(f"window {cfg.window} must be a multiple of the patch size {self.vision.patch} and "
                             f"frame_short {cfg.frame_short} at least the window")
        self._mean, self._std = [float(v) for v in image_mean], [float(v) for v in image_std]
        self.register_buffer("pixel_mean", torch.tensor(self._mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self._std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def _class_ids(self, tok: Any, given: Any, sot: int | None, eot: int | None,
                   name_len: int) -> tuple[torch.Tensor, int, int]:
        if given is None:
            if tok is None:
                raise ValueError("tdos: clip given as a config dict needs class_token_ids, sot_id and eot_id "
                                 "(export_cfg stores them)")
            return tok(list(self.class_names), name_len), int(tok.sot_id), int(tok.eot_id)
        ids = torch.as_tensor(given, dtype=torch.long)
        if ids.shape != (NUM_CLASSES, name_len) or sot is None or eot is None:
            raise ValueError(f"class_token_ids: expected [{NUM_CLASSES}, name_len={name_len}] ids plus sot_id and "
                             f"eot_id, got shape {tuple(ids.shape)}")
        return ids, int(sot), int(eot)

    @torch.no_grad()
    def _reg_targets(self, tok: Any) -> torch.Tensor:
        """Frozen CLIP embeddings of ``"a clean origami of a {c}"`` (20 classes) and, per negative group, the mean
        of its words' normalised embeddings (release: ``TextDrivenOODSeg.__init__``)."""
        rows = [text_features(self.clip, tok, [REG_TEMPLATE.format(c) for c in self.class_names])]
        if self.groups:
            words = [w for g in self.groups for w in g]
            emb = text_features(self.clip, tok, [REG_TEMPLATE.format(w) for w in words])
            rows.append(torch.stack([e.mean(0) for e in emb.split([len(g) for g in self.groups])]))
        return torch.cat(rows).float()

    def export_cfg(self) -> dict[str, Any]:
        cfg = asdict(self.cfg)
        cfg.update(feature_blocks=list(self.cfg.feature_blocks), augment_blocks=list(self.cfg.augment_blocks))
        return dict(clip=self.clip.config.to_dict(), class_names=list(self.class_names), negatives=self.groups,
                    class_token_ids=self.text.ids[:NUM_CLASSES].tolist(), sot_id=self.sot_id, eot_id=self.eot_id,
                    freeze_towers=self.freeze_towers, image_mean=self._mean, image_std=self._std, **cfg)

    def preprocess(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 RGB → ``(x − 255·mean) / (255·std)`` (CLIP statistics) float ``[B,3,H,W]`` on the model's device."""
        return self._normalise(to_nchw_uint8(images_uint8).to(self.device, non_blocking=True))

    def _normalise(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return (x_uint8.float() - self.pixel_mean) / self.pixel_std

    def _outlier_tokens(self, x: torch.Tensor, target: torch.Tensor | None,
                        outlier_mask: torch.Tensor | None) -> torch.Tensor | None:
        src = outlier_mask == 1 if outlier_mask is not None else (target == OUTLIER_ID if target is not None else None)
        if src is None:
            return None
        if tuple(src.shape[-2:]) != tuple(x.shape[-2:]):
            src = F.interpolate(src[:, None].float(), size=tuple(x.shape[-2:]), mode="nearest")[:, 0] > 0.5
        return token_mask(src.to(x.device), self.vision.patch)

    def _run(self, x: torch.Tensor, perturb: Any = None) -> tuple[list, list, torch.Tensor, torch.Tensor]:
        """(per-prediction class logits, mask logits (all K queries), dense embeddings, refined text)."""
        p = self.vision.patch
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2] % p or x.shape[-1] % p or min(x.shape[-2:]) < 2 * p:
            raise ValueError(f"TDOS takes [N, 3, H, W] inputs with H, W multiples of the patch size {p} "
                             f"(at least {2 * p}), got {tuple(x.shape)}")
        feats, glob, dense = self.vision(x, perturb)
        visual = torch.cat([glob[:, None], dense.flatten(2).transpose(1, 2)], dim=1)
        text = self.context_decoder(self.text(), visual)
        mask_features, levels = self.pixel_decoder(feats, text)
        all_cls, all_masks = self.mask_decoder(text, mask_features, levels)
        return all_cls, all_masks, dense, text

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None,
                outlier_mask: torch.Tensor | None = None) -> TdosOutputs | MaskOutputs:
        perturb = None
        if self.training and self.augment.mode != "off":
            tokens = self._outlier_tokens(x, target, outlier_mask)
            perturb = OutlierTokenAugment(self.augment, tokens) if tokens is not None else None
        all_cls, all_masks, dense, text = self._run(x, perturb)
        merged = [merge_queries(c, m, NUM_CLASSES) for c, m in zip(all_cls, all_masks, strict=True)]
        cls, masks = merged[-1]
        if not self.training:
            return MaskOutputs(class_logits=cls, mask_logits=masks, ood_channels=self.ood_channels)
        score = torch.einsum("bdhw,bkd->bkhw", F.normalize(dense, dim=1), F.normalize(text, dim=-1))
        score = merge_score_map(score, NUM_CLASSES)
        return TdosOutputs(class_logits=cls, mask_logits=masks, ood_channels=self.ood_channels,
                           aux_class_logits=tuple(c for c, _ in merged[:-1]),
                           aux_mask_logits=tuple(m for _, m in merged[:-1]), score_map=score, text_embeddings=text,
                           reg_targets=self.reg_targets)

    def frame_and_windows(self, h: int, w: int) -> tuple[tuple[int, int], list[tuple[int, int, int, int]]]:
        """The resized frame ``(H', W')`` of an ``H × W`` image and its windows ``(top, left, height, width)`` under
        ``protocol``: ``"windows"`` (short side → ``frame_short``, square windows with evenly spread overlap) or
        ``"release"`` (keep-ratio resize into ``test_scale``, mmseg's ``window`` / ``stride`` grid; :mod:`.release`)."""
        s = self.cfg.window
        if self.cfg.protocol == "release":
            fh, fw = keep_ratio_size(h, w, self.cfg.test_scale) if self.cfg.test_scale else (h, w)
            return (fh, fw), slide_windows(fh, fw, s, self.cfg.stride or 2 * s // 3)
        fh, fw = resized_frame(h, w, self.cfg.frame_short or s)
        return (fh, fw), [(top, left, s, s) for top in window_starts(fh, s) for left in window_starts(fw, s)]

    @torch.no_grad()
    def predict(self, images_uint8: torch.Tensor) -> MaskOutputs:
        """Sliding windows over the resized frame, one merged output row per window.

        Returns:
            :class:`MaskOutputs` with ``N`` = all windows: ``class_logits [N,20,21]`` (19 classes, ``ood``,
            no-object), raw ``mask_logits`` at stride ``patch/4`` (``release`` protocol: at the window size, as the
            release upsamples them), ``crops [N,5]`` in the resized ``frame_size``, ``size`` = input ``(H, W)``,
            ``ood_channels=(19,)``.
        """
        from torchvision.transforms.v2 import functional as tvF

        x8 = to_nchw_uint8(images_uint8).to(self.device, non_blocking=True)
        b, _, h, w = x8.shape
        (fh, fw), boxes = self.frame_and_windows(h, w)
        release = self.cfg.protocol == "release"
        if (fh, fw) != (h, w):
            x8 = tvF.resize(x8, [fh, fw], interpolation=tvF.InterpolationMode.BILINEAR, antialias=not release)
        x = self._normalise(x8)
        crops = [(i, top, left, wh, ww) for i in range(b) for top, left, wh, ww in boxes]
        windows = torch.stack([x[i, :, t : t + wh, lf : lf + ww] for i, t, lf, wh, ww in crops])
        windows = pad_to_multiple(windows, self.vision.patch)
        cls, masks = [], []
        for chunk in windows.split(self.cfg.window_batch):
            c, m, _, _ = self._run(chunk)
            c, m = merge_queries(c[-1], m[-1], NUM_CLASSES)
            cls.append(c)
            masks.append(window_mask_logits(m, tuple(chunk.shape[-2:]), boxes[0][2:]) if release else m)
        return MaskOutputs(class_logits=torch.cat(cls), mask_logits=torch.cat(masks), size=(int(h), int(w)),
                           crops=torch.tensor(crops, dtype=torch.int64), frame_size=(int(fh), int(fw)),
                           n_images=int(b), ood_channels=self.ood_channels)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """``backbone`` / ``text``: the CLIP towers' *trainable* parameters (empty when frozen); ``context``: learned
        context + negative prompts; ``decoder``: adapters, context/pixel/transformer decoders; ``head``: class and
        mask heads; ``blocks.<i>``: CLIP ViT layer ``i`` (frozen or not)."""
        def trainable(*mods: nn.Module) -> list[nn.Parameter]:
            return [p for m in mods for p in m.parameters() if p.requires_grad]

        c, md = self.clip, self.mask_decoder
        head = [*md.cls_embed.parameters(), *md.mask_embed.parameters()]
        head_ids = {id(p) for p in head}
        decoder = [p for m in (self.vision.adapters, self.context_decoder, self.pixel_decoder, md)
                   for p in m.parameters() if id(p) not in head_ids]
        groups = {"backbone": trainable(c.vision_model, c.visual_projection),
                  "text": trainable(c.text_model, c.text_projection),
                  "context": [self.text.ctx, self.text.neg], "decoder": decoder, "head": head}
        for i, layer in enumerate(c.vision_model.encoder.layers):
            groups[f"blocks.{i}"] = list(layer.parameters())
        return groups
