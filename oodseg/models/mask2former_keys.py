"""detectron2 Mask2Former config → ``Mask2FormerConfig``, and the detectron2 → transformers key table (conventions in
:mod:`oodseg.models.mask2former_convert`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from oodseg.models.detectron2_config import D2Config
from oodseg.models.mask2former_arch import STAGES

LEVELS = ["res2", "res3", "res4", "res5"]
RESNET_DEPTHS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
BN_KINDS = ("BN", "SyncBN", "nnSyncBN", "naiveSyncBN", "FrozenBN")
E, PD, TM = "model.pixel_level_module.encoder.", "model.pixel_level_module.decoder.", "model.transformer_module."
WB = ("weight", "bias")
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class Converted:
    """What a detectron2 config says beyond the architecture: input channel order, normalisation, test size."""

    config: Any  # Mask2FormerConfig
    backbone: str  # "swin" | "resnet"
    bgr: bool
    mean: list[float]  # 0..255, in the model's input order (RGB after conversion)
    std: list[float]
    test_size: tuple[int, int] | None
    size_divisibility: int
    frozen_bn: bool


def _expect(cfg: D2Config, key: str, allowed: Any, why: str) -> None:
    if cfg[key] not in (allowed if isinstance(allowed, tuple) else (allowed,)):
        raise cfg.unsupported(key, why)


def _swin_config(cfg: D2Config) -> Any:
    from transformers import SwinConfig

    _expect(cfg, "MODEL.SWIN.APE", False, "absolute position embeddings are not in transformers' Swin backbone")
    _expect(cfg, "MODEL.SWIN.PATCH_NORM", True, "transformers' Swin always normalises the patch embedding")
    _expect(cfg, "MODEL.SWIN.QK_SCALE", None, "transformers' Swin scales by head_dim ** -0.5")
    if list(cfg["MODEL.SWIN.OUT_FEATURES"]) != LEVELS:
        raise cfg.unsupported("MODEL.SWIN.OUT_FEATURES", f"Mask2Former uses {LEVELS}")
    depths, heads = list(cfg["MODEL.SWIN.DEPTHS"]), list(cfg["MODEL.SWIN.NUM_HEADS"])
    if len(depths) != 4 or len(heads) != 4:
        raise cfg.unsupported("MODEL.SWIN.DEPTHS", "four stages needed")
    return SwinConfig(
        embed_dim=int(cfg["MODEL.SWIN.EMBED_DIM"]), depths=depths, num_heads=heads,
        window_size=int(cfg["MODEL.SWIN.WINDOW_SIZE"]), patch_size=int(cfg["MODEL.SWIN.PATCH_SIZE"]),
        mlp_ratio=float(cfg["MODEL.SWIN.MLP_RATIO"]), qkv_bias=bool(cfg["MODEL.SWIN.QKV_BIAS"]),
        image_size=int(cfg["MODEL.SWIN.PRETRAIN_IMG_SIZE"]), drop_path_rate=float(cfg["MODEL.SWIN.DROP_PATH_RATE"]),
        layer_norm_eps=1e-5, out_features=STAGES,
    )


def _resnet_config(cfg: D2Config) -> Any:
    from transformers import ResNetConfig

    r = "MODEL.RESNETS."
    _expect(cfg, r + "DEPTH", tuple(RESNET_DEPTHS), "bottleneck ResNet-50/101 only")
    _expect(cfg, r + "NORM", BN_KINDS, "BatchNorm variants only")
    _expect(cfg, r + "NUM_GROUPS", 1, "no ResNeXt groups in transformers' ResNet")
    _expect(cfg, r + "WIDTH_PER_GROUP", 64, "bottleneck width = out / 4")
    _expect(cfg, r + "RES5_DILATION", 1, "no dilation in transformers' ResNet")
    _expect(cfg, r + "STEM_OUT_CHANNELS", 64, "transformers' ResNet stem")
    _expect(cfg, r + "RES2_OUT_CHANNELS", 256, "transformers' bottleneck widths")
    if any(cfg[r + "DEFORM_ON_PER_STAGE"]):
        raise cfg.unsupported(r + "DEFORM_ON_PER_STAGE", "no deformable convolutions in transformers' ResNet")
    if list(cfg[r + "OUT_FEATURES"]) != LEVELS:
        raise cfg.unsupported(r + "OUT_FEATURES", f"Mask2Former uses {LEVELS}")
    return ResNetConfig(depths=RESNET_DEPTHS[int(cfg[r + "DEPTH"])], layer_type="bottleneck",
                        downsample_in_bottleneck=bool(cfg[r + "STRIDE_IN_1X1"]), out_features=STAGES)


def _check_heads(cfg: D2Config) -> int:
    """Feature-level count from ``DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES`` (must be the coarsest levels)."""
    h, m = "MODEL.SEM_SEG_HEAD.", "MODEL.MASK_FORMER."
    _expect(cfg, "MODEL.META_ARCHITECTURE", "MaskFormer", "a Mask2Former checkpoint has META_ARCHITECTURE MaskFormer")
    _expect(cfg, h + "NAME", "MaskFormerHead", "Mask2Former's head")
    _expect(cfg, h + "PIXEL_DECODER_NAME", "MSDeformAttnPixelDecoder", "transformers' pixel decoder")
    _expect(cfg, m + "TRANSFORMER_DECODER_NAME", "MultiScaleMaskedTransformerDecoder", "masked-attention decoder")
    _expect(cfg, m + "TRANSFORMER_IN_FEATURE", "multi_scale_pixel_decoder", "Mask2Former's decoder input")
    _expect(cfg, h + "NORM", "GN", "transformers' pixel decoder uses GroupNorm(32)")
    _expect(cfg, h + "DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS", 4, "transformers samples 4 points")
    _expect(cfg, h + "DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS", cfg[m + "NHEADS"],
            "transformers shares MASK_FORMER.NHEADS between encoder and decoder")
    _expect(cfg, m + "TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE", False,
            "resizing masks before the class combination is another inference order")
    if list(cfg[h + "IN_FEATURES"]) != LEVELS:
        raise cfg.unsupported(h + "IN_FEATURES", f"Mask2Former uses {LEVELS}")
    levels = list(cfg[h + "DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES"])
    if not 1 <= len(levels) <= 3 or levels != LEVELS[-len(levels):]:
        raise cfg.unsupported(h + "DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES", "1-3 of the coarsest levels, in order")
    if int(cfg[m + "DEC_LAYERS"]) < 1:
        raise cfg.unsupported(m + "DEC_LAYERS", "at least 1")
    return len(levels)


def hf_config_from_d2(cfg: D2Config) -> Converted:
    """Translate (and check) the architecture of a detectron2 Mask2Former config."""
    from transformers import Mask2FormerConfig

    levels = _check_heads(cfg)
    name = cfg["MODEL.BACKBONE.NAME"]
    if name == "D2SwinTransformer":
        backbone, kind = _swin_config(cfg), "swin"
    elif name == "build_resnet_backbone":
        backbone, kind = _resnet_config(cfg), "resnet"
    else:
        raise cfg.unsupported("MODEL.BACKBONE.NAME", "D2SwinTransformer or build_resnet_backbone")
    h, m = "MODEL.SEM_SEG_HEAD.", "MODEL.MASK_FORMER."
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=int(cfg[h + "CONVS_DIM"]), mask_feature_size=int(cfg[h + "MASK_DIM"]),
        hidden_dim=int(cfg[m + "HIDDEN_DIM"]), encoder_feedforward_dim=1024,  # fixed in MSDeformAttnPixelDecoder
        encoder_layers=int(cfg[h + "TRANSFORMER_ENC_LAYERS"]), decoder_layers=int(cfg[m + "DEC_LAYERS"]),
        num_attention_heads=int(cfg[m + "NHEADS"]), dropout=float(cfg[m + "DROPOUT"]),
        dim_feedforward=int(cfg[m + "DIM_FEEDFORWARD"]), pre_norm=bool(cfg[m + "PRE_NORM"]),
        enforce_input_projection=bool(cfg[m + "ENFORCE_INPUT_PROJ"]), common_stride=int(cfg[h + "COMMON_STRIDE"]),
        ignore_value=int(cfg[h + "IGNORE_VALUE"]), num_queries=int(cfg[m + "NUM_OBJECT_QUERIES"]),
        no_object_weight=float(cfg[m + "NO_OBJECT_WEIGHT"]), class_weight=float(cfg[m + "CLASS_WEIGHT"]),
        mask_weight=float(cfg[m + "MASK_WEIGHT"]), dice_weight=float(cfg[m + "DICE_WEIGHT"]),
        train_num_points=int(cfg[m + "TRAIN_NUM_POINTS"]), oversample_ratio=float(cfg[m + "OVERSAMPLE_RATIO"]),
        importance_sample_ratio=float(cfg[m + "IMPORTANCE_SAMPLE_RATIO"]), num_labels=int(cfg[h + "NUM_CLASSES"]),
        feature_strides=[4, 8, 16, 32],
    )
    config.num_feature_levels = levels
    return Converted(config, kind, *_input_convention(cfg), _divisibility(cfg, kind),
                     kind == "resnet" and cfg["MODEL.RESNETS.NORM"] == "FrozenBN")


def _input_convention(cfg: D2Config) -> tuple[bool, list[float], list[float], tuple[int, int] | None]:
    """``(bgr, mean, std, test_size)``; mean/std turned to RGB order for a BGR model."""
    fmt = cfg["INPUT.FORMAT"]
    if fmt not in ("RGB", "BGR"):
        raise cfg.unsupported("INPUT.FORMAT", "RGB or BGR")
    mean, std = [float(v) for v in cfg["MODEL.PIXEL_MEAN"]], [float(v) for v in cfg["MODEL.PIXEL_STD"]]
    if len(mean) != 3 or len(std) != 3:
        raise cfg.unsupported("MODEL.PIXEL_MEAN", "3 values each for PIXEL_MEAN and PIXEL_STD")
    bgr = fmt == "BGR"
    if bgr:
        mean, std = mean[::-1], std[::-1]
    short, long = int(cfg["INPUT.MIN_SIZE_TEST"]), int(cfg["INPUT.MAX_SIZE_TEST"])
    return bgr, mean, std, ((short, long) if short > 0 else None)


def _divisibility(cfg: D2Config, kind: str) -> int:
    """``MASK_FORMER.SIZE_DIVISIBILITY``; a negative value means the backbone's own (D2 Swin 32, ResNet 0)."""
    d = int(cfg["MODEL.MASK_FORMER.SIZE_DIVISIBILITY"])
    return d if d >= 0 else (32 if kind == "swin" else 0)


