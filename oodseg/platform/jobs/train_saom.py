"""SAOM fine-tuning of SAM on Ray Train (``python jobs/train_saom.py`` / ``python -m oodseg train-saom``): the
fine-tuning job with ``train.task=saom`` on Cityscapes-format instance masks (``*_instanceIds.png``):
``train.task_cfg`` holds the SAM to start from (``sam``: a file, hub id, local dir, ``demo-sam``), the prompt
recipe (``prompts: grid`` = SAOM, ``box`` = SAM's own objective for a from-scratch model), the grid size and whether
the encoder trains; validation mIoU / mAcc by the SAOM protocol; the export is a SAM the benchmark's
``refine_cfg.sam`` takes. DDP by default."""

from __future__ import annotations

from oodseg.platform.jobs.finetune import main as finetune_main

PRESET = {"name": "saom", "strategy": "ddp", "train": {
    "task": "saom", "anomaly_set": None, "lr": 5e-4, "steps": 120, "global_batch": 4, "val_every": 40,
    "val_images": 8, "task_cfg": {"sam": "demo-sam", "prompts": "grid", "grid": [16, 16], "num_classes": 19}}}


def main(argv: list[str] | None = None) -> int:
    return finetune_main(argv, PRESET, prog="python jobs/train_saom.py", description=__doc__)
