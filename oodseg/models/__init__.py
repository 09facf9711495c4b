"""Models layer: one contract (:class:`SegModel`), one registry + factory, checkpoint I/O, device/precision. No Ray.

``create_model(name, checkpoint=None, **cfg)`` builds a registered model and loads its weights
(:mod:`oodseg.models.factory`); ``list_models()`` lists the names. Each model registers itself in its own file:

* ``erfnet``   — :class:`oodseg.models.erfnet.ERFNet` (pixel logits; published Cityscapes checkpoint layout);
* ``eomt``     — :class:`oodseg.models.eomt.EoMT` (mask outputs; transformers ``EomtForUniversalSegmentation``);
* ``mask2former`` — :class:`oodseg.models.mask2former.Mask2Former` (mask outputs; transformers
  ``Mask2FormerForUniversalSegmentation``; detectron2 checkpoints via ``convert-checkpoint --format
  detectron2-mask2former``);
* ``timm_seg`` — :class:`oodseg.models.timm_seg.TimmSeg` (pixel logits on any timm backbone);
* ``tdos``     — :class:`oodseg.models.tdos.model.TDOS` (mask outputs with an ``ood`` class; CLIP text-driven OOD).
* ``precomputed`` — :class:`oodseg.models.precomputed.Precomputed` (score maps: another method's saved outputs,
  one file per image; ``.npz`` / ``.npy`` / 16-bit PNG / SMIYC ``.hdf5``).

SAM (prompted masks, not a segmentation model) lives in :mod:`oodseg.models.sam`.

A new model is one file with ``@register_model("name")`` on its ``SegModel`` subclass, plus its import line here.
"""

from oodseg.models import eomt, erfnet, mask2former, precomputed, tdos, timm_seg  # noqa: F401  (each registers itself)
from oodseg.models.base import ImageSource, SegModel, SourceError, check_partition, to_nchw_uint8
from oodseg.models.checkpoint import (
    CheckpointError,
    LoadReport,
    check_checkpoint,
    load_checkpoint,
    read_state_dict,
    save_safetensors,
)
from oodseg.models.factory import (
    check_model_fits,
    create_model,
    list_models,
    model_output_kind,
    register_checkpoint_source,
    register_model,
    resolve_checkpoint,
)
from oodseg.models.heads import IsoMaxPlusHead
from oodseg.models.runtime import Runtime, setup_worker, tune_allocator

__all__ = [
    "CheckpointError",
    "ImageSource",
    "IsoMaxPlusHead",
    "LoadReport",
    "Runtime",
    "SegModel",
    "SourceError",
    "check_checkpoint",
    "check_model_fits",
    "check_partition",
    "create_model",
    "list_models",
    "load_checkpoint",
    "model_output_kind",
    "read_state_dict",
    "register_checkpoint_source",
    "register_model",
    "resolve_checkpoint",
    "save_safetensors",
    "setup_worker",
    "to_nchw_uint8",
    "tune_allocator",
]
