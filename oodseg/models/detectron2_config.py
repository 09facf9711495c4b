"""Reading detectron2 YAML configs without detectron2: ``_BASE_`` inheritance, safe YAML, and the defaults of the keys
a Mask2Former conversion reads.

detectron2's ``CfgNode.merge_from_file`` loads a file's ``_BASE_`` (a path relative to the file, or a list of them)
first and merges the file over it, recursively (``detectron2/config/config.py``, fvcore
``CfgNode.load_yaml_with_base``); keys a config never sets take the defaults of ``detectron2/config/defaults.py`` and
Mask2Former's ``add_maskformer2_config`` (``mask2former/config.py``). detectron2 reads YAML with ``yaml.unsafe_load``
(Mask2Former's Cityscapes base config computes ``MIN_SIZE_TRAIN`` with ``!!python/object/apply:eval``); here YAML is
read with ``yaml.SafeLoader`` and every Python-object tag becomes an opaque :class:`Unevaluated` value, so nothing in
the file runs (those tags only occur in training settings that a conversion never reads).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from oodseg.models.checkpoint import CheckpointError

#: defaults of the keys a conversion reads (detectron2 ``config/defaults.py`` at 02b5c4e2, Mask2Former
#: ``mask2former/config.py`` at 9b0651c)
DEFAULTS: dict[str, Any] = {
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone",
    "MODEL.PIXEL_MEAN": [103.530, 116.280, 123.675],
    "MODEL.PIXEL_STD": [1.0, 1.0, 1.0],
    "INPUT.FORMAT": "BGR",
    "INPUT.MIN_SIZE_TEST": 800,
    "INPUT.MAX_SIZE_TEST": 1333,
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RESNETS.NORM": "FrozenBN",
    "MODEL.RESNETS.NUM_GROUPS": 1,
    "MODEL.RESNETS.WIDTH_PER_GROUP": 64,
    "MODEL.RESNETS.STRIDE_IN_1X1": True,
    "MODEL.RESNETS.RES5_DILATION": 1,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 64,
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, False, False, False],
    "MODEL.RESNETS.OUT_FEATURES": ["res4"],
    "MODEL.SWIN.PATCH_SIZE": 4,
    "MODEL.SWIN.EMBED_DIM": 96,
    "MODEL.SWIN.DEPTHS": [2, 2, 6, 2],
    "MODEL.SWIN.NUM_HEADS": [3, 6, 12, 24],
    "MODEL.SWIN.WINDOW_SIZE": 7,
    "MODEL.SWIN.MLP_RATIO": 4.0,
    "MODEL.SWIN.QKV_BIAS": True,
    "MODEL.SWIN.QK_SCALE": None,
    "MODEL.SWIN.DROP_PATH_RATE": 0.3,
    "MODEL.SWIN.APE": False,
    "MODEL.SWIN.PATCH_NORM": True,
    "MODEL.SWIN.PRETRAIN_IMG_SIZE": 224,
    "MODEL.SWIN.OUT_FEATURES": ["res2", "res3", "res4", "res5"],
    "MODEL.SEM_SEG_HEAD.NAME": "SemSegFPNHead",
    "MODEL.SEM_SEG_HEAD.IN_FEATURES": ["p2", "p3", "p4", "p5"],
    "MODEL.SEM_SEG_HEAD.IGNORE_VALUE": 255,
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 54,
    "MODEL.SEM_SEG_HEAD.CONVS_DIM": 128,
    "MODEL.SEM_SEG_HEAD.COMMON_STRIDE": 4,
    "MODEL.SEM_SEG_HEAD.NORM": "GN",
    "MODEL.SEM_SEG_HEAD.MASK_DIM": 256,
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS": 0,
    "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME": "BasePixelDecoder",
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES": ["res3", "res4", "res5"],
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS": 4,
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS": 8,
    "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME": "MultiScaleMaskedTransformerDecoder",
    "MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE": "res5",
    "MODEL.MASK_FORMER.NO_OBJECT_WEIGHT": 0.1,
    "MODEL.MASK_FORMER.CLASS_WEIGHT": 1.0,
    "MODEL.MASK_FORMER.DICE_WEIGHT": 1.0,
    "MODEL.MASK_FORMER.MASK_WEIGHT": 20.0,
    "MODEL.MASK_FORMER.NHEADS": 8,
    "MODEL.MASK_FORMER.DROPOUT": 0.1,
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD": 2048,
    "MODEL.MASK_FORMER.DEC_LAYERS": 6,
    "MODEL.MASK_FORMER.PRE_NORM": False,
    "MODEL.MASK_FORMER.HIDDEN_DIM": 256,
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 100,
    "MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ": False,
    "MODEL.MASK_FORMER.SIZE_DIVISIBILITY": 32,
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS": 112 * 112,
    "MODEL.MASK_FORMER.OVERSAMPLE_RATIO": 3.0,
    "MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO": 0.75,
    "MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE": False,
}


class Unevaluated:
    """A YAML value with a Python tag (``!!python/...``) that is kept as text, never constructed."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __repr__(self) -> str:
        return f"Unevaluated({self.tag})"


class _Loader(yaml.SafeLoader):
    """SafeLoader that turns any unknown tag into :class:`Unevaluated` instead of failing."""


_Loader.add_multi_constructor("", lambda loader, suffix, node: Unevaluated(suffix))


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml_with_base(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The config at ``path`` with its ``_BASE_`` chain merged in (detectron2's order); CheckpointError naming the
    file on a missing base, an inheritance cycle or YAML that is not a mapping."""
    path = Path(path).expanduser().resolve()
    if path in _seen:
        raise CheckpointError(path, f"_BASE_ cycle: {' -> '.join(str(p) for p in (*_seen, path))}")
    if not path.is_file():
        where = f" (_BASE_ of {_seen[-1]})" if _seen else ""
        raise CheckpointError(path, f"config file not found{where}")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"is not a YAML config ({' '.join(str(e).split())[:160]})") from None
    if not isinstance(data, Mapping):
        raise CheckpointError(path, f"is not a detectron2 config (YAML {type(data).__name__}, expected a mapping)")
    data = dict(data)
    bases = data.pop("_BASE_", None)
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else list(bases or []):
        if "://" in str(base):
            raise CheckpointError(path, f"_BASE_ {base!r} is a URL; give a local path")
        merged = _merge(merged, load_yaml_with_base(path.parent / str(base), (*_seen, path)))
    return _merge(merged, data)


class D2Config:
    """A resolved detectron2 config: ``cfg["MODEL.SWIN.EMBED_DIM"]`` reads the file's value or the default."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.data = load_yaml_with_base(path)

    def __getitem__(self, dotted: str) -> Any:
        node: Any = self.data
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                if dotted in DEFAULTS:
                    return DEFAULTS[dotted]
                raise CheckpointError(self.path, f"has no {dotted} (and it has no default here)")
            node = node[part]
        return node

    def unsupported(self, dotted: str, why: str) -> CheckpointError:
        return CheckpointError(self.path, f"unsupported {dotted}: {self[dotted]!r} ({why})")
