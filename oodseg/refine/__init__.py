"""Object-level refinement of anomaly score maps with SAM.

* :mod:`oodseg.refine.prompters`: box prompters (registry ``create_prompter`` / ``register_prompter`` /
  ``list_prompters``); the ``components`` prompter. Their inputs and outputs live below ``refine``:
  :class:`~oodseg.outputs.Boxes`, :class:`~oodseg.scoring.calibration.ScoreCalibration`.
* :mod:`oodseg.refine.detector`: the ``detector`` prompter, S2M's prompt generator (the network:
  :mod:`oodseg.models.detector`; its training task: :mod:`oodseg.training.detector_task`).
* :mod:`oodseg.refine.s2m`: :func:`assemble_masks`, :func:`refine_s2m` (boxes → SAM masks → refined map).
* :mod:`oodseg.refine.everything`: SAM's / SAOM's everything mode (:func:`generate_everything`).

SAOM's model side lives in :mod:`oodseg.models.saom`, its losses in :mod:`oodseg.losses.saom`, its evaluation in
:mod:`oodseg.scoring.metrics.saom` and its training task in :mod:`oodseg.training.saom_task`.
"""

from oodseg.outputs import Boxes, mask_box
from oodseg.refine.detector import DetectorPrompter
from oodseg.refine.everything import generate_everything
from oodseg.refine.prompters import (
    PROMPTERS,
    ComponentPrompter,
    Prompter,
    create_prompter,
    list_prompters,
    register_prompter,
    score_map_array,
)
from oodseg.refine.s2m import assemble_masks, refine_s2m
from oodseg.scoring.calibration import ScoreCalibration

__all__ = [
    "PROMPTERS",
    "Boxes",
    "ComponentPrompter",
    "DetectorPrompter",
    "Prompter",
    "ScoreCalibration",
    "assemble_masks",
    "create_prompter",
    "generate_everything",
    "list_prompters",
    "mask_box",
    "refine_s2m",
    "register_prompter",
    "score_map_array",
]
