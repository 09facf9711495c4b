"""Building and loading transformers' ``Mask2FormerForUniversalSegmentation`` for :mod:`oodseg.models.mask2former`:
named random architectures, the feature-level count that transformers fixes at 3 (:func:`set_feature_levels`), and
hub / local-directory loading with the image processor's settings.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import torch
from torch import nn

from oodseg.models.eomt import _offline

STAGES = ["stage1", "stage2", "stage3", "stage4"]
#: Swin sizes as Mask2Former's configs set them (``configs/*/swin/*.yaml``; Liu et al., ICCV 2021)
SWIN = {
    "swin-t": {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7},
    "swin-s": {"embed_dim": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24], "window_size": 7},
    "swin-b": {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32], "window_size": 12,
               "image_size": 384},
    "swin-l": {"embed_dim": 192, "depths": [2, 2, 18, 2], "num_heads": [6, 12, 24, 48], "window_size": 12,
               "image_size": 384},
}
#: a small Swin Mask2Former for tests (seconds on a CPU); GroupNorm(32, ·) needs feature_size ≥ 32
TINY = {"feature_size": 32, "mask_feature_size": 32, "hidden_dim": 32, "encoder_feedforward_dim": 64,
        "dim_feedforward": 64, "encoder_layers": 1, "decoder_layers": 3, "num_attention_heads": 2, "num_queries": 8,
        "num_labels": 19, "train_num_points": 256}
BACKBONES = ("tiny", *SWIN, "r50", "r101")


def feature_levels(config: Any) -> int:
    """How many of the coarsest backbone levels the deformable encoder and the decoder use (transformers: 3)."""
    return int(getattr(config, "num_feature_levels", 3))


def hf_config(backbone: str, **overrides: Any) -> Any:
    """The ``Mask2FormerConfig`` of a named architecture (``tiny``, ``swin-t|s|b|l``, ``r50``, ``r101``) with
    ``overrides`` (``num_labels``, ``num_queries``, ``decoder_layers``, ``num_feature_levels``, …)."""
    from transformers import Mask2FormerConfig, ResNetConfig, SwinConfig

    if backbone == "tiny":
        bb = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                        out_features=STAGES)
        return Mask2FormerConfig(backbone_config=bb, **{**TINY, **overrides})
    if backbone in SWIN:
        bb = SwinConfig(out_features=STAGES, drop_path_rate=0.3, **SWIN[backbone])
    elif backbone in ("r50", "r101"):
        depths = [3, 4, 6, 3] if backbone == "r50" else [3, 4, 23, 3]
        bb = ResNetConfig(depths=depths, layer_type="bottleneck", out_features=STAGES)
    else:
        raise ValueError(f"mask2former backbone {backbone!r}: use one of {', '.join(BACKBONES)}")
    return Mask2FormerConfig(backbone_config=bb, **{"num_labels": 19, **overrides})


@functools.cache
def hf_class() -> type:
    """``Mask2FormerForUniversalSegmentation`` whose constructor applies ``config.num_feature_levels``, so
    ``from_pretrained`` (with transformers' key renaming of saved checkpoints) and ``save_pretrained`` work unchanged
    for every level count. Its mask-embedding MLP runs its *registered* submodules: transformers' prediction blocks
    iterate a private Python list, so a layer swapped in by name (a LoRA adapter, peft) would be silently bypassed."""
    from transformers import Mask2FormerForUniversalSegmentation
    from transformers.models.mask2former import modeling_mask2former as hf_m2f

    def registered(cls: type) -> type:
        def forward(self: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
            for layer in self._modules.values():
                hidden = layer(hidden)
            return hidden

        return type(cls.__name__, (cls,), {"forward": forward})

    blocks = {cls: registered(cls) for cls in (hf_m2f.Mask2FormerPredictionBlock, hf_m2f.Mask2FormerMLPPredictionHead)}

    class Mask2FormerAnyLevels(Mask2FormerForUniversalSegmentation):
        def __init__(self, config: Any) -> None:
            super().__init__(config)
            set_feature_levels(self, feature_levels(config))
            for module in self.modules():
                if type(module) in blocks:
                    module.__class__ = blocks[type(module)]

    return Mask2FormerAnyLevels


def build_hf(config: Any) -> Any:
    """A randomly initialised model of ``config`` (a ``Mask2FormerConfig`` or its dict), feature levels applied."""
    from transformers import Mask2FormerConfig

    if not isinstance(config, Mask2FormerConfig):
        config = Mask2FormerConfig.from_dict(dict(config))
    return hf_class()(config)


def _conv_gn(cin: int, cout: int, kernel: int, bias: bool, relu: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias), nn.GroupNorm(32, cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


def set_feature_levels(hf: Any, n: int) -> None:
    """Rebuild the level-dependent modules of a fresh ``hf`` for ``n`` feature levels (the ``n`` coarsest backbone
    levels in the deformable encoder and the decoder, FPN convs for the finer ones), as the reference builds them
    from ``DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES``; new modules get transformers' initialisation."""
    if n == 3:
        return
    cfg = hf.config
    if not 1 <= n <= 3:
        raise ValueError(f"num_feature_levels must be 1, 2 or 3, got {n}")
    pd, tm = hf.model.pixel_level_module.decoder, hf.model.transformer_module
    channels, d = list(pd.feature_channels), cfg.feature_size
    pd.num_feature_levels = n
    pd.transformer_feature_strides = list(cfg.feature_strides)[-n:]
    pd.level_embed = nn.Parameter(torch.empty(n, d))
    pd.input_projections = nn.ModuleList([_conv_gn(c, d, 1, True) for c in channels[-n:][::-1]])
    for layer in pd.encoder.layers:
        attn = layer.self_attn
        attn.n_levels = n
        attn.sampling_offsets = nn.Linear(d, attn.n_heads * n * attn.n_points * 2)
        attn.attention_weights = nn.Linear(d, attn.n_heads * n * attn.n_points)
    for idx in range(pd.num_fpn_levels):
        delattr(pd, f"adapter_{idx + 1}")
        delattr(pd, f"layer_{idx + 1}")
    pd.num_fpn_levels = int(math.log2(min(pd.transformer_feature_strides)) - math.log2(cfg.common_stride))
    lateral, output = [], []
    for idx, c in enumerate(channels[: pd.num_fpn_levels]):
        lateral.append(_conv_gn(c, d, 1, False))
        output.append(_conv_gn(d, d, 3, False, relu=True))
        pd.add_module(f"adapter_{idx + 1}", lateral[-1])
        pd.add_module(f"layer_{idx + 1}", output[-1])
    pd.lateral_convolutions, pd.output_convolutions = lateral[::-1], output[::-1]
    hidden = cfg.hidden_dim
    project = cfg.feature_size != hidden or cfg.enforce_input_projection
    tm.num_feature_levels = tm.decoder.num_feature_levels = n
    tm.input_projections = nn.ModuleList(
        [nn.Conv2d(cfg.feature_size, hidden, kernel_size=1) if project else nn.Sequential() for _ in range(n)]
    )
    tm.level_embed = nn.Embedding(n, hidden)
    for module in (pd, tm):
        for sub in module.modules():
            hf._init_weights(sub)


def load_hf(source: str) -> Any:
    """``from_pretrained`` of a hub id or local directory, any feature-level count (:func:`hf_class`)."""
    return hf_class().from_pretrained(source, local_files_only=_offline())


def processor_settings(source: str, local_files_only: bool = False) -> dict[str, Any]:
    """``image_mean`` / ``image_std`` / ``size_divisor`` / ``test_size`` (``shortest_edge``, ``longest_edge``) from
    the checkpoint's ``preprocessor_config.json``; ``{}`` when it has none."""
    from transformers.utils import cached_file

    try:
        path = cached_file(source, "preprocessor_config.json", local_files_only=local_files_only,
                           _raise_exceptions_for_missing_entries=False)
    except OSError:
        return {}
    if path is None:
        return {}
    with open(path) as f:
        raw = json.load(f)
    out = {k: raw[k] for k in ("image_mean", "image_std", "size_divisor") if raw.get(k) is not None}
    size = raw.get("size") or {}
    if size.get("shortest_edge") and size.get("longest_edge"):
        out["test_size"] = (int(size["shortest_edge"]), int(size["longest_edge"]))
    return out
