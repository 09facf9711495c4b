"""Object-level refinement of anomaly score maps with SAM.

* :mod:`oodseg.refine.prompters`: box prompters (registry ``create_prompter`` / ``register_prompter`` /
  ``list_prompters``), :class:`Boxes`, :class:`ScoreCalibration`.
* :mod:`oodseg.refine.detector`: S2M's Faster R-CNN prompt generator on score maps (``detector`` prompter).
* :mod:`oodseg.refine.s2m`: :func:`assemble_masks`, :func:`refine_s2m` (boxes → SAM masks → refined map).
* :mod:`oodseg.refine.everything`: SAM's / SAOM's everything mode (:func:`generate_everything`).

SAOM's model side lives in :mod:`oodseg.models.saom`, its losses in :mod:`oodseg.losses.saom`, its evaluation in
:mod:`oodseg.scoring.metrics.saom` and its training task in :mod:`oodseg.training.saom_task`.
"""

from oodseg.refine.detector import (
    DetectorConfig,
    DetectorPrompter,
    ScoreDetector,
    average_precision,
    box_recall,
    build_detector,
    detector_targets,
    hflip,
    load_detector,
    multiplicative_noise,
    save_detector,
)
from oodseg.refine.everything import generate_everything
from oodseg.refine.prompters import (
    PROMPTERS,
    Boxes,
    ComponentPrompter,
    Prompter,
    ScoreCalibration,
    create_prompter,
    list_prompters,
    mask_box,
    register_prompter,
    score_map_array,
)
from oodseg.refine.s2m import assemble_masks, refine_s2m

__all__ = [
    "PROMPTERS",
    "Boxes",
    "ComponentPrompter",
    "DetectorConfig",
    "DetectorPrompter",
    "Prompter",
    "ScoreCalibration",
    "ScoreDetector",
    "assemble_masks",
    "average_precision",
    "box_recall",
    "build_detector",
    "create_prompter",
    "detector_targets",
    "generate_everything",
    "hflip",
    "list_prompters",
    "load_detector",
    "mask_box",
    "multiplicative_noise",
    "refine_s2m",
    "register_prompter",
    "save_detector",
    "score_map_array",
]
