"""The ``detector`` prompter: S2M's prompts are the boxes of a detector run on the anomaly score map.

The network lives in :mod:`oodseg.models`: :func:`~oodseg.models.detector.load_detector` recognises the file, our
:class:`~oodseg.models.detector.ScoreDetector` ``.safetensors`` or S2M's released detectron2 ``model_final.pth``
(:class:`~oodseg.models.d2_rcnn.D2FasterRCNN`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from oodseg.models.detector import load_detector
from oodseg.outputs import Boxes
from oodseg.refine.prompters import ScoreCalibration, register_prompter, score_map_array


@register_prompter("detector")
class DetectorPrompter:
    """S2M prompts: the boxes of a detector (its checkpoint holds its own input normalisation, so ``calibration``
    is not used). ``detector`` (a module with ``detect(map) -> Boxes``) or ``checkpoint`` (a file: our ``.safetensors`` or S2M's detectron2
    ``model_final.pth``); ``score_thresh`` etc. override the checkpoint's
    inference settings."""

    def __init__(self, checkpoint: str | Path | None = None, detector: Any = None, device: str = "cpu",
                 **overrides: Any) -> None:
        if (checkpoint is None) == (detector is None):
            raise ValueError("detector prompter needs exactly one of checkpoint= or detector=")
        if detector is None:
            detector = load_detector(checkpoint, device=device, **overrides)  # type: ignore[arg-type]
        elif overrides:
            raise ValueError(f"detector prompter: overrides {sorted(overrides)} need checkpoint=")
        self.detector = detector

    def __call__(self, score_map: Any, image: Any = None, calibration: ScoreCalibration | None = None) -> Boxes:
        return self.detector.detect(torch.from_numpy(score_map_array(score_map)))
