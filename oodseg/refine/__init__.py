"""Object-level refinement of anomaly score maps with SAM.

* :mod:`oodseg.refine.prompters`: box prompters (registry ``create_prompter`` / ``register_prompter`` /
  ``list_prompters`` / ``prompter_space``), :class:`Boxes`, :class:`ScoreCalibration`.
* :mod:`oodseg.refine.detector`: S2M's Faster R-CNN prompt generator on score maps (``detector`` prompter).
* :mod:`oodseg.refine.s2m`: :func:`assemble_masks`, :func:`refine_s2m` (boxes → SAM masks → refined map).
* :mod:`oodseg.refine.saom`: SAOM fine-tuning of SAM (grid, nearest-neighbour point assignment, losses, the step,
  the SAOM evaluation ``SaomEval`` and everything-mode generation).
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
from oodseg.refine.prompters import (
    PROMPTERS,
    Boxes,
    ComponentPrompter,
    Prompter,
    ScoreCalibration,
    create_prompter,
    list_prompters,
    mask_box,
    prompter_space,
    register_prompter,
    score_map_array,
)
from oodseg.refine.s2m import assemble_masks, refine_s2m
from oodseg.refine.saom import (
    SaomEval,
    SaomHead,
    assign_points,
    generate_everything,
    point_grid,
    saom_loss,
    saom_predict,
    saom_step,
    select_saom_parameters,
)

__all__ = [
    "PROMPTERS",
    "Boxes",
    "ComponentPrompter",
    "DetectorConfig",
    "DetectorPrompter",
    "Prompter",
    "SaomEval",
    "SaomHead",
    "ScoreCalibration",
    "ScoreDetector",
    "assemble_masks",
    "assign_points",
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
    "point_grid",
    "prompter_space",
    "refine_s2m",
    "register_prompter",
    "saom_loss",
    "saom_predict",
    "saom_step",
    "save_detector",
    "score_map_array",
    "select_saom_parameters",
]
