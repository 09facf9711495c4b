"""TDOS (Song & Lee, IROS 2025): CLIP vision-language OOD segmentation; ``create_model("tdos", clip="tiny")``.

Modules: :mod:`.clip` (towers, tokenizers), :mod:`.text` (learned-context prompts, context decoder), :mod:`.vision`
(ViT pyramid, dense embeddings), :mod:`.augment` (OOD semantic augmentation), :mod:`.decoder` (pixel + mask
decoders), :mod:`.merge` (70 → 20 query merge), :mod:`.negatives` (NegLabel-style word groups + CLI),
:mod:`.model` (the registered ``tdos`` model). The loss is :class:`oodseg.losses.tdos.TdosLoss`.
"""

from oodseg.models.tdos.model import TDOS, TdosConfig, TdosOutputs

__all__ = ["TDOS", "TdosConfig", "TdosOutputs"]