def _pairs(src: str, dst: str, leaves: tuple[str, ...] = WB) -> dict[str, tuple[str, ...]]:
    return {f"{src}.{leaf}": (f"{dst}.{leaf}",) for leaf in leaves}


def _conv_norm(src: str, dst: str, leaves: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """detectron2 ``Conv2d(norm=…)``: ``src.weight`` + ``src.norm.*`` → ``dst.0.weight`` + ``dst.1.*``."""
    return {f"{src}.weight": (f"{dst}.0.weight",), **_pairs(f"{src}.norm", f"{dst}.1", leaves)}


def _swin_keys(config: Any) -> dict[str, tuple[str, ...]]:
    bb, s = config.backbone_config, E + "swin."
    table = {**_pairs("backbone.patch_embed.proj", s + "embeddings.patch_embeddings.projection"),
             **_pairs("backbone.patch_embed.norm", s + "embeddings.norm")}
    for i, depth in enumerate(bb.depths):
        for j in range(depth):
            src, dst = f"backbone.layers.{i}.blocks.{j}", f"{s}encoder.layers.{i}.blocks.{j}"
            for leaf in WB:
                table[f"{src}.attn.qkv.{leaf}"] = tuple(f"{dst}.attention.{p}_proj.{leaf}" for p in "qkv")
            table[f"{src}.attn.relative_position_bias_table"] = (
                f"{dst}.attention.relative_position_bias.relative_position_bias_table",)
            table[f"{src}.attn.relative_position_index"] = ()  # checked, transformers computes it
            for a, b in (("norm1", "layernorm_before"), ("attn.proj", "attention.o_proj"),
                         ("norm2", "layernorm_after"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                table.update(_pairs(f"{src}.{a}", f"{dst}.{b}"))
        if i < len(bb.depths) - 1:
            src, dst = f"backbone.layers.{i}.downsample", f"{s}encoder.layers.{i}.downsample"
            table.update(_pairs(f"{src}.reduction", f"{dst}.reduction", ("weight",)))
            table.update(_pairs(f"{src}.norm", f"{dst}.norm"))
    for i in range(4):
        table.update(_pairs(f"backbone.norm{i}", f"{E}hidden_states_norms.stage{i + 1}"))
    return table


def _resnet_keys(config: Any, frozen: bool) -> dict[str, tuple[str, ...]]:
    bn = BN[:4] if frozen else BN
    table = {"backbone.stem.conv1.weight": (f"{E}embedder.embedder.convolution.weight",),
             **_pairs("backbone.stem.conv1.norm", f"{E}embedder.embedder.normalization", bn)}
    for s, depth in enumerate(config.backbone_config.depths):
        for b in range(depth):
            src, dst = f"backbone.res{s + 2}.{b}", f"{E}encoder.stages.{s}.layers.{b}"
            convs = [("shortcut", "shortcut")] if b == 0 else []
            for a, c in [*convs, *((f"conv{k + 1}", f"layer.{k}") for k in range(3))]:
                table[f"{src}.{a}.weight"] = (f"{dst}.{c}.convolution.weight",)
                table.update(_pairs(f"{src}.{a}.norm", f"{dst}.{c}.normalization", bn))
    return table


def _pixel_decoder_keys(config: Any, levels: int) -> dict[str, tuple[str, ...]]:
    p = "sem_seg_head.pixel_decoder."
    table = {f"{p}transformer.level_embed": (f"{PD}level_embed",),
             **_pairs(f"{p}mask_features", f"{PD}mask_projection")}
    for i in range(levels):
        table.update(_pairs(f"{p}input_proj.{i}.0", f"{PD}input_projections.{i}.0"))
        table.update(_pairs(f"{p}input_proj.{i}.1", f"{PD}input_projections.{i}.1"))
    for j in range(config.encoder_layers):
        src, dst = f"{p}transformer.encoder.layers.{j}", f"{PD}encoder.layers.{j}"
        for a, b in (("self_attn.sampling_offsets",) * 2, ("self_attn.attention_weights",) * 2,
                     ("self_attn.value_proj",) * 2, ("self_attn.output_proj",) * 2, ("norm1", "self_attn_layer_norm"),
                     ("linear1", "fc1"), ("linear2", "fc2"), ("norm2", "final_layer_norm")):
            table.update(_pairs(f"{src}.{a}", f"{dst}.{b}"))
    fpn = int(math.log2(config.feature_strides[-levels]) - math.log2(config.common_stride))
    for k in range(1, fpn + 1):
        table.update(_conv_norm(f"{p}adapter_{k}", f"{PD}adapter_{k}", WB))
        table.update(_conv_norm(f"{p}layer_{k}", f"{PD}layer_{k}", WB))
    return table


def _predictor_keys(config: Any, levels: int) -> dict[str, tuple[str, ...]]:
    q, dec = "sem_seg_head.predictor.", TM + "decoder."
    table = {f"{q}query_feat.weight": (f"{TM}queries_features.weight",),
             f"{q}query_embed.weight": (f"{TM}queries_embedder.weight",),
             f"{q}level_embed.weight": (f"{TM}level_embed.weight",),
             **_pairs(f"{q}decoder_norm", f"{dec}layernorm"), **_pairs(f"{q}class_embed", "class_predictor")}
    if config.feature_size != config.hidden_dim or config.enforce_input_projection:
        for i in range(levels):
            table.update(_pairs(f"{q}input_proj.{i}", f"{TM}input_projections.{i}"))
    for k in range(3):
        table.update(_pairs(f"{q}mask_embed.layers.{k}", f"{dec}mask_predictor.mask_embedder.{k}.0"))
    for i in range(config.decoder_layers - 1):
        dst = f"{dec}layers.{i}"
        sa, ca, ff = (f"{q}transformer_{n}_layers.{i}" for n in ("self_attention", "cross_attention", "ffn"))
        for leaf in WB:
            table[f"{sa}.self_attn.in_proj_{leaf}"] = tuple(f"{dst}.self_attn.{p}_proj.{leaf}" for p in "qkv")
            table[f"{ca}.multihead_attn.in_proj_{leaf}"] = (f"{dst}.cross_attn.in_proj_{leaf}",)
        for a, b in ((f"{sa}.self_attn.out_proj", "self_attn.out_proj"), (f"{sa}.norm", "self_attn_layer_norm"),
                     (f"{ca}.multihead_attn.out_proj", "cross_attn.out_proj"), (f"{ca}.norm", "cross_attn_layer_norm"),
                     (f"{ff}.linear1", "fc1"), (f"{ff}.linear2", "fc2"), (f"{ff}.norm", "final_layer_norm")):
            table.update(_pairs(a, f"{dst}.{b}"))
    return table


def key_map(conv: Converted) -> dict[str, tuple[str, ...]]:
    """detectron2 key → transformers key(s) (several: the source splits along dim 0; none: checked, not copied)."""
    config, levels = conv.config, int(conv.config.num_feature_levels)
    backbone = _swin_keys(config) if conv.backbone == "swin" else _resnet_keys(config, conv.frozen_bn)
    return {**backbone, **_pixel_decoder_keys(config, levels), **_predictor_keys(config, levels),
            "criterion.empty_weight": ()}


def derived_keys(conv: Converted) -> set[str]:
    """transformers tensors not read from a detectron2 file: Swin's unused final LayerNorm, the loss's class
    weights (from ``no_object_weight``), FrozenBN's missing ``num_batches_tracked``."""
    keys = {"criterion.empty_weight"}
    if conv.backbone == "swin":
        keys |= {f"{E}swin.layernorm.weight", f"{E}swin.layernorm.bias"}
    return keys
