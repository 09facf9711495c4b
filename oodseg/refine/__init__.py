"""Object-level refinement of anomaly score maps with SAM.

* :mod:`oodseg.refine.prompters`: box prompters (registry ``create_prompter`` / ``register_prompter`` /
  ``list_prompters`` / ``prompter_space``); the ``components`` prompter. Their inputs and outputs live below
  ``refine``: :class:`~oodseg.outputs.Boxes`, :class:`~oodseg.scoring.calibration.ScoreCalibration`.
* :mod:`oodseg.refine.detector`: the ``detector`` prompter, S2M's prompt generator (the network:
  :mod:`oodseg.models.detector`; its training task: :mod:`oodseg.training.detector_task`).
* :mod:`oodseg.refine.s2m`: :func:`assemble_masks`, :func:`refine_s2m` (boxes → SAM masks → refined map).
* :mod:`oodseg.refine.saom`: SAOM fine-tuning of SAM (grid, nearest-neighbour point assignment, losses, the step,
  the SAOM evaluation ``SaomEval`` and everything-mode generation).
"""

from oodseg.outputs import Boxes, mask_box
from oodseg.refine.detector import DetectorPrompter
from oodseg.refine.prompters import (
    PROMPTERS,
    ComponentPrompter,
    Prompter,
    create_prompter,
    list_prompters,
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
from oodseg.scoring.calibration import ScoreCalibration

__all__ = [
    "PROMPTERS",
    "Boxes",
    "ComponentPrompter",
    "DetectorPrompter",
    "Prompter",
    "SaomEval",
    "SaomHead",
    "ScoreCalibration",
    "assemble_masks",
    "assign_points",
    "create_prompter",
    "generate_everything",
    "list_prompters",
    "mask_box",
    "point_grid",
    "prompter_space",
    "refine_s2m",
    "register_prompter",
    "saom_loss",
    "saom_predict",
    "saom_step",
    "score_map_array",
    "select_saom_parameters",
]
