"""SAOM fine-tuning of SAM on instance masks (Ray Train, DDP).

    python jobs/train_saom.py                                  # the demo SAM, SAOM recipe, synthetic suite
    python jobs/train_saom.py --set 'train.task_cfg={sam: facebook/sam-vit-base, prompts: grid, grid: [32, 32]}' \
        --data-root /data --use-gpu true
    python jobs/benchmark.py --refine s2m --set refine_cfg.sam=<printed model path>

Every option: ``python jobs/train_saom.py --help``.
"""

import sys

from oodseg.process import apply_job_settings

apply_job_settings()  # before anything imports torch

from oodseg.platform.jobs.train_saom import main

if __name__ == "__main__":
    sys.exit(main())
