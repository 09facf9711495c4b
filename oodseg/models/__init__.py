"""Models layer: one contract (:class:`SegModel`), one registry, checkpoint I/O, device/precision runtime. No Ray.

``create_model(name, **cfg)`` builds a registered model; ``list_models()`` lists the names:

* ``erfnet``   — :class:`oodseg.models.erfnet.ERFNet` (pixel logits; published Cityscapes checkpoint layout);
* ``eomt``     — :class:`oodseg.models.eomt.EoMT` (mask outputs; transformers ``EomtForUniversalSegmentation``);
* ``timm_seg`` — :class:`oodseg.models.timm_seg.TimmSeg` (pixel logits on any timm backbone).

The created model carries ``model_name`` so ``save_safetensors`` can record how to rebuild it.
"""

from __future__ import annotations

from typing import Any

from oodseg.models.base import SegModel, check_partition, to_nchw_uint8
from oodseg.models.checkpoint import (
    CheckpointError,
    LoadReport,
    load_checkpoint,
    model_from_safetensors,
    read_state_dict,
    save_safetensors,
)
from oodseg.models.heads import IsoMaxPlusHead
from oodseg.models.runtime import Runtime
from oodseg.registry import Registry

MODELS: Registry[SegModel] = Registry("model")
register_model = MODELS.register


def create_model(name: str, **cfg: Any) -> SegModel:
    """Build model ``name`` with keyword config ``cfg`` (see each model's class docstring)."""
    model = MODELS.create(name, **cfg)
    model.model_name = name
    return model


def list_models() -> list[str]:
    return MODELS.list()


def model_output_kind(name: str) -> str:
    """``"pixel"`` or ``"mask"``: what model ``name`` returns (declared at registration, so nothing is built)."""
    return str(MODELS.meta(name)["output_kind"])


@register_model("erfnet", output_kind="pixel")
def _erfnet(**cfg: Any) -> SegModel:
    from oodseg.models.erfnet import ERFNet

    return ERFNet(**cfg)


@register_model("eomt", output_kind="mask")
def _eomt(**cfg: Any) -> SegModel:
    from oodseg.models.eomt import EoMT

    return EoMT(**cfg)


@register_model("timm_seg", output_kind="pixel")
def _timm_seg(**cfg: Any) -> SegModel:
    from oodseg.models.timm_seg import TimmSeg

    return TimmSeg(**cfg)


__all__ = [
    "CheckpointError",
    "IsoMaxPlusHead",
    "LoadReport",
    "Runtime",
    "SegModel",
    "check_partition",
    "create_model",
    "list_models",
    "load_checkpoint",
    "model_from_safetensors",
    "model_output_kind",
    "read_state_dict",
    "register_model",
    "save_safetensors",
    "to_nchw_uint8",
]
