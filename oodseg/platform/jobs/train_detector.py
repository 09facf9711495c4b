"""S2M's detector on Ray Train (``python jobs/train_detector.py`` / ``python -m oodseg train-detector``): the
fine-tuning job with ``train.task=s2m_detector`` — on-the-fly Cityscapes-format crops with one pasted COCO object,
scored by a frozen registered model + scorer (``train.task_cfg``: ``scorer``, ``scoring_model``, ``detector``);
validation box recall / AP at IoU 0.5; checkpoints, resume, a safetensors export the benchmark's
``refine_cfg.detectors`` takes. DDP by default (``--strategy deepspeed`` works too)."""

from __future__ import annotations

from oodseg.platform.jobs.finetune import main as finetune_main
from oodseg.refine.demo import DETECTOR_CFG

PRESET = {"name": "detector", "strategy": "ddp", "train": {
    "task": "s2m_detector", "anomaly_set": None, "lr": 2e-3, "steps": 600, "crop": [128, 256], "scale": [0.85, 1.3],
    "val_every": 40, "val_images": 16,
    "task_cfg": {"scorer": "msp", "scoring_model": "demo", "detector": dict(DETECTOR_CFG)}}}


def main(argv: list[str] | None = None) -> int:
    return finetune_main(argv, PRESET, prog="python jobs/train_detector.py", description=__doc__)
